//! [`HybridModel`]: the hybrid language model. Token embedding, `L` pre-norm residual blocks
//! (`x + mixer(norm(x))`, then `x + ffn(norm(x))`) whose mixer is Mamba, Mamba-2, attention or
//! MLA and whose feed-forward is a dense SwiGLU MLP, an MoE layer or none, a final RMSNorm and the LM
//! head (tied to the embedding or not).
//!
//! Parameter names follow the HF hybrid layouts (Jamba): `model.embed_tokens.weight`,
//! `model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.mixer.*` (Mamba / Mamba-2) or
//! `model.layers.{i}.self_attn.*` (attention / MLA), `model.layers.{i}.pre_ff_layernorm.weight`,
//! `model.layers.{i}.feed_forward.*` (MLP `gate_proj/up_proj/down_proj` or the MoE layer),
//! `model.final_layernorm.weight`, `lm_head.weight` (absent when tied).
//!
//! Training: [`HybridModel::forward`] records the layers' fused nodes on the tape and returns the
//! logits, the MoE aux losses (each layer's `AuxLosses::weighted_total` with its own alphas,
//! summed) and the routing reports; [`HybridModel::lm_loss`] is the mean cross-entropy.
//! [`Recompute`] wraps each mixer ([`Recompute::Mixer`]: `mixer(input_layernorm(x))`) or each
//! whole block ([`Recompute::Block`]; the aux loss is a checkpoint output, the routing stats its
//! by-product) in `moeba_autograd::checkpoint`: same values and gradients, fewer activations.
//! MoE layers get a causal [`MoeContext`] with the token ids (hash routing) and the jitter seed
//! salted by the block index; soft and expert-choice routing, which look at later positions,
//! are refused by [`HybridConfig::validate`].
//!
//! Decoding: [`HybridModel::new_cache`], [`HybridModel::prefill`] and
//! [`HybridModel::forward_step`] run on plain tensors with one [`LayerCache`] per block (Mamba
//! state, KV cache, MLA latent cache) and match the forward's logits to rounding, except for MoE
//! layers with a `capacity_factor` (which tokens are dropped depends on the whole batch) and
//! multi-task routing (decoding has no task ids).

use std::sync::Arc;

use moeba_autograd::Var;
use moeba_tensor::{DType, Error, Result, Tensor};

use crate::attention::{Attention, AttentionConfig};
use crate::kv_cache::KvCache;
use crate::mamba::{MambaBlock, MambaCache, MambaConfig};
use crate::mamba2::{Mamba2Block, Mamba2Cache, Mamba2Config};
use crate::mla::{Mla, MlaCache, MlaConfig};
use crate::moe::{MoeConfig, MoeContext, MoeLayer, RoutingKind, RoutingStats};
use crate::{Embedding, Linear, ParamPath, RmsNorm, SwiGluMlp};

use block::{elems, layer_context, mixer_name, params_under, Block, Ffn, Mixer};

mod block;
mod decode;

/// The token mixer of one layer, with its sizes.
#[derive(Debug, Clone, PartialEq)]
pub enum MixerConfig {
    /// Mamba-1 (selective scan).
    Mamba(MambaConfig),
    /// Mamba-2 (chunked SSD).
    Mamba2(Mamba2Config),
    /// Grouped-query attention (RoPE, optional qk-norm and sliding window).
    Attention(AttentionConfig),
    /// Multi-head latent attention.
    Mla(MlaConfig),
}

/// The feed-forward of one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum FfnConfig {
    /// A dense SwiGLU MLP of this inner width.
    Mlp {
        /// Inner width.
        intermediate_size: usize,
    },
    /// A Mixture-of-Experts layer (its alphas weight its aux losses in [`HybridOutput::aux_loss`]).
    Moe(MoeConfig),
    /// No feed-forward: the block is `x + mixer(input_layernorm(x))` only, with no
    /// `pre_ff_layernorm` parameter (HF Mamba / Mamba-2 models).
    None,
}

/// One block: its mixer and its feed-forward.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    /// The token mixer.
    pub mixer: MixerConfig,
    /// The feed-forward.
    pub ffn: FfnConfig,
}

/// The whole model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HybridConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Residual width `d` (every mixer and FFN config must have `d_model = d`).
    pub hidden_size: usize,
    /// The blocks, first to last.
    pub blocks: Vec<BlockConfig>,
    /// Share `embed_tokens.weight` with the LM head.
    pub tie_embeddings: bool,
    /// RMSNorm epsilon of the block and final norms.
    pub norm_eps: f64,
}

