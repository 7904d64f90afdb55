//! The TOML run configuration: a `[model]` table that describes a hybrid Mamba / attention / MoE
//! model and a `[trainer]` table that describes its training.
//!
//! Parsing rejects unknown keys (naming them, with the table they were in), and [`RunConfig::validate`]
//! rejects invalid combinations with an error naming the key (for example `experts_per_tok` larger
//! than `num_experts`, or a `mamba_layers` index past `num_layers`). Things that are legal but likely
//! mistakes (MoE with no balancing at all) come back as warnings for the trainer to print.
//!
//! Which mixer a layer uses is resolved, in order of precedence, from `layer_mixers` (one entry per
//! layer), `mamba_layers` (these indices use `mamba_kind`, the others attention), Jamba-style
//! `attn_layer_period` / `attn_layer_offset` (layer `i` is attention iff `i % period == offset`), or
//! `mixer` (every layer). Which layers get an MoE feed-forward comes from `moe_layers` (a list) or
//! `moe_every` / `moe_offset` (layer `i` iff `i % every == offset`); with `num_experts = 0` every layer
//! has a dense SwiGLU MLP. [`ModelConfig::layers`] gives the resolved plan.

use serde::{Deserialize, Serialize};

use crate::schedule::ScheduleKind;

/// The default run (`configs/tiny-hybrid.toml`): Mamba + attention + MoE layers on tiny
/// Shakespeare with the byte tokenizer. What `moeba train` with no argument trains.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/tiny-hybrid.toml");

/// A config that cannot be used, naming the key and what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse, or had an unknown key or a value of the wrong type.
    #[error("config: {0}")]
    Parse(String),
    /// A key has a value that is out of range or inconsistent with another key.
    #[error("config: `{key}`: {msg}")]
    Invalid {
        /// The key, with its table (`model.experts_per_tok`).
        key: String,
        /// What was wrong and, where it helps, how to fix it.
        msg: String,
    },
}

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), msg: msg.into() }
}

/// The token mixer of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixerKind {
    /// Mamba-1: selective scan (S6).
    Mamba,
    /// Mamba-2: chunked SSD.
    Mamba2,
    /// Grouped-query attention with RoPE.
    Attention,
    /// Multi-head latent attention (DeepSeek-V2).
    Mla,
}

impl MixerKind {
    /// Whether this is one of the state-space mixers.
    pub fn is_mamba(self) -> bool {
        matches!(self, MixerKind::Mamba | MixerKind::Mamba2)
    }
}

/// The feed-forward part of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// A dense SwiGLU MLP of `intermediate_size`.
    Mlp,
    /// A Mixture-of-Experts layer.
    Moe,
}

/// One layer of the resolved plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// The token mixer.
    pub mixer: MixerKind,
    /// The feed-forward.
    pub ffn: FfnKind,
}

/// How an MoE layer routes tokens to experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingStrategyKind {
    /// Sparse top-k (Mixtral).
    Topk,
    /// Top-1 with a capacity (Switch Transformer).
    Switch,
    /// Every expert runs, outputs weighted by the gate (the classic dense MoE).
    Dense,
    /// A fixed hash of the token id picks the expert; no learned router.
    Hash,
    /// Each expert picks its top tokens (not causal: it looks at the whole batch).
    ExpertChoice,
    /// Soft MoE (mixes positions: refused in a causal language model).
    Soft,
    /// A router over groups of experts, then a router inside the chosen group.
    Hierarchical,
}

/// The router's score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    /// Softmax over the experts (Mixtral, Qwen2-MoE, DeepSeek-V2).
    Softmax,
    /// Independent sigmoids (DeepSeek-V3).
    Sigmoid,
}

/// The `[model.routing]` table: how MoE layers route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// The routing strategy.
    pub strategy: RoutingStrategyKind,
    /// The score function.
    pub score: ScoreKind,
    /// Renormalise the selected weights to sum to 1.
    pub normalize: bool,
    /// Multiplies the routed weights (DeepSeek's routed_scaling_factor).
    pub routed_scaling: f64,
    /// Expert capacity as a multiple of the even share (`None`: dropless, the default).
    pub capacity_factor: Option<f64>,
    /// Multiplicative router jitter in training (0 = off).
    pub jitter_noise: f64,
    /// Auxiliary-loss-free balancing: the per-expert bias update rate (DeepSeek-V3; `None` = off).
    pub bias_balancing_rate: Option<f64>,
    /// Groups of experts for the hierarchical strategy.
    pub num_groups: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            strategy: RoutingStrategyKind::Topk,
            score: ScoreKind::Softmax,
            normalize: true,
            routed_scaling: 1.0,
            capacity_factor: None,
            jitter_noise: 0.0,
            bias_balancing_rate: None,
            num_groups: 1,
        }
    }
}

