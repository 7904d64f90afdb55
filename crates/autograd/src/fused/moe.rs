//! Top-k gating, token permutation and grouped expert GEMM on [`Var`]s.
//!
//! Each function records one node whose backward calls the matching backward kernel of
//! `moeba_kernels::ops` (`topk_gating_backward`, `moe_permute_backward`,
//! `moe_unpermute_backward`, `grouped_matmul_backward`). The routing plan and the expert
//! indices are not differentiable and are captured by the nodes.
//!
//! A whole MoE feed-forward on the tape:
//! ```text
//! g   = topk_gating(logits)                      weights (T,k), mean_score (E), lse (T)
//! plan = ops::moe_plan_from_topk(&g.indices, E, capacity)
//! xs  = permute(x, &plan)                        (R, d)
//! ys  = swiglu_experts(xs, gate_up, down, &plan) (R, d)
//! out = unpermute(ys, row_weights(g.weights, &plan), &plan)   (T, d)
//! ```

use moeba_kernels::ops::{self, MoeRoutingPlan, TopkGating, TopkGatingOptions};
use moeba_tensor::{DType, Error, Result, Tensor};

use crate::{CustomOp, Var};

/// The outputs of [`topk_gating`]: the differentiable ones as [`Var`]s, the rest as tensors.
#[derive(Debug, Clone)]
pub struct GatingVars {
    /// (T, k) `U32`: the chosen experts (not differentiable).
    pub indices: Tensor,
    /// (T, k): the gate weights of the chosen experts.
    pub weights: Var,
    /// (E): mean score per expert (P_e of the load-balancing loss).
    pub mean_score: Var,
    /// (T): logsumexp of the logits (for the z-loss).
    pub lse: Var,
    /// (E): assignments per expert (not differentiable; see `ops::TopkGating::counts`).
    pub counts: Tensor,
    /// (T, E): all scores (not differentiable here; use `weights`/`mean_score` for gradients).
    pub scores: Tensor,
}

struct GatingOp {
    fwd: TopkGating,
    opts: TopkGatingOptions,
}

impl CustomOp for GatingOp {
    fn name(&self) -> &'static str {
        "topk_gating"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let gl = ops::topk_gating_backward(
            &inputs[0],
            &self.fwd,
            &self.opts,
            g[0].as_ref(),
            g[1].as_ref(),
            g[2].as_ref(),
        )?;
        Ok(vec![Some(gl)])
    }
}

/// Fused top-k gating on a `Var` (see `ops::topk_gating`): one node with three differentiable
/// outputs (weights, mean_score, lse); the selection itself carries no gradient.
pub fn topk_gating(
    logits: &Var,
    selection_bias: Option<&Tensor>,
    opts: &TopkGatingOptions,
) -> Result<GatingVars> {
    let fwd = ops::topk_gating(logits.tensor(), selection_bias, opts)?;
    let outs = vec![fwd.weights.clone(), fwd.mean_score.clone(), fwd.lse.clone()];
    let (indices, counts, scores) = (fwd.indices.clone(), fwd.counts.clone(), fwd.scores.clone());
    let mut vars = Var::apply_custom(GatingOp { fwd, opts: *opts }, &[logits], outs).into_iter();
    let mut next = || vars.next().ok_or_else(|| Error::Msg("topk_gating: missing output".into()));
    let (weights, mean_score, lse) = (next()?, next()?, next()?);
    Ok(GatingVars { indices, weights, mean_score, lse, counts, scores })
}

struct PermuteOp {
    plan: MoeRoutingPlan,
}

impl CustomOp for PermuteOp {
    fn name(&self) -> &'static str {
        "moe_permute"
    }
    fn backward(
        &self,
        _inputs: &[Tensor],
        _outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![g[0].as_ref().map(|g| ops::moe_permute_backward(g, &self.plan)).transpose()?])
    }
}

/// `x (T, d)` gathered into expert order `(R, d)` (see `ops::moe_permute`).
pub fn permute(x: &Var, plan: &MoeRoutingPlan) -> Result<Var> {
    let y = ops::moe_permute(x.tensor(), plan)?;
    Ok(single(Var::apply_custom(PermuteOp { plan: plan.clone() }, &[x], vec![y])))
}

fn single(mut v: Vec<Var>) -> Var {
    // apply_custom returns exactly one Var per output tensor.
    v.remove(0)
}

struct RowWeightsOp {
    slots: Tensor,
    shape: Vec<usize>,
}

impl CustomOp for RowWeightsOp {
    fn name(&self) -> &'static str {
        "moe_row_weights"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &g[0] else { return Ok(vec![None]) };
        let n: usize = self.shape.iter().product();
        let zeros = Tensor::zeros(n, inputs[0].dtype(), inputs[0].device())?;
        let flat = ops::scatter_add(&zeros, 0, &self.slots, g)?;
        Ok(vec![Some(flat.reshape(self.shape.clone())?)])
    }
}

