//! Switch routing (Fedus et al. 2021): top-1 with a per-expert capacity; overflow is dropped.

use moeba_tensor::Result;

use super::{
    gate_spec, gating_options, router_logits, topk_route, RouteInput, Routed, RouterParamSpec,
    RoutingStrategy,
};
use crate::moe::config::{capacity_for, MoeConfig};

/// Each token goes to its single best expert, weighted by that expert's probability (not
/// renormalised: with k = 1 renormalising would make every weight 1 and stop the router's
/// gradient). Each expert processes at most `ceil(cf · T / E)` tokens (`cf = capacity_factor`,
/// default 1.0), earlier tokens first; the others are dropped: their routed output is zero (the
/// residual connection carries them) and [`RoutingStats::dropped`](crate::moe::RoutingStats) counts them.
#[derive(Debug, Clone, Copy, Default)]
pub struct SwitchRouting;

impl RoutingStrategy for SwitchRouting {
    fn name(&self) -> &'static str {
        "switch"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        gate_spec(cfg)
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let cfg = input.cfg;
        let logits = router_logits(input.router_x, input.router_param(self.name(), 0)?)?;
        let t = input.tokens();
        let capacity = capacity_for(cfg.capacity_factor.unwrap_or(1.0), t, 1, cfg.num_experts);
        let mut opts = gating_options(cfg);
        opts.k = 1;
        opts.renormalize = false;
        topk_route(input, &logits, &opts, Some(capacity), input.selection_bias)
    }
}