/// The `[model]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Tokens in the vocabulary (256 for the byte tokenizer).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Longest sequence the model is used on (training and generation).
    pub max_seq_len: usize,
    /// Share the embedding matrix with the LM head.
    pub tie_embeddings: bool,
    /// RMSNorm epsilon.
    pub norm_eps: f64,

    /// Every layer's mixer when nothing more specific is given.
    pub mixer: MixerKind,
    /// One mixer per layer (overrides everything else).
    pub layer_mixers: Option<Vec<MixerKind>>,
    /// Indices of the layers that use `mamba_kind`; the others use `attention_kind`.
    pub mamba_layers: Option<Vec<usize>>,
    /// The state-space mixer used by `mamba_layers` and the Jamba-style period.
    pub mamba_kind: MixerKind,
    /// The attention mixer used outside `mamba_layers` and by the Jamba-style period.
    pub attention_kind: MixerKind,
    /// Jamba style: layer `i` uses attention iff `i % attn_layer_period == attn_layer_offset`.
    pub attn_layer_period: Option<usize>,
    /// See `attn_layer_period`.
    pub attn_layer_offset: usize,

    /// Attention query heads.
    pub num_heads: usize,
    /// Attention key/value heads (GQA; equal to `num_heads` for MHA, 1 for MQA).
    pub kv_heads: usize,
    /// Attention head width (default `hidden_size / num_heads`).
    pub head_dim: Option<usize>,
    /// RoPE base.
    pub rope_theta: f64,
    /// Use RoPE in attention layers (Jamba uses none).
    pub rope: bool,
    /// RMSNorm on queries and keys per head.
    pub qk_norm: bool,
    /// Sliding-window attention width (`None`: full causal).
    pub sliding_window: Option<usize>,

    /// MLA: the compressed K/V latent width.
    pub kv_latent_dim: usize,
    /// MLA: the query latent width (`None`: a plain query projection).
    pub q_latent_dim: Option<usize>,
    /// MLA: the decoupled RoPE dims shared across heads.
    pub d_rope: usize,
    /// MLA: the non-rotary query/key dims per head (default `head_dim`).
    pub qk_nope_head_dim: Option<usize>,
    /// MLA: the value dims per head (default `head_dim`).
    pub v_head_dim: Option<usize>,

    /// Mamba: state size per channel (Mamba-1).
    pub d_state: usize,
    /// Mamba: causal conv width.
    pub d_conv: usize,
    /// Mamba: inner width = expand · hidden_size.
    pub expand: usize,
    /// Mamba-1: the rank of the Δ projection (default ceil(hidden_size / 16)).
    pub dt_rank: Option<usize>,
    /// Mamba-2: heads (default expand · hidden_size / mamba2_head_dim).
    pub mamba2_num_heads: Option<usize>,
    /// Mamba-2: head width.
    pub mamba2_head_dim: usize,
    /// Mamba-2: state size per head.
    pub mamba2_d_state: usize,
    /// Mamba-2: B/C groups (divides the heads).
    pub n_groups: usize,
    /// Mamba-2: SSD chunk length.
    pub chunk_size: usize,

    /// Width inside dense SwiGLU MLPs and each expert; 0: dense layers have no feed-forward
    /// (`x + mixer(norm(x))` only, as HF Mamba / Mamba-2; MoE layers then need
    /// `moe_intermediate_size`).
    pub intermediate_size: usize,
    /// Experts per MoE layer (0: no MoE anywhere).
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub experts_per_tok: usize,
    /// Width inside each routed expert (default `intermediate_size`).
    pub moe_intermediate_size: Option<usize>,
    /// Indices of the MoE layers.
    pub moe_layers: Option<Vec<usize>>,
    /// Jamba style: layer `i` is MoE iff `i % moe_every == moe_offset`.
    pub moe_every: Option<usize>,
    /// See `moe_every`.
    pub moe_offset: usize,
    /// An always-on shared expert beside the routed ones.
    pub shared_expert_enabled: bool,
    /// Width of the shared expert (default `intermediate_size`).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Scale the shared expert by a learned sigmoid gate (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// How MoE layers route.
    pub routing: RoutingConfig,
    /// The text of a HuggingFace `config.json` (written by `moeba train --hf DIR`): when set,
    /// the model is that HF architecture (see [`crate::hf`]) and only `max_seq_len` of the other
    /// model keys applies (`vocab_size` must agree with it).
    pub hf_config: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab_size: 256,
            hidden_size: 128,
            num_layers: 4,
            max_seq_len: 256,
            tie_embeddings: true,
            norm_eps: 1e-5,
            mixer: MixerKind::Attention,
            layer_mixers: None,
            mamba_layers: None,
            mamba_kind: MixerKind::Mamba,
            attention_kind: MixerKind::Attention,
            attn_layer_period: None,
            attn_layer_offset: 0,
            num_heads: 4,
            kv_heads: 4,
            head_dim: None,
            rope_theta: 10000.0,
            rope: true,
            qk_norm: false,
            sliding_window: None,
            kv_latent_dim: 64,
            q_latent_dim: None,
            d_rope: 16,
            qk_nope_head_dim: None,
            v_head_dim: None,
            d_state: 16,
            d_conv: 4,
            expand: 2,
            dt_rank: None,
            mamba2_num_heads: None,
            mamba2_head_dim: 32,
            mamba2_d_state: 64,
            n_groups: 1,
            chunk_size: 64,
            intermediate_size: 512,
            num_experts: 0,
            experts_per_tok: 2,
            moe_intermediate_size: None,
            moe_layers: None,
            moe_every: None,
            moe_offset: 0,
            shared_expert_enabled: false,
            shared_expert_intermediate_size: None,
            shared_expert_gate: false,
            routing: RoutingConfig::default(),
            hf_config: None,
        }
    }
}

