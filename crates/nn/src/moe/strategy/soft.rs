//! Soft MoE (Puigcerver et al. 2023): experts process slots, each a softmax mixture of tokens.

use moeba_autograd::fused::moe as fused;
use moeba_kernels::ops::MoeRoutingPlan;
use moeba_tensor::{Error, Result, Tensor};

use super::{RouteInput, Routed, RouterParamSpec, RoutingStrategy};
use crate::moe::config::MoeConfig;
use crate::moe::losses::AuxLosses;
use crate::moe::stats::RoutingStats;

/// Per sequence of `l` tokens, with `n = E · S` slots (`S = slots_per_expert`) and
/// `logits = x Φᵀ (l, n)` (`Φ = gate.weight (n, d)`):
/// - dispatch weights `D = softmax(logits)` over the **tokens** (each slot is a convex mixture of
///   the sequence's tokens), slot inputs `X̃ = Dᵀ x (n, d)`;
/// - expert `e` processes slots `e·S .. (e+1)·S`: `Ỹ = f_e(X̃)`;
/// - combine weights `C = softmax(logits)` over the **slots**, output `y = C Ỹ (l, d)`.
///
/// Every token influences every slot, so token t's output depends on later tokens: a causal
/// language model must not use it ([`MoeContext::causal`](crate::moe::MoeContext) makes the
/// forward an error). No tokens are dropped and no aux losses are needed. (The paper also
/// L2-normalises x and Φ with a learned scale; this is the unnormalised form.)
#[derive(Debug, Clone, Copy)]
pub struct SoftMoeRouting {
    /// Slots per expert `S` (≥ 1).
    pub slots_per_expert: usize,
}

impl RoutingStrategy for SoftMoeRouting {
    fn name(&self) -> &'static str {
        "soft"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        vec![RouterParamSpec::new("gate.weight", &[cfg.num_experts * self.slots_per_expert, cfg.d_model])]
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        if input.ctx.causal {
            return Err(Error::invalid(
                "MoeLayer::forward",
                "causal",
                "soft MoE mixes every token of a sequence into every slot, so a token's output depends \
                 on later tokens: it cannot be used in a causal model. HINT: use top-k, Switch, hash \
                 or dense routing there, or set MoeContext::causal = false for a non-causal encoder",
            ));
        }
        let cfg = input.cfg;
        let (e, s, d) = (cfg.num_experts, self.slots_per_expert, cfg.d_model);
        let (b, l) = (input.batch, input.seq);
        let n = e * s;
        let phi = input.router_param(self.name(), 0)?;
        let x = input.x.reshape((b, l, d))?;
        let logits = input.router_x.matmul(&phi.t()?)?.reshape((b, l, n))?;
        let dispatch_w = logits.softmax(1)?; // over tokens
        let combine_w = logits.softmax(2)?; // over slots
        let slots = dispatch_w.transpose(1, 2)?.matmul(&x)?; // (b, n, d)
                                                             // Rows grouped by expert: (b, E, S, d) -> (E, b, S, d).
        let rows =
            slots.reshape((b, e, s, d))?.permute(&[1, 0, 2, 3])?.contiguous()?.reshape((e * b * s, d))?;
        let plan = slot_plan(e, b * s, input.x.device())?;
        let y = fused::swiglu_experts(&rows, input.gate_up, input.down, &plan)?;
        let y = y.reshape((e, b, s, d))?.permute(&[1, 0, 2, 3])?.contiguous()?.reshape((b, n, d))?;
        let out = combine_w.matmul(&y)?.reshape((b * l, d))?;
        let counts = vec![(b * s) as f64; e];
        let combine_flat = combine_w.tensor().reshape((b * l, n))?;
        let stats = RoutingStats::new(b * l, counts.clone(), counts, 0, Some(&combine_flat))?;
        Ok(Routed { out, task_outputs: Vec::new(), aux: AuxLosses::default(), stats, assignment: None })
    }
}

/// The plan of `e` experts with `per_expert` consecutive rows each, already in expert order.
fn slot_plan(e: usize, per_expert: usize, device: &moeba_tensor::Device) -> Result<MoeRoutingPlan> {
    let r = e * per_expert;
    let offsets: Vec<i64> = (0..=e).map(|i| (i * per_expert) as i64).collect();
    let rows: Vec<u32> = (0..r as u32).collect();
    Ok(MoeRoutingPlan {
        num_tokens: r,
        num_experts: e,
        expert_offsets: Tensor::from_vec(offsets, e + 1, device)?,
        row_token: Tensor::from_vec(rows.clone(), r, device)?,
        row_slot: Tensor::from_vec(rows, r, device)?,
        dropped: 0,
    })
}
