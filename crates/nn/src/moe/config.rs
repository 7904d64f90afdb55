//! [`MoeConfig`]: everything that shapes an MoE layer, with [`MoeConfig::validate`].

use moeba_kernels::ops::MoeScoreFn;
use moeba_tensor::{Error, Result};

/// Which routing strategy a layer uses (see [`crate::moe::strategy`] for each one's definition).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingKind {
    /// Sparse top-k (Mixtral, Qwen2-MoE, DeepSeek): each token picks its `experts_per_tok` best experts.
    TopK,
    /// Switch: top-1 with a capacity per expert (`capacity_factor`, default 1.0); overflow tokens
    /// are dropped (their routed output is zero) and counted.
    Switch,
    /// Dense gated MoE: every expert runs on every token, `y = Σ_i g_i(x) f_i(x)` with softmax gates.
    DenseGated,
    /// Hash routing: a fixed hash of the token id (salted with `seed`, one per layer) picks the
    /// experts; there is no learned router and the input's values are ignored.
    Hash {
        /// The per-layer salt of the hash.
        seed: u64,
    },
    /// Expert choice: each expert takes exactly its capacity `C = ceil(cf · T · k / E)` of tokens,
    /// the ones with the highest router scores for it (cf = `capacity_factor`, default 1.0).
    ExpertChoice,
    /// Soft MoE: each expert processes `slots_per_expert` slots, each slot a softmax mixture of all
    /// tokens of a sequence, and each token's output is a softmax mixture of all slots' outputs.
    /// It mixes across positions: causal use is an error.
    Soft {
        /// Slots per expert (≥ 1).
        slots_per_expert: usize,
    },
    /// Hierarchical: a router over `num_groups` groups of consecutive experts picks one group per
    /// token, then the expert router picks `experts_per_tok` experts inside it; the combine
    /// weight is `p(group) · p(expert | group)`.
    Hierarchical {
        /// Number of expert groups (divides `num_experts`).
        num_groups: usize,
    },
    /// Multi-task (multi-gate) MoE: one top-k gate per task over the shared experts; every task's
    /// output is returned separately, and each token's `out` row is its own task's output.
    MultiTask {
        /// Number of tasks (gates).
        num_tasks: usize,
    },
    /// Group-limited greedy (DeepSeek-V2's `group_limited_greedy`): the experts form `num_groups`
    /// groups of consecutive experts; a group's score is its best expert's score, each token keeps
    /// its `topk_groups` best groups and picks `experts_per_tok` experts among them (ties: lower
    /// index). Weights are the scores over all experts (see
    /// [`crate::moe::strategy::GroupLimitedRouting`]).
    GroupLimited {
        /// Number of expert groups (divides `num_experts`).
        num_groups: usize,
        /// Groups kept per token (`1..=num_groups`).
        topk_groups: usize,
    },
}

impl RoutingKind {
    /// The strategy's name in messages and benchmark tables.
    pub fn name(&self) -> &'static str {
        match self {
            RoutingKind::TopK => "topk",
            RoutingKind::Switch => "switch",
            RoutingKind::DenseGated => "dense_gated",
            RoutingKind::Hash { .. } => "hash",
            RoutingKind::ExpertChoice => "expert_choice",
            RoutingKind::Soft { .. } => "soft",
            RoutingKind::Hierarchical { .. } => "hierarchical",
            RoutingKind::MultiTask { .. } => "multi_task",
            RoutingKind::GroupLimited { .. } => "group_limited",
        }
    }
}