/// The `[trainer]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Floor of the decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Decay shape after warmup.
    pub schedule: ScheduleKind,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW (β₁, β₂).
    pub betas: [f64; 2],
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum_steps: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_steps: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Weight of the load-balancing loss of MoE layers.
    pub load_balance_alpha: f64,
    /// Weight of the router z-loss of MoE layers.
    pub router_z_loss_alpha: f64,
    /// Weight of the variance-of-expert-usage loss of MoE layers (0 = off, the default).
    pub usage_variance_alpha: f64,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// `tinyshakespeare` (embedded) or a path to a UTF-8 text file.
    pub dataset: String,
    /// Where the run directory goes.
    pub output_dir: String,
    /// `byte` (the default, vocabulary 256) or a path to a HuggingFace `tokenizer.json`
    /// (`model.vocab_size` must be at least its vocabulary).
    pub tokenizer: String,
    /// The share of the dataset held out for validation (the end of the stream), in `(0, 1)`.
    pub val_fraction: f64,
    /// How many `step-*` checkpoints to keep (the best one is kept besides).
    pub keep_last: usize,
    /// Activation recomputation: `none`, `mixer` (recompute the mixers' internals in the
    /// backward) or `block` (recompute whole blocks).
    pub recompute: RecomputeLevel,
    /// Log (progress bar, `metrics.jsonl`, TensorBoard) every this many steps.
    pub log_every: usize,
    /// Stop early after this many seconds of training (checkpoint and evaluate at the end).
    pub max_seconds: Option<f64>,
    /// A HuggingFace model directory whose weights start a fresh run (not a resumed one); the
    /// model must be that directory's `model.hf_config` (`moeba train --hf DIR` sets both).
    pub init_from_hf: Option<String>,
}

/// The `trainer.recompute` values: how much of the forward is recomputed in the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeLevel {
    /// Keep every intermediate (fastest, most memory).
    #[default]
    None,
    /// Recompute each mixer's internals in the backward.
    Mixer,
    /// Recompute each whole block in the backward.
    Block,
}

impl RecomputeLevel {
    /// The nn setting.
    pub fn to_nn(self) -> moeba_nn::Recompute {
        match self {
            RecomputeLevel::None => moeba_nn::Recompute::None,
            RecomputeLevel::Mixer => moeba_nn::Recompute::Mixer,
            RecomputeLevel::Block => moeba_nn::Recompute::Block,
        }
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            learning_rate: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 100,
            schedule: ScheduleKind::Cosine,
            weight_decay: 0.1,
            betas: [0.9, 0.95],
            grad_clip: 1.0,
            batch_size: 16,
            grad_accum_steps: 1,
            seq_len: 128,
            max_steps: 2000,
            eval_every: 250,
            eval_steps: 8,
            save_every: 0,
            load_balance_alpha: 0.01,
            router_z_loss_alpha: 0.001,
            usage_variance_alpha: 0.0,
            seed: 1337,
            dataset: "tinyshakespeare".into(),
            output_dir: "runs/default".into(),
            tokenizer: "byte".into(),
            val_fraction: 0.1,
            keep_last: 3,
            recompute: RecomputeLevel::None,
            log_every: 10,
            max_seconds: None,
            init_from_hf: None,
        }
    }
}

