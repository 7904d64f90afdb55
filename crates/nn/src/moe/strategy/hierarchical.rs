//! Hierarchical MoE (Jordan & Jacobs 1994; the two-level gating of Shazeer et al. 2017): a
//! router over groups of experts, then a router inside the chosen group.

use moeba_autograd::fused::moe as fused;
use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_tensor::{Result, Tensor};

use super::{
    gating_options, plain_softmax, router_logits, topk_aux, RouteInput, Routed, RouterParamSpec,
    RoutingStrategy,
};
use crate::moe::config::MoeConfig;
use crate::moe::experts::dispatch;
use crate::moe::stats::RoutingStats;

/// Experts form `G` groups of `m = E / G` consecutive experts. Per token:
/// 1. the group router `group_gate.weight (G, d)` picks one group, `g* = argmax softmax(x W_gᵀ)`,
///    with weight `p(g*)`;
/// 2. the expert router `gate.weight (E, d)` scores only that group's experts (the others are
///    masked out before the score function) and picks `experts_per_tok` of them with the usual
///    options (renormalisation, scaling, selection bias), weights `p(e | g*)`;
/// 3. the combine weight is `p(g*) · p(e | g*)`.
///
/// Aux losses: the sums of the group router's and the expert router's load-balancing, z- and
/// usage-variance losses. Dropless unless `capacity_factor` is set.
#[derive(Debug, Clone, Copy)]
pub struct HierarchicalRouting {
    /// Number of groups `G` (divides E).
    pub num_groups: usize,
}

impl RoutingStrategy for HierarchicalRouting {
    fn name(&self) -> &'static str {
        "hierarchical"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        vec![
            RouterParamSpec::new("group_gate.weight", &[self.num_groups, cfg.d_model]),
            RouterParamSpec::new("gate.weight", &[cfg.num_experts, cfg.d_model]),
        ]
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let cfg = input.cfg;
        let (e, g, t) = (cfg.num_experts, self.num_groups.max(1), input.tokens());
        let m = e / g;
        let group_logits = router_logits(input.router_x, input.router_param(self.name(), 0)?)?;
        let expert_logits = router_logits(input.router_x, input.router_param(self.name(), 1)?)?;
        let gg = fused::topk_gating(&group_logits, None, &plain_softmax(1))?;
        // mask[t, e] = (group of e) != chosen group of t, computed on the device.
        let dtype = expert_logits.dtype();
        let chosen = ops::to_dtype(&gg.indices, dtype)?; // (T, 1)
        let group_of: Vec<f64> = (0..e).map(|i| (i / m) as f64).collect();
        let group_of = Tensor::from_vec(group_of, (1, e), &moeba_tensor::Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(expert_logits.device())?;
        let mask = ops::sub(&chosen, &group_of)?; // nonzero = other group
        let masked = expert_logits.masked_fill(&mask, -1e30)?;
        let opts = gating_options(cfg);
        let ev = fused::topk_gating(&masked, input.selection_bias, &opts)?;
        let weights = ev.weights.mul(&gg.weights)?; // (T, k) · (T, 1)
        let plan = ops::moe_plan_from_topk(&ev.indices, e, cfg.capacity(t))?;
        let out = dispatch(input.x, &weights, &plan, input.gate_up, input.down)?;
        let group_aux = topk_aux(&gg.mean_score, &gg.counts, &gg.lse, &gg.weights, &gg.indices, t, 1, g)?;
        let expert_aux = topk_aux(
            &ev.mean_score,
            &ev.counts,
            &lse_unmasked(&expert_logits)?,
            &weights,
            &ev.indices,
            t,
            opts.k,
            e,
        )?;
        let aux = group_aux.add(&expert_aux)?;
        let kept = plan.expert_rows()?.into_iter().map(|r| r as f64).collect();
        let stats = RoutingStats::new(t, ev.counts.to_vec_f64()?, kept, plan.dropped, Some(&ev.scores))?;
        Ok(Routed { out, task_outputs: Vec::new(), aux, stats, assignment: Some(ev.indices) })
    }
}

/// The z-loss input of the expert router: the logsumexp of the unmasked logits.
fn lse_unmasked(logits: &Var) -> Result<Var> {
    super::expert_choice::lse_of(logits)
}
