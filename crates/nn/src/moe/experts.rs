//! The expert computations shared by every routing strategy: the routed SwiGLU experts on a
//! [`MoeRoutingPlan`] (permute → grouped SwiGLU → weighted un-permute) and the shared expert.
//!
//! Expert weights use the transformers-5 in-memory layout: `gate_up (E, 2f, d)` holds the gate
//! rows then the up rows of each expert, `down (E, d, f)`.

use moeba_autograd::fused::moe as fused;
use moeba_autograd::Var;
use moeba_kernels::ops::MoeRoutingPlan;
use moeba_tensor::{Error, Result};

/// The Vars of a shared (always-on) SwiGLU expert, `down(silu(gate x) · up x)`, optionally
/// scaled per token by `sigmoid(x · gate_w)` (Qwen2-MoE).
#[derive(Clone, Debug)]
pub struct SharedExpertWeights {
    /// `gate_proj.weight (f_s, d)`.
    pub gate_proj: Var,
    /// `up_proj.weight (f_s, d)`.
    pub up_proj: Var,
    /// `down_proj.weight (d, f_s)`.
    pub down_proj: Var,
    /// `shared_expert_gate.weight (1, d)`, if the shared expert is gated.
    pub gate: Option<Var>,
}

/// Every Var an MoE forward reads: the layer's current parameters ([`crate::moe::MoeLayer::weights`])
/// or, for a gradient check, the checker's own inputs in the same places.
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// The strategy's router parameters, in the order of
    /// [`RoutingStrategy::router_params`](crate::moe::RoutingStrategy::router_params).
    pub router: Vec<Var>,
    /// `experts.gate_up_proj (E, 2f, d)`.
    pub gate_up: Var,
    /// `experts.down_proj (E, d, f)`.
    pub down: Var,
    /// The shared expert, if enabled.
    pub shared: Option<SharedExpertWeights>,
}

/// The routed experts on the rows of `plan`: `x (T, d)` permuted into expert groups, each row
/// through its expert's SwiGLU (`down_e(silu(gate_e x) · up_e x)`), scaled by its combine
/// weight and summed back to its token. `weights` is `(T, k)` for top-k plans or `(E, C)` for
/// expert-choice plans (gathered at `plan.row_slot`). Output `(T, d)`; a token with no rows
/// (dropped everywhere) gets zeros.
pub fn dispatch(x: &Var, weights: &Var, plan: &MoeRoutingPlan, gate_up: &Var, down: &Var) -> Result<Var> {
    let xs = fused::permute(x, plan)?;
    let ys = fused::swiglu_experts(&xs, gate_up, down, plan)?;
    let rw = fused::row_weights(weights, plan)?;
    fused::unpermute(&ys, &rw, plan)
}

/// The shared expert on `x (T, d)`: `down(silu(x gateᵀ) · x upᵀ)`, times `sigmoid(x gate_wᵀ)`
/// per token when gated. Output `(T, d)`.
pub fn shared_expert(x: &Var, w: &SharedExpertWeights) -> Result<Var> {
    let g = x.matmul(&w.gate_proj.t()?)?;
    let u = x.matmul(&w.up_proj.t()?)?;
    let h = g.silu()?.mul(&u)?.matmul(&w.down_proj.t()?)?;
    match &w.gate {
        Some(gw) => h.mul(&x.matmul(&gw.t()?)?.sigmoid()?),
        None => Ok(h),
    }
}

/// Checks the expert weights against `(E, 2f, d)` / `(E, d, f)`.
pub fn check_expert_shapes(gate_up: &Var, down: &Var, e: usize, f: usize, d: usize) -> Result<()> {
    if gate_up.dims() != [e, 2 * f, d] {
        return Err(Error::bad_shape(
            "MoeLayer::forward",
            gate_up.shape(),
            format!("experts.gate_up_proj must be (E, 2f, d) = ({e}, {}, {d})", 2 * f),
        ));
    }
    if down.dims() != [e, d, f] {
        return Err(Error::bad_shape(
            "MoeLayer::forward",
            down.shape(),
            format!("experts.down_proj must be (E, d, f) = ({e}, {d}, {f})"),
        ));
    }
    Ok(())
}