/// A whole run: `[model]` and `[trainer]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The model.
    pub model: ModelConfig,
    /// Its training.
    pub trainer: TrainerConfig,
}

impl RunConfig {
    /// Parses TOML text and validates it; returns the config and its warnings.
    pub fn from_toml(text: &str) -> Result<(RunConfig, Vec<String>), ConfigError> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let warnings = cfg.validate()?;
        Ok((cfg, warnings))
    }

    /// The embedded default config ([`DEFAULT_CONFIG`], tiny-hybrid), parsed and validated.
    pub fn default_config() -> Result<(RunConfig, Vec<String>), ConfigError> {
        RunConfig::from_toml(DEFAULT_CONFIG)
    }

    /// Sets one dotted key (`trainer.max_steps`, `model.routing.jitter_noise`) to `value`, parsed
    /// as a TOML value (`100`, `3e-3`, `true`, `[0, 2]`, `"mamba"`; a bare word that is not valid
    /// TOML is taken as a string, so `trainer.dataset=arithmetic` works). An unknown key or a value
    /// of the wrong type is an error naming the key; nothing is changed then. The result is not
    /// validated (call [`RunConfig::validate`] after the last override).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let parts: Vec<&str> = key.split('.').map(str::trim).collect();
        if key.trim().is_empty() || parts.iter().any(|p| p.is_empty()) {
            return Err(invalid(key, "is not a dotted key like `trainer.max_steps`"));
        }
        let parsed = parse_toml_value(value);
        let mut root =
            toml::Value::try_from(&*self).map_err(|e| invalid(key, format!("cannot serialise: {e}")))?;
        let mut table = match &mut root {
            toml::Value::Table(t) => t,
            _ => return Err(invalid(key, "the config is not a table")),
        };
        let (last, path) = parts.split_last().ok_or_else(|| invalid(key, "empty key"))?;
        for (i, part) in path.iter().enumerate() {
            let known = table.contains_key(*part);
            if !known {
                let prefix = parts[..=i].join(".");
                return Err(invalid(key, format!("unknown key: there is no table `{prefix}`")));
            }
            table = match table.get_mut(*part) {
                Some(toml::Value::Table(t)) => t,
                _ => {
                    let prefix = parts[..=i].join(".");
                    return Err(invalid(key, format!("`{prefix}` is a value, not a table")));
                }
            };
        }
        table.insert(last.to_string(), parsed);
        let new: RunConfig = root.try_into().map_err(|e: toml::de::Error| {
            let msg = e.to_string();
            let msg = msg.trim();
            if msg.contains("unknown field") {
                invalid(key, format!("unknown key ({msg})"))
            } else {
                invalid(key, format!("bad value `{value}`: {msg}"))
            }
        })?;
        *self = new;
        Ok(())
    }

    /// Applies `key=value` overrides in order (see [`RunConfig::set`]); errors name the key, or
    /// the override when it has no `=`.
    pub fn apply_overrides<S: AsRef<str>>(&mut self, overrides: &[S]) -> Result<(), ConfigError> {
        for o in overrides {
            let o = o.as_ref();
            let (k, v) = o.split_once('=').ok_or_else(|| {
                invalid(o, "an override must look like `key=value`, e.g. `trainer.max_steps=100`")
            })?;
            self.set(k.trim(), v.trim())?;
        }
        Ok(())
    }

    /// Checks `model.vocab_size` against the vocabulary of the tokenizer actually used.
    pub fn check_vocab(&self, tokenizer_vocab: usize) -> Result<(), ConfigError> {
        if self.model.vocab_size < tokenizer_vocab {
            return Err(invalid(
                "model.vocab_size",
                format!(
                    "{} is smaller than the vocabulary of tokenizer `{}` ({tokenizer_vocab}); set model.vocab_size = {tokenizer_vocab}",
                    self.model.vocab_size, self.trainer.tokenizer
                ),
            ));
        }
        Ok(())
    }

    /// The config as TOML text (what a run directory keeps beside its checkpoint).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks every key and combination; errors name the key, warnings are returned.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = self.model.validate()?;
        warnings.extend(self.trainer.validate()?);
        let (m, t) = (&self.model, &self.trainer);
        if t.seq_len > m.max_seq_len {
            return Err(invalid(
                "trainer.seq_len",
                format!("{} is longer than model.max_seq_len = {}", t.seq_len, m.max_seq_len),
            ));
        }
        if t.tokenizer == "byte" && m.vocab_size < 256 {
            return Err(invalid(
                "model.vocab_size",
                format!("{} is smaller than the byte tokenizer's vocabulary (256)", m.vocab_size),
            ));
        }
        if t.init_from_hf.is_some() && m.hf_config.is_none() {
            return Err(invalid(
                "trainer.init_from_hf",
                "needs model.hf_config (the HF model's config.json); use `moeba train --hf DIR`",
            ));
        }
        let moe = match &m.hf_config {
            Some(json) => crate::hf::spec_of_text(json)?
                .config
                .blocks
                .iter()
                .any(|b| matches!(b.ffn, moeba_nn::FfnConfig::Moe(_))),
            None => m.layers()?.iter().any(|l| l.ffn == FfnKind::Moe),
        };
        if moe
            && t.load_balance_alpha == 0.0
            && t.usage_variance_alpha == 0.0
            && m.routing.bias_balancing_rate.is_none()
        {
            let learned =
                !matches!(m.routing.strategy, RoutingStrategyKind::Hash | RoutingStrategyKind::Dense);
            if learned {
                warnings.push(
                    "MoE layers with trainer.load_balance_alpha = 0 and no model.routing.bias_balancing_rate: \
                     nothing balances the experts, and routing tends to collapse onto a few of them"
                        .into(),
                );
            }
        }
        Ok(warnings)
    }
}

