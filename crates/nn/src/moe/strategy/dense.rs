//! Dense gated MoE (Jacobs et al. 1991; Shazeer et al. 2017 without sparsity): every expert runs.

use moeba_tensor::Result;

use super::{
    gate_spec, plain_softmax, router_logits, topk_route, RouteInput, Routed, RouterParamSpec, RoutingStrategy,
};
use crate::moe::config::MoeConfig;

/// The classic formulation `y = Σ_i g_i(x) f_i(x)` with `g = softmax(x Wᵀ)` over all experts:
/// every expert processes every token (no selection, no capacity; `experts_per_tok` is ignored
/// and `routed_scaling` multiplies the gates).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseGatedRouting;

impl RoutingStrategy for DenseGatedRouting {
    fn name(&self) -> &'static str {
        "dense_gated"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        gate_spec(cfg)
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let logits = router_logits(input.router_x, input.router_param(self.name(), 0)?)?;
        let mut opts = plain_softmax(input.cfg.num_experts);
        opts.scaling = input.cfg.routed_scaling;
        topk_route(input, &logits, &opts, None, None)
    }
}
