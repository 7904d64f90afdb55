//! Group-limited greedy routing (DeepSeek-V2's `topk_method = "group_limited_greedy"`, the
//! "device-limited routing" of the DeepSeek-V2 paper): each token first keeps its best groups of
//! experts, then picks its top-k experts among those groups only.

use moeba_autograd::fused::moe::{self as fused, GatingVars};
use moeba_autograd::Var;
use moeba_kernels::ops::{self, MoeScoreFn, TopkGatingOptions};
use moeba_tensor::{DType, Device, Error, Result, Tensor};

use super::{
    gate_spec, gating_options, router_logits, topk_aux, RouteInput, Routed, RouterParamSpec, RoutingStrategy,
};
use crate::moe::config::MoeConfig;
use crate::moe::experts::dispatch;
use crate::moe::stats::RoutingStats;

/// Added to the sum of the chosen scores before renormalising (as the top-k gating kernel).
const RENORM_EPS: f64 = 1e-20;

/// Experts form `G = num_groups` groups of `m = E / G` consecutive experts; the router is the
/// usual `gate.weight (E, d)`. Per token:
/// 1. every expert's score `s_e` = softmax (or sigmoid) of the logits over **all** experts;
/// 2. a group's score is the largest `s_e` of its experts; the `topk_groups` best groups are
///    kept (ties: lower group index first);
/// 3. the `experts_per_tok` best experts of the kept groups are chosen (ties: lower expert index
///    first), sorted by descending score;
/// 4. the combine weights are the chosen `s_e` (the scores over all experts, not renormalised
///    over the kept groups), renormalised over the chosen ones when `normalize_topk`, times
///    `routed_scaling`.
///
/// DeepSeek-V2 (HF transformers): softmax, `normalize_topk = false`, `routed_scaling =
/// routed_scaling_factor`. Aux losses as for top-k, with `P_e` the mean of the unmasked scores.
/// Dropless unless `capacity_factor` is set.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimitedRouting {
    /// Number of groups `G` (divides E).
    pub num_groups: usize,
    /// Groups kept per token (`1..=G`).
    pub topk_groups: usize,
}

/// What [`group_limited_gating`] returns.
#[derive(Debug, Clone)]
pub struct GroupLimitedGating {
    /// `(T, k)` U32: the chosen experts per token, by descending score (ties: lower index).
    pub indices: Tensor,
    /// `(T, k)`: their combine weights (see [`GroupLimitedRouting`]), on the tape.
    pub weights: Var,
    /// `(T, topk_groups)` U32: the kept groups per token, by descending group score (ties:
    /// lower group index).
    pub groups: Tensor,
    /// The gating of the unmasked logits (k = 1): every expert's score, their mean `P_e` and the
    /// logsumexp, for the aux losses and the statistics.
    pub full: GatingVars,
    /// `(E)`: assignments per expert (f64 for f64 logits, f32 otherwise, as top-k gating).
    pub counts: Tensor,
}