impl ModelConfig {
    /// Attention head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Mamba-1 Δ rank.
    pub fn dt_rank(&self) -> usize {
        self.dt_rank.unwrap_or(self.hidden_size.div_ceil(16))
    }

    /// Mamba-2 heads.
    pub fn mamba2_num_heads(&self) -> usize {
        self.mamba2_num_heads.unwrap_or(self.expand * self.hidden_size / self.mamba2_head_dim.max(1))
    }

    /// The mixer and feed-forward of every layer.
    pub fn layers(&self) -> Result<Vec<LayerPlan>, ConfigError> {
        let n = self.num_layers;
        let mixers: Vec<MixerKind> = if let Some(list) = &self.layer_mixers {
            if list.len() != n {
                return Err(invalid(
                    "model.layer_mixers",
                    format!("has {} entries but num_layers = {n}", list.len()),
                ));
            }
            list.clone()
        } else if let Some(idx) = &self.mamba_layers {
            check_indices("model.mamba_layers", idx, n)?;
            (0..n).map(|i| if idx.contains(&i) { self.mamba_kind } else { self.attention_kind }).collect()
        } else if let Some(period) = self.attn_layer_period {
            if period == 0 || self.attn_layer_offset >= period {
                return Err(invalid(
                    "model.attn_layer_period",
                    format!("needs period > attn_layer_offset ({}), got {period}", self.attn_layer_offset),
                ));
            }
            (0..n)
                .map(
                    |i| {
                        if i % period == self.attn_layer_offset {
                            self.attention_kind
                        } else {
                            self.mamba_kind
                        }
                    },
                )
                .collect()
        } else {
            vec![self.mixer; n]
        };
        let moe: Vec<bool> = if self.num_experts == 0 {
            if self.moe_layers.as_ref().is_some_and(|l| !l.is_empty()) || self.moe_every.is_some() {
                return Err(invalid(
                    "model.num_experts",
                    "is 0, but MoE layers are placed (moe_layers / moe_every)",
                ));
            }
            vec![false; n]
        } else if let Some(idx) = &self.moe_layers {
            check_indices("model.moe_layers", idx, n)?;
            (0..n).map(|i| idx.contains(&i)).collect()
        } else if let Some(every) = self.moe_every {
            if every == 0 || self.moe_offset >= every {
                return Err(invalid(
                    "model.moe_every",
                    format!("needs moe_every > moe_offset ({}), got {every}", self.moe_offset),
                ));
            }
            (0..n).map(|i| i % every == self.moe_offset).collect()
        } else {
            vec![true; n]
        };
        Ok(mixers
            .into_iter()
            .zip(moe)
            .map(|(mixer, moe)| LayerPlan { mixer, ffn: if moe { FfnKind::Moe } else { FfnKind::Mlp } })
            .collect())
    }

    /// The checks of an HF model (`hf_config` set): the config maps, and `vocab_size` and
    /// `max_seq_len` agree with it.
    fn validate_hf(&self, json: &str) -> Result<Vec<String>, ConfigError> {
        let spec = crate::hf::spec_of_text(json)?;
        if self.vocab_size != spec.config.vocab_size {
            return Err(invalid(
                "model.vocab_size",
                format!(
                    "is {} but model.hf_config has vocab_size = {}; they must agree",
                    self.vocab_size, spec.config.vocab_size
                ),
            ));
        }
        if self.max_seq_len == 0 {
            return Err(invalid("model.max_seq_len", "must be > 0"));
        }
        Ok(Vec::new())
    }

