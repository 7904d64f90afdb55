//! Routing strategies: how tokens meet experts. Each is a small type behind [`RoutingStrategy`];
//! the layer owns the experts and hands them to the strategy with the tokens.
//!
//! | strategy | type | router parameters |
//! |---|---|---|
//! | sparse top-k (Mixtral) | [`TopKRouting`] | `gate.weight (E, d)` |
//! | Switch (top-1 + capacity) | [`SwitchRouting`] | `gate.weight (E, d)` |
//! | dense gated (every expert) | [`DenseGatedRouting`] | `gate.weight (E, d)` |
//! | hash of the token id | [`HashRouting`] | none |
//! | expert choice | [`ExpertChoiceRouting`] | `gate.weight (E, d)` |
//! | soft MoE (slots) | [`SoftMoeRouting`] | `gate.weight (E·S, d)` |
//! | hierarchical (group, then expert) | [`HierarchicalRouting`] | `group_gate.weight (G, d)`, `gate.weight (E, d)` |
//! | multi-task (one gate per task) | [`MultiTaskRouting`] | `gates.{j}.weight (E, d)` per task |
//! | group-limited greedy (DeepSeek-V2) | [`GroupLimitedRouting`] | `gate.weight (E, d)` |

use moeba_autograd::fused::moe as fused;
use moeba_autograd::Var;
use moeba_kernels::ops::{self, MoeScoreFn, TopkGatingOptions};
use moeba_tensor::{Error, Result, Tensor};

use super::config::{MoeConfig, RoutingKind};
use super::experts::dispatch;
use super::layer::MoeContext;
use super::losses::{
    load_balancing_loss, routed_usage, router_z_loss, usage_variance_loss, AuxLosses, LbConvention,
};
use super::stats::RoutingStats;

mod dense;
mod expert_choice;
pub(crate) mod group_limited;
mod hash;
mod hierarchical;
mod multi_task;
mod soft;
mod switch;
mod topk;

pub use dense::DenseGatedRouting;
pub use expert_choice::ExpertChoiceRouting;
pub use group_limited::{group_limited_gating, GroupLimitedGating, GroupLimitedRouting};
pub use hash::{hash_expert, HashRouting};
pub use hierarchical::HierarchicalRouting;
pub use multi_task::MultiTaskRouting;
pub use soft::SoftMoeRouting;
pub use switch::SwitchRouting;
pub use topk::TopKRouting;

/// A router parameter a strategy needs: its name under the layer's path and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterParamSpec {
    /// The dotted name under the layer's path (e.g. `gate.weight`).
    pub name: String,
    /// The shape.
    pub shape: Vec<usize>,
}

impl RouterParamSpec {
    /// A spec from a name and a shape.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        RouterParamSpec { name: name.into(), shape: shape.to_vec() }
    }
}

/// What a strategy is given for one forward.
pub struct RouteInput<'a> {
    /// The tokens `(T, d)`, `T = batch · seq`, row-major over (batch, seq).
    pub x: &'a Var,
    /// The router's input `(T, d)`: `x`, or `x` with training jitter.
    pub router_x: &'a Var,
    /// Sequences in the batch (1 for `(T, d)` input).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// The router parameters, in the order of [`RoutingStrategy::router_params`].
    pub router: &'a [Var],
    /// `experts.gate_up_proj (E, 2f, d)`.
    pub gate_up: &'a Var,
    /// `experts.down_proj (E, d, f)`.
    pub down: &'a Var,
    /// The layer's configuration.
    pub cfg: &'a MoeConfig,
    /// Per-call context (training flag, token and task ids, causal use).
    pub ctx: &'a MoeContext,
    /// The aux-loss-free selection bias `(E)`, if the layer balances by bias.
    pub selection_bias: Option<&'a Tensor>,
}

impl RouteInput<'_> {
    /// The number of tokens `T`.
    pub fn tokens(&self) -> usize {
        self.x.dims()[0]
    }

    /// Router parameter `i`, or an error naming the strategy.
    pub fn router_param(&self, strategy: &'static str, i: usize) -> Result<&Var> {
        self.router.get(i).ok_or_else(|| {
            Error::invalid(
                "MoeLayer::forward",
                "weights.router",
                format!("{strategy} routing needs router parameter {i}, {} given", self.router.len()),
            )
        })
    }
}

/// What a strategy returns: the routed output and the values the layer passes on.
pub struct Routed {
    /// The routed experts' output `(T, d)` (without the shared expert).
    pub out: Var,
    /// Per-task outputs `(T, d)` (multi-task strategies only; empty otherwise).
    pub task_outputs: Vec<Var>,
    /// The auxiliary losses.
    pub aux: AuxLosses,
    /// The routing statistics.
    pub stats: RoutingStats,
    /// `(T, k)` U32: the experts chosen per token, for strategies where tokens choose (top-k,
    /// Switch, dense, hash, hierarchical); `None` otherwise.
    pub assignment: Option<Tensor>,
}

/// A routing strategy: which router parameters it needs and how it sends tokens to experts.
pub trait RoutingStrategy: Send + Sync + std::fmt::Debug {
    /// The strategy's name (messages, logs).
    fn name(&self) -> &'static str;

    /// The router parameters it needs for `cfg`, created by the layer under its path.
    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec>;

