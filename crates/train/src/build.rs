//! From the TOML `[model]` table to the nn model: [`ModelConfig::to_hybrid`] resolves the layer
//! plan and fills each layer's mixer and FFN config; [`build_model`] creates the parameters.

use moeba_nn::attention::{AttentionConfig, RopeConfig};
use moeba_nn::mamba::MambaConfig;
use moeba_nn::mamba2::Mamba2Config;
use moeba_nn::mla::MlaConfig;
use moeba_nn::moe::{MoeConfig, MoeScoreFn, RoutingKind};
use moeba_nn::{BlockConfig, FfnConfig, HybridConfig, HybridModel, MixerConfig, ParamStore};
use moeba_tensor::{DType, Device};

use crate::config::{
    ConfigError, FfnKind, MixerKind, ModelConfig, RoutingStrategyKind, ScoreKind, TrainerConfig,
};

/// Which nn sub-config an error came from (to name the TOML key).
#[derive(Debug, Clone, Copy)]
enum Part {
    Mamba,
    Mamba2,
    Attention,
    Mla,
    Moe,
    Model,
}

/// The TOML key behind argument `arg` of the nn config of `part`.
fn key_of(part: Part, arg: &str) -> &'static str {
    match (part, arg) {
        (_, "d_model") => "model.hidden_size",
        (Part::Mamba, "d_state") => "model.d_state",
        (Part::Mamba, _) => "model.expand",
        (Part::Mamba2, "num_heads") => "model.mamba2_num_heads",
        (Part::Mamba2, "n_groups") => "model.n_groups",
        (Part::Mamba2, "chunk_size") => "model.chunk_size",
        (Part::Mamba2, _) => "model.mamba2_head_dim",
        (Part::Attention | Part::Mla, "num_heads") => "model.num_heads",
        (Part::Attention, "kv_heads") => "model.kv_heads",
        (Part::Attention, "head_dim") => "model.head_dim",
        (Part::Attention | Part::Mla, "rope.theta") => "model.rope_theta",
        (Part::Attention, "window") => "model.sliding_window",
        (Part::Attention | Part::Mla | Part::Model, "norm_eps") => "model.norm_eps",
        (Part::Attention, _) => "model.num_heads",
        (Part::Mla, "q_latent_dim") => "model.q_latent_dim",
        (Part::Mla, "d_rope") => "model.d_rope",
        (Part::Mla, "qk_nope_head_dim") => "model.qk_nope_head_dim",
        (Part::Mla, "v_head_dim") => "model.v_head_dim",
        (Part::Mla, _) => "model.kv_latent_dim",
        (Part::Moe, "d_ff") => "model.moe_intermediate_size",
        (Part::Moe, "num_experts") => "model.num_experts",
        (Part::Moe, "shared_expert_d_ff") => "model.shared_expert_intermediate_size",
        (Part::Moe, "shared_expert_gate") => "model.shared_expert_gate",
        (Part::Moe, "routed_scaling") => "model.routing.routed_scaling",
        (Part::Moe, "capacity_factor") => "model.routing.capacity_factor",
        (Part::Moe, "jitter_noise") => "model.routing.jitter_noise",
        (Part::Moe, "bias_balancing") => "model.routing.bias_balancing_rate",
        (Part::Moe, "strategy") => "model.routing.strategy",
        (Part::Moe, "lb_loss_alpha") => "trainer.load_balance_alpha",
        (Part::Moe, "z_loss_alpha") => "trainer.router_z_loss_alpha",
        (Part::Moe, "usage_var_alpha") => "trainer.usage_variance_alpha",
        (Part::Moe, _) => "model.experts_per_tok",
        (Part::Model, "vocab_size") => "model.vocab_size",
        (Part::Model, "blocks.ffn.strategy") => "model.routing.strategy",
        (Part::Model, _) => "model.hidden_size",
    }
}

