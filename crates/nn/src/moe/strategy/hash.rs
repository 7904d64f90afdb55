//! Hash routing (Roller et al. 2021, "Hash Layers"): a fixed hash of the token id picks the experts.

use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Tensor};

use super::{per_token_ids, RouteInput, Routed, RouterParamSpec, RoutingStrategy};
use crate::moe::config::MoeConfig;
use crate::moe::experts::dispatch;
use crate::moe::losses::AuxLosses;
use crate::moe::stats::RoutingStats;

/// Expert `j` (of `k`) of token id `token` among `num_experts`, for the layer salt `seed`: the
/// SplitMix64 finaliser of `token ⊕ seed·φ ⊕ j·ψ`, modulo E. Fixed: the same inputs give the
/// same expert on every run and platform. (`k` distinct experts per token come from probing
/// upwards from each hash past experts already taken; see [`HashRouting`].)
pub fn hash_expert(token: u64, seed: u64, j: u64, num_experts: usize) -> usize {
    let mut z = token ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % num_experts.max(1) as u64) as usize
}

/// No learned router: token id `v` goes to experts `hash_expert(v, seed, j, E)` for
/// `j < experts_per_tok` (distinct; a collision moves to the next free expert), each with
/// weight `1 / k`. The token's values are never read by the routing, only its id
/// (`MoeContext::token_ids`, required). Different `seed`s (one per layer) give different
/// assignments. No aux losses (there is nothing to balance by gradient); dropless unless
/// `capacity_factor` is set.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashRouting {
    /// The per-layer salt.
    pub seed: u64,
}

impl HashRouting {
    /// The `k` distinct experts of token id `token`.
    pub fn experts_of(&self, token: u64, k: usize, num_experts: usize) -> Vec<usize> {
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        for j in 0..k.min(num_experts) {
            let mut e = hash_expert(token, self.seed, j as u64, num_experts);
            while chosen.contains(&e) {
                e = (e + 1) % num_experts;
            }
            chosen.push(e);
        }
        chosen
    }
}

impl RoutingStrategy for HashRouting {
    fn name(&self) -> &'static str {
        "hash"
    }

    fn router_params(&self, _cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        Vec::new()
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let cfg = input.cfg;
        let (e, k, t) = (cfg.num_experts, cfg.experts_per_tok, input.tokens());
        let ids = input.ctx.token_ids.as_ref().ok_or_else(|| {
            Error::invalid(
                "MoeLayer::forward",
                "token_ids",
                "hash routing needs the token ids: HINT: set MoeContext::token_ids",
            )
        })?;
        let ids = per_token_ids("token_ids", ids, input.batch, input.seq)?;
        let mut idx = Vec::with_capacity(t * k);
        for &v in &ids {
            idx.extend(self.experts_of(v, k, e).into_iter().map(|x| x as u32));
        }
        let device = input.x.device();
        let indices = Tensor::from_vec(idx.clone(), (t, k), device)?;
        let weights = Var::constant(Tensor::full(1.0 / k as f64, (t, k), input.x.dtype(), device)?);
        let plan = ops::moe_plan_from_topk(&indices, e, cfg.capacity(t))?;
        let out = dispatch(input.x, &weights, &plan, input.gate_up, input.down)?;
        let mut counts = vec![0.0; e];
        for &i in &idx {
            counts[i as usize] += 1.0;
        }
        let kept = plan.expert_rows()?.into_iter().map(|r| r as f64).collect();
        let stats = RoutingStats::new(t, counts, kept, plan.dropped, None)?;
        Ok(Routed {
            out,
            task_outputs: Vec::new(),
            aux: AuxLosses::default(),
            stats,
            assignment: Some(indices),
        })
    }
}
