//! Sparse top-k routing (Mixtral, Qwen2-MoE, DeepSeek-V3 with sigmoid scores and a selection bias).

use moeba_tensor::Result;

use super::{
    gate_spec, gating_options, router_logits, topk_route, RouteInput, Routed, RouterParamSpec,
    RoutingStrategy,
};
use crate::moe::config::MoeConfig;

/// Each token goes to its `experts_per_tok` highest-scoring experts; the combine weights are the
/// chosen scores (renormalised when `normalize_topk`, times `routed_scaling`). Dropless unless
/// `capacity_factor` is set, in which case each expert keeps at most `ceil(cf · T · k / E)` rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct TopKRouting;

impl RoutingStrategy for TopKRouting {
    fn name(&self) -> &'static str {
        "topk"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        gate_spec(cfg)
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let logits = router_logits(input.router_x, input.router_param(self.name(), 0)?)?;
        let capacity = input.cfg.capacity(input.tokens());
        topk_route(input, &logits, &gating_options(input.cfg), capacity, input.selection_bias)
    }
}