/// How much of the forward is kept for the backward (activation checkpointing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Keep every intermediate (fastest, most memory).
    #[default]
    None,
    /// Recompute each mixer's internals in the backward (keep the block inputs and the FFNs').
    Mixer,
    /// Recompute each whole block in the backward (keep only the block inputs).
    Block,
}

/// Options of one training/eval forward.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Activation checkpointing level.
    pub recompute: Recompute,
    /// The MoE context (training flag for jitter, step and seed, task ids). Token ids are filled
    /// in by the model.
    pub moe: MoeContext,
}

/// What one forward returns.
#[derive(Debug, Clone)]
pub struct HybridOutput {
    /// Logits `(b, l, V)`.
    pub logits: Var,
    /// The MoE aux losses of every MoE layer, weighted by their alphas and summed (rank 0);
    /// `None` for a model without MoE (or all alphas 0).
    pub aux_loss: Option<Var>,
    /// Per MoE layer: (block index, what the router did).
    pub routing: Vec<(usize, RoutingStats)>,
    /// Per MoE layer: (block index, the expert chosen first by each token `(b·l)` as U32, when the
    /// strategy reports one).
    pub assignments: Vec<(usize, Tensor)>,
}

/// Parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Every parameter (tied weights counted once).
    pub total: usize,
    /// Parameters used per token: MoE layers count the router, the shared expert and only
    /// `experts_per_tok` routed experts.
    pub active: usize,
    /// The embedding (and the untied LM head).
    pub embedding: usize,
}

/// One layer's decoding state.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Mamba-1 conv + SSM state (fixed size).
    Mamba(MambaCache),
    /// Mamba-2 conv + SSM state (fixed size).
    Mamba2(Mamba2Cache),
    /// Attention K/V (grows with the context).
    Attention(KvCache),
    /// MLA compressed latent + rope key (grows with the context).
    Mla(MlaCache),
}

/// The per-layer decoding state of a [`HybridModel`] and the number of tokens seen.
#[derive(Debug, Clone)]
pub struct HybridCache {
    /// One entry per block.
    pub layers: Vec<LayerCache>,
    /// Tokens processed so far (the next position).
    pub pos: usize,
}

/// The hybrid model (see the module docs).
#[derive(Debug)]
pub struct HybridModel {
    cfg: HybridConfig,
    embed: Embedding,
    blocks: Vec<Arc<Block>>,
    final_norm: RmsNorm,
    lm_head: Option<Linear>,
    counts: ParamCounts,
}