/// An nn config error as a [`ConfigError`] naming the TOML key (and the layer, if any).
fn nn_error(part: Part, layer: Option<usize>, e: moeba_tensor::Error) -> ConfigError {
    let arg = match &e {
        moeba_tensor::Error::InvalidArgument { arg, .. } => *arg,
        _ => "",
    };
    let msg = match layer {
        Some(i) => format!("layer {i}: {e}"),
        None => e.to_string(),
    };
    ConfigError::Invalid { key: key_of(part, arg).to_string(), msg }
}

impl ModelConfig {
    /// The nn config of this model. `trainer` gives the aux-loss alphas of the MoE layers
    /// (`load_balance_alpha`, `router_z_loss_alpha`, `usage_variance_alpha`). Errors name the key.
    ///
    /// Mapping: Mamba-1 layers get `d_state`, `d_conv`, `expand`, `dt_rank`; Mamba-2 layers
    /// `mamba2_d_state`, `mamba2_head_dim`, `mamba2_num_heads`, `n_groups`, `chunk_size`, `expand`,
    /// `d_conv`; attention layers `num_heads`, `kv_heads`, `head_dim`, rotate-half RoPE with
    /// `rope_theta` (none when `rope = false`), `qk_norm`, `sliding_window`; MLA layers
    /// `q_latent_dim`, `kv_latent_dim`, `d_rope`, `qk_nope_head_dim` and `v_head_dim` (both
    /// default `head_dim`), interleaved RoPE (DeepSeek-V2's pairing) with `rope_theta`; dense
    /// layers a SwiGLU MLP of `intermediate_size` (none when it is 0); MoE layers `num_experts` routed experts of
    /// `moe_intermediate_size` (default `intermediate_size`), `experts_per_tok`, the shared expert
    /// (`shared_expert_intermediate_size`, default `intermediate_size`; `shared_expert_gate`) and
    /// `[model.routing]`. Hash routing is salted with the layer index, so layers route
    /// differently. Every norm uses `norm_eps`. With `hf_config` set, the HF model's config
    /// ([`crate::hf::hybrid_config`]).
    pub fn to_hybrid(&self, trainer: &TrainerConfig) -> Result<HybridConfig, ConfigError> {
        self.validate()?;
        if let Some(json) = &self.hf_config {
            return crate::hf::hybrid_config(json, trainer);
        }
        let d = self.hidden_size;
        let blocks = self
            .layers()?
            .iter()
            .enumerate()
            .map(|(i, plan)| {
                let mixer = self.mixer_config(plan.mixer, i)?;
                let ffn = match plan.ffn {
                    FfnKind::Mlp if self.intermediate_size == 0 => FfnConfig::None,
                    FfnKind::Mlp => FfnConfig::Mlp { intermediate_size: self.intermediate_size },
                    FfnKind::Moe => FfnConfig::Moe(self.moe_config(trainer, i)?),
                };
                Ok(BlockConfig { mixer, ffn })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let cfg = HybridConfig {
            vocab_size: self.vocab_size,
            hidden_size: d,
            blocks,
            tie_embeddings: self.tie_embeddings,
            norm_eps: self.norm_eps,
        };
        cfg.validate().map_err(|e| nn_error(Part::Model, None, e))?;
        Ok(cfg)
    }

    /// The mixer config of layer `i`, validated.
    fn mixer_config(&self, kind: MixerKind, i: usize) -> Result<MixerConfig, ConfigError> {
        let d = self.hidden_size;
        let eps = self.norm_eps;
        Ok(match kind {
            MixerKind::Mamba => {
                let c = MambaConfig {
                    d_state: self.d_state,
                    d_conv: self.d_conv,
                    expand: self.expand,
                    dt_rank: self.dt_rank(),
                    norm_eps: eps,
                    ..MambaConfig::new(d)
                };
                c.validate().map_err(|e| nn_error(Part::Mamba, Some(i), e))?;
                MixerConfig::Mamba(c)
            }
            MixerKind::Mamba2 => {
                let c = Mamba2Config {
                    d_state: self.mamba2_d_state,
                    d_conv: self.d_conv,
                    expand: self.expand,
                    head_dim: self.mamba2_head_dim,
                    num_heads: self.mamba2_num_heads(),
                    n_groups: self.n_groups,
                    chunk_size: self.chunk_size,
                    norm_eps: eps,
                    ..Mamba2Config::new(d)
                };
                c.validate().map_err(|e| nn_error(Part::Mamba2, Some(i), e))?;
                MixerConfig::Mamba2(c)
            }
            MixerKind::Attention => {
                let c = AttentionConfig {
                    rope: self.rope.then(|| RopeConfig::rotate_half(self.rope_theta)),
                    qk_norm: self.qk_norm,
                    norm_eps: eps,
                    window: self.sliding_window,
                    ..AttentionConfig::new(d, self.num_heads, self.kv_heads, self.head_dim())
                };
                c.validate().map_err(|e| nn_error(Part::Attention, Some(i), e))?;
                MixerConfig::Attention(c)
            }
            MixerKind::Mla => {
                let c = MlaConfig {
                    d_model: d,
                    num_heads: self.num_heads,
                    q_latent_dim: self.q_latent_dim,
                    kv_latent_dim: self.kv_latent_dim,
                    qk_nope_head_dim: self.qk_nope_head_dim.unwrap_or(self.head_dim()),
                    d_rope: self.d_rope,
                    v_head_dim: self.v_head_dim.unwrap_or(self.head_dim()),
                    rope: RopeConfig::interleaved(self.rope_theta),
                    norm_eps: eps,
                    softmax_scale: None,
                };
                c.validate().map_err(|e| nn_error(Part::Mla, Some(i), e))?;
                MixerConfig::Mla(c)
            }
        })
    }

    /// The MoE config of layer `i`, validated.
    fn moe_config(&self, trainer: &TrainerConfig, i: usize) -> Result<MoeConfig, ConfigError> {
        let r = &self.routing;
        let strategy = match r.strategy {
            RoutingStrategyKind::Topk => RoutingKind::TopK,
            RoutingStrategyKind::Switch => RoutingKind::Switch,
            RoutingStrategyKind::Dense => RoutingKind::DenseGated,
            RoutingStrategyKind::Hash => RoutingKind::Hash { seed: i as u64 },
            RoutingStrategyKind::ExpertChoice => RoutingKind::ExpertChoice,
            RoutingStrategyKind::Soft => RoutingKind::Soft { slots_per_expert: 1 },
            RoutingStrategyKind::Hierarchical => RoutingKind::Hierarchical { num_groups: r.num_groups },
        };
        let shared_d_ff = self.shared_expert_intermediate_size.unwrap_or(self.intermediate_size);
        let c = MoeConfig {
            shared_expert_enabled: self.shared_expert_enabled,
            shared_expert_d_ff: if self.shared_expert_enabled { shared_d_ff } else { 0 },
            shared_expert_gate: self.shared_expert_gate,
            score: match r.score {
                ScoreKind::Softmax => MoeScoreFn::Softmax,
                ScoreKind::Sigmoid => MoeScoreFn::Sigmoid,
            },
            normalize_topk: r.normalize,
            routed_scaling: r.routed_scaling,
            capacity_factor: r.capacity_factor,
            jitter_noise: r.jitter_noise,
            bias_balancing: r.bias_balancing_rate,
            strategy,
            lb_loss_alpha: trainer.load_balance_alpha,
            z_loss_alpha: trainer.router_z_loss_alpha,
            usage_var_alpha: trainer.usage_variance_alpha,
            ..MoeConfig::new(
                self.hidden_size,
                self.moe_intermediate_size.unwrap_or(self.intermediate_size),
                self.num_experts,
                self.experts_per_tok,
            )
        };
        c.validate().map_err(|e| nn_error(Part::Moe, Some(i), e))?;
        Ok(c)
    }
}

/// A new model with freshly initialised parameters (seeded by `seed`) in f32 on `device`.
pub fn build_model(
    cfg: &HybridConfig,
    seed: u64,
    device: &Device,
) -> moeba_tensor::Result<(ParamStore, HybridModel)> {
    let store = ParamStore::new(DType::F32, device.clone(), seed);
    let model = HybridModel::new(&store.root(), cfg)?;
    Ok((store, model))
}