/// The configuration of an MoE feed-forward layer ([`crate::moe::MoeLayer`]).
///
/// The defaults ([`MoeConfig::new`]) are Mixtral's: softmax scores, top-k renormalised, no
/// shared expert, dropless, no jitter, no bias balancing, sparse top-k routing.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Each routed expert's SwiGLU width `f`.
    pub d_ff: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Experts per token `k` (for expert choice: the average, which sets the capacity).
    pub experts_per_tok: usize,
    /// Whether a shared (always-on) SwiGLU expert runs beside the routed ones.
    pub shared_expert_enabled: bool,
    /// The shared expert's width (DeepSeek's `n_shared_experts · moe_intermediate_size`).
    pub shared_expert_d_ff: usize,
    /// Scale the shared expert by `sigmoid(x · shared_expert_gate)` per token (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// The shared expert's parameter prefix: `shared_expert` (Qwen2-MoE, the default) or
    /// `shared_experts` (DeepSeek).
    pub shared_expert_name: String,
    /// Router score: softmax (Mixtral, Qwen2-MoE) or sigmoid (DeepSeek-V3).
    pub score: MoeScoreFn,
    /// Renormalise the selected top-k weights to sum to 1 (Mixtral `true`; Qwen1.5-MoE `false`).
    pub normalize_topk: bool,
    /// Multiplier of the routed weights (DeepSeek's `routed_scaling_factor`; 1.0 otherwise).
    pub routed_scaling: f64,
    /// `None`: dropless (the default). `Some(cf)`: each expert keeps at most
    /// `ceil(cf · T · k / E)` rows per forward (earlier tokens first); the rest are dropped.
    pub capacity_factor: Option<f64>,
    /// Multiplicative jitter on the router input in training: `x · U(1 - j, 1 + j)` (0 = off).
    pub jitter_noise: f64,
    /// Aux-loss-free balancing (DeepSeek-V3): `Some(rate)` keeps a per-expert selection bias
    /// updated by `rate · sign(mean load - load)` after each step.
    pub bias_balancing: Option<f64>,
    /// The routing strategy.
    pub strategy: RoutingKind,
    /// Weight of the load-balancing loss in [`crate::moe::AuxLosses::weighted_total`].
    pub lb_loss_alpha: f64,
    /// Weight of the router z-loss in the weighted total.
    pub z_loss_alpha: f64,
    /// Weight of the variance-of-usage loss in the weighted total.
    pub usage_var_alpha: f64,
}

impl MoeConfig {
    /// Mixtral-style defaults for the given sizes (see the type's docs).
    pub fn new(d_model: usize, d_ff: usize, num_experts: usize, experts_per_tok: usize) -> Self {
        MoeConfig {
            d_model,
            d_ff,
            num_experts,
            experts_per_tok,
            shared_expert_enabled: false,
            shared_expert_d_ff: 0,
            shared_expert_gate: false,
            shared_expert_name: "shared_expert".into(),
            score: MoeScoreFn::Softmax,
            normalize_topk: true,
            routed_scaling: 1.0,
            capacity_factor: None,
            jitter_noise: 0.0,
            bias_balancing: None,
            strategy: RoutingKind::TopK,
            lb_loss_alpha: 0.01,
            z_loss_alpha: 0.0,
            usage_var_alpha: 0.0,
        }
    }

    /// The same config with another routing strategy.
    pub fn with_strategy(mut self, strategy: RoutingKind) -> Self {
        self.strategy = strategy;
        self
    }

    /// The same config with a shared SwiGLU expert of width `d_ff` (optionally sigmoid-gated).
    pub fn with_shared_expert(mut self, d_ff: usize, gated: bool) -> Self {
        self.shared_expert_enabled = true;
        self.shared_expert_d_ff = d_ff;
        self.shared_expert_gate = gated;
        self
    }