    /// Checks the model keys; returns warnings.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        if let Some(json) = &self.hf_config {
            return self.validate_hf(json);
        }
        let warnings = Vec::new();
        for (key, v) in [
            ("model.vocab_size", self.vocab_size),
            ("model.hidden_size", self.hidden_size),
            ("model.num_layers", self.num_layers),
            ("model.max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(invalid("model.norm_eps", format!("must be > 0, got {}", self.norm_eps)));
        }
        if !self.mamba_kind.is_mamba() {
            return Err(invalid("model.mamba_kind", "must be mamba or mamba2"));
        }
        if self.attention_kind.is_mamba() {
            return Err(invalid("model.attention_kind", "must be attention or mla"));
        }
        let layers = self.layers()?;
        let uses = |k: MixerKind| layers.iter().any(|l| l.mixer == k);
        if uses(MixerKind::Attention) || uses(MixerKind::Mla) {
            if self.num_heads == 0 {
                return Err(invalid("model.num_heads", "must be > 0"));
            }
            if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_heads) {
                return Err(invalid(
                    "model.hidden_size",
                    format!(
                        "{} is not divisible by num_heads = {} (or set head_dim)",
                        self.hidden_size, self.num_heads
                    ),
                ));
            }
        }
        if uses(MixerKind::Attention) {
            if self.kv_heads == 0 || !self.num_heads.is_multiple_of(self.kv_heads) {
                return Err(invalid(
                    "model.kv_heads",
                    format!(
                        "num_heads = {} must be a multiple of kv_heads = {}",
                        self.num_heads, self.kv_heads
                    ),
                ));
            }
            if self.rope && !self.head_dim().is_multiple_of(2) {
                return Err(invalid(
                    "model.head_dim",
                    format!("{} is odd; RoPE needs an even head_dim", self.head_dim()),
                ));
            }
            if self.sliding_window == Some(0) {
                return Err(invalid("model.sliding_window", "must be > 0 (omit it for full attention)"));
            }
        }
        if uses(MixerKind::Mla) {
            if self.kv_latent_dim == 0 {
                return Err(invalid("model.kv_latent_dim", "must be > 0 for MLA layers"));
            }
            if self.d_rope == 0 || !self.d_rope.is_multiple_of(2) {
                return Err(invalid("model.d_rope", format!("must be even and > 0, got {}", self.d_rope)));
            }
            if self.q_latent_dim == Some(0) {
                return Err(invalid(
                    "model.q_latent_dim",
                    "must be > 0 (omit it for a plain query projection)",
                ));
            }
        }
        if uses(MixerKind::Mamba) {
            for (key, v) in [
                ("model.d_state", self.d_state),
                ("model.expand", self.expand),
                ("model.dt_rank", self.dt_rank()),
            ] {
                if v == 0 {
                    return Err(invalid(key, "must be > 0"));
                }
            }
        }
        if uses(MixerKind::Mamba) || uses(MixerKind::Mamba2) {
            if !(2..=4).contains(&self.d_conv) {
                return Err(invalid("model.d_conv", format!("must be 2, 3 or 4, got {}", self.d_conv)));
            }
            if self.expand == 0 {
                return Err(invalid("model.expand", "must be > 0"));
            }
        }
        if uses(MixerKind::Mamba2) {
            let inner = self.expand * self.hidden_size;
            if self.mamba2_head_dim == 0 || self.mamba2_num_heads() * self.mamba2_head_dim != inner {
                return Err(invalid(
                    "model.mamba2_head_dim",
                    format!(
                        "mamba2_num_heads ({}) × mamba2_head_dim ({}) must equal expand × hidden_size = {inner}",
                        self.mamba2_num_heads(),
                        self.mamba2_head_dim
                    ),
                ));
            }
            if self.n_groups == 0 || !self.mamba2_num_heads().is_multiple_of(self.n_groups) {
                return Err(invalid(
                    "model.n_groups",
                    format!(
                        "must divide mamba2_num_heads = {}, got {}",
                        self.mamba2_num_heads(),
                        self.n_groups
                    ),
                ));
            }
            if self.mamba2_d_state == 0 || self.chunk_size == 0 {
                return Err(invalid("model.chunk_size", "mamba2_d_state and chunk_size must be > 0"));
            }
        }
        if layers.iter().any(|l| l.ffn == FfnKind::Moe) {
            let r = &self.routing;
            if self.experts_per_tok == 0 {
                return Err(invalid("model.experts_per_tok", "must be > 0"));
            }
            if self.experts_per_tok > self.num_experts {
                return Err(invalid(
                    "model.experts_per_tok",
                    format!("{} is more than num_experts = {}", self.experts_per_tok, self.num_experts),
                ));
            }
            if let Some(cf) = r.capacity_factor {
                if !(cf > 0.0 && cf.is_finite()) {
                    return Err(invalid("model.routing.capacity_factor", format!("must be > 0, got {cf}")));
                }
            }
            if !(r.jitter_noise >= 0.0 && r.jitter_noise < 1.0) {
                return Err(invalid(
                    "model.routing.jitter_noise",
                    format!("must be in [0, 1), got {}", r.jitter_noise),
                ));
            }
            if r.strategy == RoutingStrategyKind::Switch && self.experts_per_tok != 1 {
                return Err(invalid(
                    "model.experts_per_tok",
                    "the switch strategy routes each token to 1 expert",
                ));
            }
            if matches!(r.strategy, RoutingStrategyKind::Soft | RoutingStrategyKind::ExpertChoice) {
                return Err(invalid(
                    "model.routing.strategy",
                    format!(
                        "{:?} routing looks at other positions of the sequence, which leaks future tokens in a \
                         causal language model; use topk, switch, dense, hash or hierarchical",
                        r.strategy
                    ),
                ));
            }
            if r.strategy == RoutingStrategyKind::Hierarchical
                && (r.num_groups < 2 || !self.num_experts.is_multiple_of(r.num_groups))
            {
                return Err(invalid(
                    "model.routing.num_groups",
                    format!(
                        "must be ≥ 2 and divide num_experts = {}, got {}",
                        self.num_experts, r.num_groups
                    ),
                ));
            }
            if let Some(rate) = r.bias_balancing_rate {
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err(invalid(
                        "model.routing.bias_balancing_rate",
                        format!("must be > 0, got {rate}"),
                    ));
                }
            }
        }
        Ok(warnings)
    }
}

