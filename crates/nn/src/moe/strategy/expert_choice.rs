//! Expert-choice routing (Zhou et al. 2022): each expert picks its top tokens.

use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_tensor::{Result, Tensor};

use super::{gate_spec, router_logits, RouteInput, Routed, RouterParamSpec, RoutingStrategy};
use crate::moe::config::{capacity_for, MoeConfig};
use crate::moe::experts::dispatch;
use crate::moe::losses::{router_z_loss, AuxLosses};
use crate::moe::stats::RoutingStats;

/// Scores `S = softmax(x Wᵀ)` over experts per token; expert `e` takes the `C` tokens with the
/// highest `S[:, e]` (ties to the earlier token), `C = min(T, ceil(cf · T · k / E))` with
/// `cf = capacity_factor` (default 1.0) and `k = experts_per_tok`; its output for token `t` is
/// weighted by `S[t, e]`. Every expert gets exactly `C` tokens (perfect balance by
/// construction); a token may be taken by several experts or by none (counted in
/// [`RoutingStats::dropped`](crate::moe::RoutingStats) as tokens no expert picked).
/// It looks at all tokens of the batch to choose, so it is not causal. Aux losses: the z-loss only.
///
/// The per-expert top-C selection runs on the host over the `(T, E)` scores.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExpertChoiceRouting;

impl ExpertChoiceRouting {
    /// The capacity `C` for `tokens` tokens under `cfg`.
    pub fn capacity(cfg: &MoeConfig, tokens: usize) -> usize {
        capacity_for(cfg.capacity_factor.unwrap_or(1.0), tokens, cfg.experts_per_tok, cfg.num_experts)
            .min(tokens)
    }
}

impl RoutingStrategy for ExpertChoiceRouting {
    fn name(&self) -> &'static str {
        "expert_choice"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        gate_spec(cfg)
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let cfg = input.cfg;
        let (e, t) = (cfg.num_experts, input.tokens());
        let logits = router_logits(input.router_x, input.router_param(self.name(), 0)?)?;
        let scores = logits.softmax(1)?;
        let c = Self::capacity(cfg, t);
        let s = ops::contiguous(scores.tensor())?.to_vec_f64()?;
        let mut token_ids = Vec::with_capacity(e * c);
        let mut picked = vec![false; t];
        let mut order: Vec<usize> = (0..t).collect();
        for ex in 0..e {
            order.sort_by(|&a, &b| s[b * e + ex].total_cmp(&s[a * e + ex]).then(a.cmp(&b)));
            for &tok in &order[..c] {
                token_ids.push(tok as u32);
                picked[tok] = true;
            }
        }
        let device = input.x.device();
        let ids = Tensor::from_vec(token_ids, (e, c), device)?;
        let plan = ops::moe_plan_from_expert_choice(&ids, t)?;
        // Combine weights (E, C): the chosen tokens' scores for each expert.
        let weights = scores.t()?.gather(1, &ids)?;
        let out = if t == 0 {
            Var::constant(Tensor::zeros(input.x.dims(), input.x.dtype(), device)?)
        } else {
            dispatch(input.x, &weights, &plan, input.gate_up, input.down)?
        };
        let z = if t == 0 { None } else { Some(router_z_loss(&lse_of(&logits)?)?) };
        let counts = vec![c as f64; e];
        let dropped = picked.iter().filter(|&&p| !p).count();
        let stats = RoutingStats::new(t, counts.clone(), counts, dropped, Some(scores.tensor()))?;
        Ok(Routed {
            out,
            task_outputs: Vec::new(),
            aux: AuxLosses { z_loss: z, ..Default::default() },
            stats,
            assignment: None,
        })
    }
}

/// The per-row logsumexp `(T)` of `logits (T, n)` as a Var: `logits - log_softmax(logits)`
/// (equal in every column), column 0.
pub(crate) fn lse_of(logits: &Var) -> Result<Var> {
    let t = logits.dims()[0];
    logits.sub(&logits.log_softmax(1)?)?.narrow(1, 0, 1)?.reshape(t)
}