/// Group-limited top-k gating of `logits (T, E)`: `num_groups` groups of consecutive experts,
/// `topk_groups` kept per token, then `opts.k` experts among them; weights as documented on
/// [`GroupLimitedRouting`] (`opts` sets k, the score, renormalisation and scaling). Errors when
/// the groups do not divide E, `topk_groups` is not in `1..=num_groups`, or the kept groups hold
/// fewer than k experts.
///
/// The selection runs on the host from the logits: softmax and sigmoid are increasing, so
/// ranking groups by their best score and experts by their score is ranking them by logits,
/// with exact ties (broken towards the lower index). The weights are the scores over all experts
/// gathered at the chosen indices, on the tape.
pub fn group_limited_gating(
    logits: &Var,
    num_groups: usize,
    topk_groups: usize,
    opts: &TopkGatingOptions,
) -> Result<GroupLimitedGating> {
    const OP: &str = "group_limited_gating";
    if logits.rank() != 2 {
        return Err(Error::bad_shape(OP, logits.shape(), "logits must be (tokens, experts)"));
    }
    let (t, e) = (logits.dims()[0], logits.dims()[1]);
    check_groups(OP, e, num_groups, topk_groups, opts.k)?;
    if !opts.scaling.is_finite() {
        return Err(Error::invalid(OP, "scaling", format!("must be finite, got {}", opts.scaling)));
    }
    let (m, k) = (e / num_groups, opts.k);
    // The scores over all experts, their mean P_e and the logsumexp (losses, statistics).
    let plain = TopkGatingOptions { k: 1, score: opts.score, renormalize: false, scaling: 1.0 };
    let full = fused::topk_gating(logits, None, &plain)?;
    // `+ 0.0` turns -0 into +0, so that the total order below ties them as the scores do.
    let x: Vec<f64> = logits.tensor().to_vec_f64()?.into_iter().map(|v| v + 0.0).collect();
    let desc = |row: &[f64], a: usize, b: usize| row[b].total_cmp(&row[a]).then(a.cmp(&b));
    let mut groups = Vec::with_capacity(t * topk_groups);
    let mut chosen = Vec::with_capacity(t * k);
    let mut counts = vec![0f64; e];
    let mut gorder: Vec<usize> = (0..num_groups).collect();
    let mut cand: Vec<usize> = Vec::with_capacity(topk_groups * m);
    for row in x.chunks_exact(e.max(1)).take(t) {
        let best: Vec<f64> = row
            .chunks_exact(m)
            .map(|g| {
                g.iter().copied().fold(f64::NEG_INFINITY, |a, v| if v.total_cmp(&a).is_gt() { v } else { a })
            })
            .collect();
        gorder.sort_by(|&a, &b| desc(&best, a, b));
        cand.clear();
        for &g in &gorder[..topk_groups] {
            groups.push(g as u32);
            cand.extend(g * m..(g + 1) * m);
        }
        cand.sort_by(|&a, &b| desc(row, a, b));
        for &i in &cand[..k] {
            chosen.push(i as u32);
            counts[i] += 1.0;
        }
    }
    let device = logits.device();
    let indices = Tensor::from_vec(chosen, (t, k), &Device::Cpu)?.to_device(device)?;
    let groups = Tensor::from_vec(groups, (t, topk_groups), &Device::Cpu)?.to_device(device)?;
    let count_dtype = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let counts = Tensor::from_vec(counts, e, &Device::Cpu)?.to_dtype(count_dtype)?.to_device(device)?;
    let scores = match opts.score {
        MoeScoreFn::Softmax => logits.softmax(1)?,
        MoeScoreFn::Sigmoid => logits.sigmoid()?,
    };
    let mut weights = scores.gather(1, &indices)?;
    if opts.renormalize {
        let denom = weights.sum(&[1], true)?.affine(1.0, RENORM_EPS)?;
        weights = weights.div(&denom)?;
    }
    if opts.scaling != 1.0 {
        weights = weights.scale(opts.scaling)?;
    }
    Ok(GroupLimitedGating { indices, weights, groups, full, counts })
}

/// The argument checks shared by [`group_limited_gating`] and `MoeConfig::validate`.
pub(crate) fn check_groups(
    op: &'static str,
    num_experts: usize,
    num_groups: usize,
    topk_groups: usize,
    k: usize,
) -> Result<()> {
    if num_groups == 0 || !num_experts.is_multiple_of(num_groups) {
        return Err(Error::invalid(
            op,
            "num_groups",
            format!(
                "group-limited num_groups {num_groups} must be >= 1 and divide num_experts {num_experts}"
            ),
        ));
    }
    if topk_groups == 0 || topk_groups > num_groups {
        return Err(Error::invalid(
            op,
            "topk_groups",
            format!("group-limited topk_groups {topk_groups} must be in 1..={num_groups} (num_groups)"),
        ));
    }
    let kept = topk_groups * (num_experts / num_groups);
    if k == 0 || k > kept {
        return Err(Error::invalid(
            op,
            "experts_per_tok",
            format!(
                "group-limited routing picks experts_per_tok {k} among the {kept} experts of the \
                 {topk_groups} kept group(s) of {} experts; it must be in 1..={kept}",
                num_experts / num_groups
            ),
        ));
    }
    Ok(())
}

impl RoutingStrategy for GroupLimitedRouting {
    fn name(&self) -> &'static str {
        "group_limited"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        gate_spec(cfg)
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let cfg = input.cfg;
        let (e, t) = (cfg.num_experts, input.tokens());
        let logits = router_logits(input.router_x, input.router_param(self.name(), 0)?)?;
        let opts = gating_options(cfg);
        let g = group_limited_gating(&logits, self.num_groups, self.topk_groups, &opts)?;
        let plan = ops::moe_plan_from_topk(&g.indices, e, cfg.capacity(t))?;
        let out = dispatch(input.x, &g.weights, &plan, input.gate_up, input.down)?;
        let aux = topk_aux(&g.full.mean_score, &g.counts, &g.full.lse, &g.weights, &g.indices, t, opts.k, e)?;
        let kept = plan.expert_rows()?.into_iter().map(|r| r as f64).collect();
        let stats = RoutingStats::new(t, g.counts.to_vec_f64()?, kept, plan.dropped, Some(&g.full.scores))?;
        Ok(Routed { out, task_outputs: Vec::new(), aux, stats, assignment: Some(g.indices) })
    }
}