impl TrainerConfig {
    /// Checks the trainer keys; returns warnings.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        for (key, v) in [
            ("trainer.batch_size", self.batch_size),
            ("trainer.grad_accum_steps", self.grad_accum_steps),
            ("trainer.seq_len", self.seq_len),
            ("trainer.max_steps", self.max_steps),
            ("trainer.eval_every", self.eval_every),
            ("trainer.eval_steps", self.eval_steps),
            ("trainer.keep_last", self.keep_last),
            ("trainer.log_every", self.log_every),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(invalid("trainer.learning_rate", format!("must be > 0, got {}", self.learning_rate)));
        }
        if !(0.0..=self.learning_rate).contains(&self.min_lr) {
            return Err(invalid(
                "trainer.min_lr",
                format!("must be in [0, learning_rate], got {}", self.min_lr),
            ));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(invalid("trainer.betas", format!("betas[{i}] = {b} must be in [0, 1)")));
            }
        }
        for (key, v) in [
            ("trainer.weight_decay", self.weight_decay),
            ("trainer.grad_clip", self.grad_clip),
            ("trainer.load_balance_alpha", self.load_balance_alpha),
            ("trainer.router_z_loss_alpha", self.router_z_loss_alpha),
            ("trainer.usage_variance_alpha", self.usage_variance_alpha),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(key, format!("must be ≥ 0, got {v}")));
            }
        }
        if self.dataset.is_empty() {
            return Err(invalid(
                "trainer.dataset",
                "is empty; use `tinyshakespeare` or a path to a text file",
            ));
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return Err(invalid(
                "trainer.val_fraction",
                format!("must be in (0, 1), got {}", self.val_fraction),
            ));
        }
        if let Some(s) = self.max_seconds {
            if !(s > 0.0 && s.is_finite()) {
                return Err(invalid("trainer.max_seconds", format!("must be > 0 (or omitted), got {s}")));
            }
        }
        if self.tokenizer.is_empty() {
            return Err(invalid("trainer.tokenizer", "is empty; use `byte` or a path to a tokenizer.json"));
        }
        let mut warnings = Vec::new();
        if self.warmup_steps >= self.max_steps {
            warnings.push(format!(
                "trainer.warmup_steps = {} ≥ max_steps = {}: the run never leaves warmup",
                self.warmup_steps, self.max_steps
            ));
        }
        Ok(warnings)
    }
}