    /// Routes the tokens of `input` through the experts.
    fn route(&self, input: &RouteInput) -> Result<Routed>;
}

/// The strategy type for a [`RoutingKind`].
pub fn strategy_for(kind: &RoutingKind) -> Box<dyn RoutingStrategy> {
    match *kind {
        RoutingKind::TopK => Box::new(TopKRouting),
        RoutingKind::Switch => Box::new(SwitchRouting),
        RoutingKind::DenseGated => Box::new(DenseGatedRouting),
        RoutingKind::Hash { seed } => Box::new(HashRouting { seed }),
        RoutingKind::ExpertChoice => Box::new(ExpertChoiceRouting),
        RoutingKind::Soft { slots_per_expert } => Box::new(SoftMoeRouting { slots_per_expert }),
        RoutingKind::Hierarchical { num_groups } => Box::new(HierarchicalRouting { num_groups }),
        RoutingKind::MultiTask { num_tasks } => Box::new(MultiTaskRouting { num_tasks }),
        RoutingKind::GroupLimited { num_groups, topk_groups } => {
            Box::new(GroupLimitedRouting { num_groups, topk_groups })
        }
    }
}

/// `x (T, d) · wᵀ` for a router weight `w (n, d)`: logits `(T, n)`.
pub(crate) fn router_logits(x: &Var, w: &Var) -> Result<Var> {
    x.matmul(&w.t()?)
}

/// The shared top-k path: gate the logits, plan (with an optional capacity), dispatch to the
/// experts, and collect losses and stats. `opts` sets k, the score, renormalisation, scaling.
pub(crate) fn topk_route(
    input: &RouteInput,
    logits: &Var,
    opts: &TopkGatingOptions,
    capacity: Option<usize>,
    selection_bias: Option<&Tensor>,
) -> Result<Routed> {
    let cfg = input.cfg;
    let t = input.tokens();
    let e = cfg.num_experts;
    let gv = fused::topk_gating(logits, selection_bias, opts)?;
    let plan = ops::moe_plan_from_topk(&gv.indices, e, capacity)?;
    let out = dispatch(input.x, &gv.weights, &plan, input.gate_up, input.down)?;
    let aux = topk_aux(&gv.mean_score, &gv.counts, &gv.lse, &gv.weights, &gv.indices, t, opts.k, e)?;
    let counts = gv.counts.to_vec_f64()?;
    let kept = plan.expert_rows()?.into_iter().map(|r| r as f64).collect();
    let stats = RoutingStats::new(t, counts, kept, plan.dropped, Some(&gv.scores))?;
    Ok(Routed { out, task_outputs: Vec::new(), aux, stats, assignment: Some(gv.indices) })
}

/// The three aux losses of a top-k gate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn topk_aux(
    mean_score: &Var,
    counts: &Tensor,
    lse: &Var,
    weights: &Var,
    indices: &Tensor,
    tokens: usize,
    k: usize,
    num_experts: usize,
) -> Result<AuxLosses> {
    let lb = load_balancing_loss(mean_score, counts, tokens, k, LbConvention::Switch)?;
    let z = router_z_loss(lse)?;
    let usage = routed_usage(weights, indices, num_experts)?;
    Ok(AuxLosses { lb_loss: Some(lb), z_loss: Some(z), usage_var_loss: Some(usage_variance_loss(&usage)?) })
}

/// The gating options of the config: k, score, renormalisation, routed scaling.
pub(crate) fn gating_options(cfg: &MoeConfig) -> TopkGatingOptions {
    TopkGatingOptions {
        k: cfg.experts_per_tok,
        score: cfg.score,
        renormalize: cfg.normalize_topk,
        scaling: cfg.routed_scaling,
    }
}

/// The standard router parameter `gate.weight (E, d)`.
pub(crate) fn gate_spec(cfg: &MoeConfig) -> Vec<RouterParamSpec> {
    vec![RouterParamSpec::new("gate.weight", &[cfg.num_experts, cfg.d_model])]
}

/// Softmax options with no renormalisation or scaling (dense gates, group gates).
pub(crate) fn plain_softmax(k: usize) -> TopkGatingOptions {
    TopkGatingOptions { k, score: MoeScoreFn::Softmax, renormalize: false, scaling: 1.0 }
}

/// Per-token ids (`token_ids` or `task_ids`) of the context as host values, checked against
/// the input's `(batch, seq)` or `(T)` layout.
pub(crate) fn per_token_ids(name: &'static str, ids: &Tensor, batch: usize, seq: usize) -> Result<Vec<u64>> {
    let t = batch * seq;
    let ok = ids.dims() == [t] || ids.dims() == [batch, seq];
    if !ok || ids.dtype().is_float() {
        return Err(Error::invalid(
            "MoeLayer::forward",
            name,
            format!(
                "{name} must be u32 or i64 of shape ({t}) or ({batch}, {seq}), got {} {}",
                ids.dtype(),
                ids.shape()
            ),
        ));
    }
    let v = ids.to_vec_f64()?;
    v.into_iter()
        .enumerate()
        .map(|(i, x)| {
            if x < 0.0 {
                Err(Error::invalid("MoeLayer::forward", name, format!("{name}[{i}] = {x} is negative")))
            } else {
                Ok(x as u64)
            }
        })
        .collect()
}