    /// Checks every key; the error names the key, its value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &'static str, msg: String| Err(Error::invalid("MoeConfig::validate", arg, msg));
        if self.d_model == 0 {
            return bad("d_model", "must be at least 1".into());
        }
        if self.d_ff == 0 {
            return bad("d_ff", "must be at least 1".into());
        }
        if self.num_experts == 0 {
            return bad("num_experts", "zero experts: an MoE layer needs at least 1".into());
        }
        if self.experts_per_tok == 0 {
            return bad("experts_per_tok", "must be at least 1".into());
        }
        if self.experts_per_tok > self.num_experts {
            return bad(
                "experts_per_tok",
                format!(
                    "experts_per_tok {} > num_experts {}: a token cannot pick more experts than exist",
                    self.experts_per_tok, self.num_experts
                ),
            );
        }
        if self.shared_expert_enabled && self.shared_expert_d_ff == 0 {
            return bad(
                "shared_expert_d_ff",
                "is 0 while shared_expert_enabled is true; HINT: set it or disable the shared expert".into(),
            );
        }
        if self.shared_expert_gate && !self.shared_expert_enabled {
            return bad("shared_expert_gate", "is set but shared_expert_enabled is false".into());
        }
        if self.shared_expert_name.is_empty() {
            return bad("shared_expert_name", "must not be empty".into());
        }
        if !(self.routed_scaling.is_finite() && self.routed_scaling > 0.0) {
            return bad("routed_scaling", format!("must be finite and > 0, got {}", self.routed_scaling));
        }
        if let Some(cf) = self.capacity_factor {
            if !(cf.is_finite() && cf > 0.0) {
                return bad(
                    "capacity_factor",
                    format!("must be finite and > 0 (or None: dropless), got {cf}"),
                );
            }
        }
        if !(self.jitter_noise.is_finite() && (0.0..1.0).contains(&self.jitter_noise)) {
            return bad("jitter_noise", format!("must be in [0, 1), got {}", self.jitter_noise));
        }
        if let Some(rate) = self.bias_balancing {
            if !(rate.is_finite() && rate > 0.0) {
                return bad("bias_balancing", format!("the update rate must be finite and > 0, got {rate}"));
            }
        }
        for (arg, v) in [
            ("lb_loss_alpha", self.lb_loss_alpha),
            ("z_loss_alpha", self.z_loss_alpha),
            ("usage_var_alpha", self.usage_var_alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(arg, format!("must be finite and >= 0, got {v}"));
            }
        }
        match self.strategy {
            RoutingKind::Switch if self.experts_per_tok != 1 => {
                return bad(
                    "experts_per_tok",
                    format!("Switch routing is top-1, got experts_per_tok {}", self.experts_per_tok),
                )
            }
            RoutingKind::Soft { slots_per_expert: 0 } => {
                return bad("strategy", "soft MoE needs slots_per_expert >= 1".into())
            }
            RoutingKind::Hierarchical { num_groups } => {
                if num_groups == 0 || !self.num_experts.is_multiple_of(num_groups) {
                    return bad(
                        "strategy",
                        format!(
                            "hierarchical num_groups {num_groups} must be >= 1 and divide num_experts {}",
                            self.num_experts
                        ),
                    );
                }
                let per_group = self.num_experts / num_groups;
                if self.experts_per_tok > per_group {
                    return bad(
                        "experts_per_tok",
                        format!(
                            "hierarchical routing picks experts_per_tok {} inside one group of {per_group} experts",
                            self.experts_per_tok
                        ),
                    );
                }
            }
            RoutingKind::MultiTask { num_tasks: 0 } => {
                return bad("strategy", "multi-task MoE needs num_tasks >= 1".into())
            }
            RoutingKind::GroupLimited { num_groups, topk_groups } => {
                super::strategy::group_limited::check_groups(
                    "MoeConfig::validate",
                    self.num_experts,
                    num_groups,
                    topk_groups,
                    self.experts_per_tok,
                )?;
            }
            _ => {}
        }
        if self.bias_balancing.is_some()
            && !matches!(
                self.strategy,
                RoutingKind::TopK | RoutingKind::Switch | RoutingKind::Hierarchical { .. }
            )
        {
            return bad(
                "bias_balancing",
                format!(
                    "selection-bias balancing applies to top-k style routers, not to {}",
                    self.strategy.name()
                ),
            );
        }
        Ok(())
    }

    /// The per-expert capacity `ceil(cf · tokens · k / E)` (at least 1) for `tokens` tokens, or
    /// `None` when dropless.
    pub fn capacity(&self, tokens: usize) -> Option<usize> {
        self.capacity_factor.map(|cf| capacity_for(cf, tokens, self.experts_per_tok, self.num_experts))
    }
}

/// `ceil(cf · tokens · k / experts)`, at least 1.
pub fn capacity_for(cf: f64, tokens: usize, k: usize, experts: usize) -> usize {
    ((cf * tokens as f64 * k as f64 / experts.max(1) as f64).ceil() as usize).max(1)
}