/// A TOML value from an override's text; text that is not a TOML value is taken as a string.
fn parse_toml_value(text: &str) -> toml::Value {
    let doc = format!("v = {text}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(text.to_string())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

fn check_indices(key: &str, idx: &[usize], n: usize) -> Result<(), ConfigError> {
    for &i in idx {
        if i >= n {
            return Err(invalid(key, format!("index {i} is out of range: num_layers = {n}")));
        }
    }
    let mut sorted = idx.to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid(key, "lists a layer twice"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        RunConfig::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_parse_and_validate() {
        let (cfg, warnings) = RunConfig::from_toml("").unwrap();
        assert_eq!(cfg, RunConfig::default());
        assert!(warnings.is_empty(), "{warnings:?}");
        let again = RunConfig::from_toml(&cfg.to_toml().unwrap()).unwrap().0;
        assert_eq!(again, cfg);
    }

    #[test]
    fn unknown_keys_are_named() {
        assert!(err("[model]\nhiden_size = 3").contains("hiden_size"));
        assert!(err("[trainer]\nlr = 3").contains("lr"));
        assert!(err("[model.routing]\nstrategy = \"nope\"").contains("nope"));
    }

    #[test]
    fn invalid_combinations_name_the_key() {
        let e = err("[model]\nnum_experts = 4\nexperts_per_tok = 5");
        assert!(e.contains("model.experts_per_tok") && e.contains("num_experts = 4"), "{e}");
        let e = err("[model]\nhidden_size = 100\nnum_heads = 3");
        assert!(e.contains("model.hidden_size"), "{e}");
        let e = err("[model]\nnum_layers = 4\nmamba_layers = [0, 4]");
        assert!(e.contains("model.mamba_layers") && e.contains("index 4"), "{e}");
        let e = err("[model]\nnum_heads = 4\nkv_heads = 3");
        assert!(e.contains("model.kv_heads"), "{e}");
        let e = err("[model]\nnum_experts = 4\n[model.routing]\nstrategy = \"soft\"");
        assert!(e.contains("model.routing.strategy") && e.contains("causal"), "{e}");
        let e = err("[model]\nmax_seq_len = 64\n[trainer]\nseq_len = 128");
        assert!(e.contains("trainer.seq_len"), "{e}");
        let e = err("[trainer]\nbetas = [0.9, 1.5]");
        assert!(e.contains("trainer.betas"), "{e}");
    }

    #[test]
    fn moe_without_balancing_warns() {
        let (_, w) =
            RunConfig::from_toml("[model]\nnum_experts = 4\n[trainer]\nload_balance_alpha = 0.0").unwrap();
        assert!(w.iter().any(|w| w.contains("collapse")), "{w:?}");
        let (_, w) = RunConfig::from_toml(
            "[model]\nnum_experts = 4\n[model.routing]\nbias_balancing_rate = 0.001\n[trainer]\nload_balance_alpha = 0.0",
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn layer_plans_resolve() {
        let (cfg, _) = RunConfig::from_toml(
            "[model]\nnum_layers = 8\nattn_layer_period = 4\nattn_layer_offset = 2\nnum_experts = 4\nmoe_every = 2\nmoe_offset = 1",
        )
        .unwrap();
        let plan = cfg.model.layers().unwrap();
        let attn: Vec<usize> = (0..8).filter(|&i| plan[i].mixer == MixerKind::Attention).collect();
        let moe: Vec<usize> = (0..8).filter(|&i| plan[i].ffn == FfnKind::Moe).collect();
        assert_eq!(attn, vec![2, 6]);
        assert_eq!(moe, vec![1, 3, 5, 7]);
        assert!(plan.iter().filter(|l| l.mixer != MixerKind::Attention).all(|l| l.mixer == MixerKind::Mamba));

        let (cfg, _) =
            RunConfig::from_toml("[model]\nnum_layers = 3\nmamba_layers = [0, 2]\nmamba_kind = \"mamba2\"\nexpand = 2\nhidden_size = 128\nmamba2_head_dim = 32")
                .unwrap();
        let kinds: Vec<MixerKind> = cfg.model.layers().unwrap().iter().map(|l| l.mixer).collect();
        assert_eq!(kinds, vec![MixerKind::Mamba2, MixerKind::Attention, MixerKind::Mamba2]);

        let (cfg, _) =
            RunConfig::from_toml("[model]\nnum_layers = 2\nlayer_mixers = [\"mla\", \"mamba\"]").unwrap();
        let kinds: Vec<MixerKind> = cfg.model.layers().unwrap().iter().map(|l| l.mixer).collect();
        assert_eq!(kinds, vec![MixerKind::Mla, MixerKind::Mamba]);
        assert!(err("[model]\nnum_layers = 3\nlayer_mixers = [\"mla\"]").contains("model.layer_mixers"));
    }
}