impl HybridConfig {
    /// Checks the sizes (every block's `d_model` is `hidden_size`, each sub-config valid);
    /// errors name the block and the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "HybridConfig::validate";
        if self.vocab_size == 0 {
            return Err(Error::invalid(OP, "vocab_size", "must be > 0"));
        }
        if self.hidden_size == 0 {
            return Err(Error::invalid(OP, "hidden_size", "must be > 0"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::invalid(
                OP,
                "norm_eps",
                format!("must be finite and > 0, got {}", self.norm_eps),
            ));
        }
        let d = self.hidden_size;
        for (i, b) in self.blocks.iter().enumerate() {
            let name = mixer_name(&b.mixer);
            let (dm, checked) = match &b.mixer {
                MixerConfig::Mamba(c) => (c.d_model, c.validate()),
                MixerConfig::Mamba2(c) => (c.d_model, c.validate()),
                MixerConfig::Attention(c) => (c.d_model, c.validate()),
                MixerConfig::Mla(c) => (c.d_model, c.validate()),
            };
            if dm != d {
                return Err(Error::invalid(
                    OP,
                    "blocks.mixer.d_model",
                    format!("block {i} ({name}): d_model = {dm}, but hidden_size = {d}"),
                ));
            }
            checked.map_err(|e| Error::invalid(OP, "blocks.mixer", format!("block {i} ({name}): {e}")))?;
            match &b.ffn {
                FfnConfig::Mlp { intermediate_size: 0 } => {
                    return Err(Error::invalid(
                        OP,
                        "blocks.ffn.intermediate_size",
                        format!("block {i} (mlp): must be > 0"),
                    ))
                }
                FfnConfig::Mlp { .. } | FfnConfig::None => {}
                FfnConfig::Moe(m) => {
                    if m.d_model != d {
                        return Err(Error::invalid(
                            OP,
                            "blocks.ffn.d_model",
                            format!("block {i} (moe): d_model = {}, but hidden_size = {d}", m.d_model),
                        ));
                    }
                    m.validate()
                        .map_err(|e| Error::invalid(OP, "blocks.ffn", format!("block {i} (moe): {e}")))?;
                    if matches!(m.strategy, RoutingKind::Soft { .. } | RoutingKind::ExpertChoice) {
                        return Err(Error::invalid(
                            OP,
                            "blocks.ffn.strategy",
                            format!(
                                "block {i} (moe): {} routing looks at the other positions of the sequence, so a \
                                 token's output would depend on later tokens, which a causal language model must \
                                 not do. HINT: use topk, switch, dense_gated, hash or hierarchical routing",
                                m.strategy.name()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl HybridModel {
    /// Creates (or finds) every parameter under `path` (normally the store's root).
    pub fn new(path: &ParamPath, cfg: &HybridConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, eps) = (cfg.hidden_size, cfg.norm_eps);
        let model = path.pp("model");
        // HF's initializer_range: N(0, 0.02²), so the tied head starts with near-zero logits
        // (loss ≈ ln V) instead of logits of size √d.
        let embed = Embedding::with_std(&model.pp("embed_tokens"), cfg.vocab_size, d, 0.02)?;
        let mut blocks = Vec::with_capacity(cfg.blocks.len());
        let mut total = embed.weight.var().elem_count();
        let mut inactive = 0;
        for (i, bc) in cfg.blocks.iter().enumerate() {
            let lp = model.pp("layers").pp(i);
            let norm_path = lp.pp("input_layernorm");
            let input_layernorm = RmsNorm::new(&norm_path, d, eps)?;
            let (mixer_path, mixer) = match &bc.mixer {
                MixerConfig::Mamba(c) => {
                    let p = lp.pp("mixer");
                    let m = Mixer::Mamba(MambaBlock::new(&p, c)?);
                    (p, m)
                }
                MixerConfig::Mamba2(c) => {
                    let p = lp.pp("mixer");
                    let m = Mixer::Mamba2(Mamba2Block::new(&p, c)?);
                    (p, m)
                }
                MixerConfig::Attention(c) => {
                    let p = lp.pp("self_attn");
                    let m = Mixer::Attention(Attention::new(&p, c)?);
                    (p, m)
                }
                MixerConfig::Mla(c) => {
                    let p = lp.pp("self_attn");
                    let m = Mixer::Mla(Mla::new(&p, c)?);
                    (p, m)
                }
            };
            let pre_ff_layernorm = match bc.ffn {
                FfnConfig::None => None,
                _ => Some(RmsNorm::new(&lp.pp("pre_ff_layernorm"), d, eps)?),
            };
            let ffn = match &bc.ffn {
                FfnConfig::None => Ffn::None,
                FfnConfig::Mlp { intermediate_size } => {
                    Ffn::Mlp(SwiGluMlp::new(&lp.pp("feed_forward"), d, *intermediate_size)?)
                }
                FfnConfig::Moe(mc) => {
                    let k = match mc.strategy {
                        RoutingKind::DenseGated => mc.num_experts,
                        _ => mc.experts_per_tok,
                    };
                    inactive += (mc.num_experts - k) * 3 * mc.d_ff * mc.d_model;
                    Ffn::Moe(Box::new(MoeLayer::new(&lp.pp("feed_forward"), mc)?))
                }
            };
            let mut mixer_params = params_under(&norm_path);
            mixer_params.extend(params_under(&mixer_path));
            let params = params_under(&lp);
            total += elems(&params);
            blocks.push(Arc::new(Block {
                index: i,
                input_layernorm,
                mixer,
                pre_ff_layernorm,
                ffn,
                mixer_params,
                params,
            }));
        }
        let final_norm = RmsNorm::new(&model.pp("final_layernorm"), d, eps)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(Linear::new(&path.pp("lm_head"), d, cfg.vocab_size, false)?)
        };
        let head = lm_head.as_ref().map_or(0, |h| h.weight.var().elem_count());
        total += final_norm.weight.var().elem_count() + head;
        let embedding = embed.weight.var().elem_count() + head;
        let counts = ParamCounts { total, active: total - inactive, embedding };
        Ok(HybridModel { cfg: cfg.clone(), embed, blocks, final_norm, lm_head, counts })
    }

    /// The config.
    pub fn config(&self) -> &HybridConfig {
        &self.cfg
    }

    /// Total / active / embedding parameter counts.
    pub fn param_counts(&self) -> ParamCounts {
        self.counts
    }

    /// The MoE layers, as (block index, layer): for bias-balancing updates and reports.
    pub fn moe_layers(&self) -> Vec<(usize, &MoeLayer)> {
        self.blocks
            .iter()
            .filter_map(|b| match &b.ffn {
                Ffn::Moe(m) => Some((b.index, m.as_ref())),
                Ffn::Mlp(_) | Ffn::None => None,
            })
            .collect()
    }

    /// Checks `ids (b, l)`: U32 or I64, non-empty, every id below the vocabulary size.
    fn check_ids(&self, op: &'static str, ids: &Tensor) -> Result<(usize, usize)> {
        let v = self.cfg.vocab_size;
        if ids.rank() != 2 || !matches!(ids.dtype(), DType::U32 | DType::I64) {
            return Err(Error::invalid(
                op,
                "ids",
                format!("token ids must be (batch, length) u32 or i64, got {} {}", ids.dtype(), ids.shape()),
            ));
        }
        let (b, l) = (ids.dims()[0], ids.dims()[1]);
        if b == 0 || l == 0 {
            return Err(Error::invalid(op, "ids", format!("token ids {} hold no token", ids.shape())));
        }
        let bad = match ids.dtype() {
            DType::U32 => ids.to_vec::<u32>()?.iter().position(|&t| t as usize >= v).map(|i| (i, 0)),
            _ => ids.to_vec::<i64>()?.iter().position(|&t| t < 0 || t as u64 >= v as u64).map(|i| (i, 1)),
        };
        if let Some((i, _)) = bad {
            let all = ids.to_vec_f64()?;
            return Err(Error::invalid(
                op,
                "ids",
                format!(
                    "token id {} at (row {}, position {}) is outside the vocabulary 0..{v}. HINT: the tokenizer's \
                     vocabulary must fit model.vocab_size",
                    all[i],
                    i / l,
                    i % l
                ),
            ));
        }
        Ok((b, l))
    }

    /// The LM head on `h (n, d)`: `(n, V)`.
    fn head(&self, h: &Var) -> Result<Var> {
        let w = match &self.lm_head {
            Some(lin) => lin.weight.var(),
            None => self.embed.weight.var(),
        };
        h.matmul(&w.t()?)
    }

    /// `ids (b, l)` U32 → logits `(b, l, V)`, the weighted aux loss and the routing stats.
    pub fn forward(&self, ids: &Tensor, opts: &ForwardOptions) -> Result<HybridOutput> {
        let (b, l) = self.check_ids("HybridModel::forward", ids)?;
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let mut x = self.embed.forward(ids)?;
        let mut aux_loss: Option<Var> = None;
        let (mut routing, mut assignments) = (Vec::new(), Vec::new());
        for block in &self.blocks {
            let ctx = match block.ffn {
                Ffn::Moe(_) => layer_context(&opts.moe, ids, block.index),
                Ffn::Mlp(_) | Ffn::None => MoeContext::default(),
            };
            let (y, ex) = block.forward_at(&x, &ctx, opts.recompute)?;
            x = y;
            if let Some(a) = ex.aux {
                aux_loss = Some(match aux_loss {
                    Some(t) => t.add(&a)?,
                    None => a,
                });
            }
            routing.extend(ex.stats.map(|s| (block.index, s)));
            assignments.extend(ex.assignment.map(|a| (block.index, a)));
        }
        let h = self.final_norm.forward(&x)?;
        let logits = self.head(&h.reshape((b * l, d))?)?.reshape((b, l, v))?;
        Ok(HybridOutput { logits, aux_loss, routing, assignments })
    }

    /// Mean next-token cross-entropy of `logits` against `targets (b, l)` U32 (rank 0, nats).
    pub fn lm_loss(logits: &Var, targets: &Tensor) -> Result<Var> {
        const OP: &str = "HybridModel::lm_loss";
        if logits.rank() != 3 {
            return Err(Error::bad_shape(OP, logits.shape(), "logits must be (batch, length, vocab)"));
        }
        let (b, l, v) = (logits.dims()[0], logits.dims()[1], logits.dims()[2]);
        if targets.dims() != [b, l] || !matches!(targets.dtype(), DType::U32 | DType::I64) {
            return Err(Error::invalid(
                OP,
                "targets",
                format!(
                    "targets must be ({b}, {l}) u32 or i64 to match the logits {}, got {} {}",
                    logits.shape(),
                    targets.dtype(),
                    targets.shape()
                ),
            ));
        }
        if b * l == 0 {
            return Err(Error::invalid(OP, "targets", "no target positions: the mean loss is undefined"));
        }
        logits.reshape((b * l, v))?.cross_entropy(&targets.reshape(b * l)?, None)
    }
}