/// The gate weight of every row: `weights.flatten()[row_slot[r]]`, `(R)`. `weights` is the
/// (T, k) top-k weights or the (E, C) expert-choice weights the plan was built from.
pub fn row_weights(weights: &Var, plan: &MoeRoutingPlan) -> Result<Var> {
    let n = weights.elem_count();
    let slots = ops::to_dtype(&plan.row_slot, DType::U32)?;
    if let Some(&bad) = slots.to_vec::<u32>()?.iter().find(|&&s| s as usize >= n) {
        return Err(Error::invalid(
            "moe_row_weights",
            "plan",
            format!("row_slot {bad} is out of range for weights {}", weights.shape()),
        ));
    }
    let flat = weights.tensor().flatten_all()?;
    let w = ops::index_select(&flat, 0, &slots)?;
    Ok(single(Var::apply_custom(RowWeightsOp { slots, shape: weights.dims().to_vec() }, &[weights], vec![w])))
}

struct UnpermuteOp {
    plan: MoeRoutingPlan,
}

impl CustomOp for UnpermuteOp {
    fn name(&self) -> &'static str {
        "moe_unpermute"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &g[0] else { return Ok(vec![None, None]) };
        let (dy, dw) = ops::moe_unpermute_backward(&inputs[0], &inputs[1], &self.plan, g)?;
        Ok(vec![Some(dy), Some(dw)])
    }
}

/// `out[t] = Σ_{rows r of t} row_weights[r] · y[r]`: `y (R, d)`, `row_weights (R)` → `(T, d)`
/// (see `ops::moe_unpermute`).
pub fn unpermute(y: &Var, row_weights: &Var, plan: &MoeRoutingPlan) -> Result<Var> {
    let out = ops::moe_unpermute(y.tensor(), row_weights.tensor(), plan)?;
    Ok(single(Var::apply_custom(UnpermuteOp { plan: plan.clone() }, &[y, row_weights], vec![out])))
}

struct GroupedMatmulOp {
    offsets: Tensor,
}

impl CustomOp for GroupedMatmulOp {
    fn name(&self) -> &'static str {
        "grouped_matmul"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &g[0] else { return Ok(vec![None, None]) };
        let (dx, dw) = ops::grouped_matmul_backward(&inputs[0], &inputs[1], &self.offsets, g)?;
        Ok(vec![Some(dx), Some(dw)])
    }
}

/// `x (R, in)` times each expert's `w (E, out, in)` over the plan's groups → `(R, out)` (see
/// `ops::grouped_matmul`).
pub fn grouped_matmul(x: &Var, w: &Var, plan: &MoeRoutingPlan) -> Result<Var> {
    let out = ops::grouped_matmul(x.tensor(), w.tensor(), &plan.expert_offsets)?;
    let op = GroupedMatmulOp { offsets: plan.expert_offsets.clone() };
    Ok(single(Var::apply_custom(op, &[x, w], vec![out])))
}

struct SwigluOp {
    offsets: Tensor,
    h: Tensor,
    a: Tensor,
}

impl CustomOp for SwigluOp {
    fn name(&self) -> &'static str {
        "swiglu_experts"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &g[0] else { return Ok(vec![None, None, None]) };
        let (x, gate_up, down) = (&inputs[0], &inputs[1], &inputs[2]);
        let (da, ddown) = ops::grouped_matmul_backward(&self.a, down, &self.offsets, g)?;
        let dh = ops::moe_swiglu_backward(&self.h, &da)?;
        let (dx, dgu) = ops::grouped_matmul_backward(x, gate_up, &self.offsets, &dh)?;
        Ok(vec![Some(dx), Some(dgu), Some(ddown)])
    }
}

/// The SwiGLU expert on grouped rows: `down_e(silu(gate_e x) * up_e x)`, `gate_up (E, 2f, d)` =
/// `[gate; up]` rows (transformers-5 fused layout), `down (E, d, f)`; `x_sorted (R, d)` →
/// `(R, d)`. One node: the backward reuses the saved pre-activations.
pub fn swiglu_experts(x_sorted: &Var, gate_up: &Var, down: &Var, plan: &MoeRoutingPlan) -> Result<Var> {
    let op = "swiglu_experts";
    let (gu, dn) = (gate_up.tensor(), down.tensor());
    if gu.rank() != 3 || !gu.dims()[1].is_multiple_of(2) || dn.rank() != 3 {
        return Err(Error::invalid(
            op,
            "gate_up/down",
            format!("expected gate_up (E, 2f, d) and down (E, d, f), got {} and {}", gu.shape(), dn.shape()),
        ));
    }
    let (e, f2, d) = (gu.dims()[0], gu.dims()[1], gu.dims()[2]);
    if dn.dims() != [e, d, f2 / 2] {
        return Err(Error::ShapeMismatch { op, lhs: gu.shape().clone(), rhs: dn.shape().clone() });
    }
    // Only a recorded node needs the pre-activations `h` and the activations `a`: without one the
    // fused forward never materialises them (see `ops::moe_swiglu_experts_forward`).
    let record = crate::is_grad_enabled() && [x_sorted, gate_up, down].iter().any(|v| v.requires_grad());
    let (y, saved) =
        ops::moe_swiglu_experts_forward(x_sorted.tensor(), gu, dn, &plan.expert_offsets, record)?;
    let Some((h, a)) = saved else { return Ok(Var::constant(y)) };
    let node = SwigluOp { offsets: plan.expert_offsets.clone(), h, a };
    Ok(single(Var::apply_custom(node, &[x_sorted, gate_up, down], vec![y])))
}
