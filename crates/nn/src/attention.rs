//! The GQA attention layer with RoPE, and its KV cache.
//!
//! [`Attention`] is the self-attention of Llama / Mixtral / Qwen: `q_proj`, `k_proj`, `v_proj`,
//! `o_proj` (HF names and layouts), `num_heads` query heads sharing `kv_heads` key/value heads
//! (GQA; MQA with one), optional RoPE ([`RopeConfig`]; `None` for Jamba, which has no positional
//! encoding), optional per-head RMS "qk-norm" of queries and keys before RoPE (Qwen3's `q_norm`,
//! `k_norm`), optional q/k/v and o biases, optional sliding window.
//!
//! The training forward ([`Attention::forward`]) records the fused `rope` and `attention` nodes
//! of `moeba_autograd::fused::attention` on the tape: K/V are read through views by the
//! memory-efficient kernel, never repeated per query head. Decoding ([`Attention::forward_step`])
//! runs on plain tensors with a [`KvCache`]; prefill is a step on an empty cache.

use moeba_autograd::fused::attention as fused;
use moeba_autograd::Var;
use moeba_kernels::ops::{self, AttentionOptions, RopeOptions, RopeScaling, RopeStyle, UnaryOp};
use moeba_tensor::{Error, Result, Tensor};

pub use crate::kv_cache::KvCache;
use crate::kv_cache::{check_capacity, check_layer};
use crate::{Linear, ParamPath, RmsNorm};

/// Rotary position embedding of a layer: the frequency base and which features are paired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta` (10000 for Llama 2, 1e6 for Mixtral / Qwen).
    pub theta: f64,
    /// Rotate-half (Llama, Mixtral, Qwen) or interleaved pairs (DeepSeek-V2).
    pub style: RopeStyle,
    /// Frequency scaling for long contexts (YaRN in DeepSeek-V2 checkpoints; none by default).
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Rotate-half RoPE with base `theta`.
    pub fn rotate_half(theta: f64) -> Self {
        RopeConfig { theta, style: RopeStyle::RotateHalf, scaling: RopeScaling::None }
    }

    /// Interleaved-pair RoPE with base `theta` (DeepSeek-V2).
    pub fn interleaved(theta: f64) -> Self {
        RopeConfig { theta, style: RopeStyle::Interleaved, scaling: RopeScaling::None }
    }

    /// The same RoPE with frequency scaling `scaling`.
    pub fn with_scaling(self, scaling: RopeScaling) -> Self {
        RopeConfig { scaling, ..self }
    }

    /// The kernel options with the first token at position `offset`.
    pub fn options(&self, offset: usize) -> RopeOptions {
        RopeOptions::new(self.theta).with_style(self.style).with_offset(offset).with_scaling(self.scaling)
    }

    /// Errors (naming `op` and the key) unless theta is finite and positive.
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.theta.is_finite() && self.theta > 0.0) {
            return Err(Error::invalid(
                op,
                "rope.theta",
                format!("must be finite and > 0, got {}", self.theta),
            ));
        }
        self.scaling.validate(op)
    }
}

/// Sizes and options of an [`Attention`] layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Width of the residual stream (`hidden_size`).
    pub d_model: usize,
    /// Query heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Key/value heads (`num_key_value_heads`); `num_heads` must be a multiple of it.
    pub kv_heads: usize,
    /// Width of each head (`head_dim`; need not be `d_model / num_heads`). Even with RoPE.
    pub head_dim: usize,
    /// RoPE over the whole head, or `None` for no positional encoding (Jamba).
    pub rope: Option<RopeConfig>,
    /// Per-head RMSNorm of queries and keys (over `head_dim`, before RoPE; Qwen3's `q_norm`,
    /// `k_norm`).
    pub qk_norm: bool,
    /// Epsilon of the qk-norm.
    pub norm_eps: f64,
    /// Biases on `q_proj`, `k_proj`, `v_proj` (Qwen2 / Qwen2-MoE; Llama's `attention_bias`
    /// also sets [`AttentionConfig::o_bias`]).
    pub bias: bool,
    /// A bias on `o_proj`.
    pub o_bias: bool,
    /// Sliding window: a token sees itself and the `w - 1` before it (Mistral's `sliding_window`).
    pub window: Option<usize>,
    /// Softmax scale; `None` means `1/√head_dim`.
    pub scale: Option<f64>,
}

impl AttentionConfig {
    /// `num_heads` query heads and `kv_heads` key/value heads of `head_dim` over `d_model`, with
    /// rotate-half RoPE (theta 10000), no qk-norm (eps 1e-6 if turned on), no biases, no window,
    /// scale `1/√head_dim`.
    pub fn new(d_model: usize, num_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttentionConfig {
            d_model,
            num_heads,
            kv_heads,
            head_dim,
            rope: Some(RopeConfig::rotate_half(10000.0)),
            qk_norm: false,
            norm_eps: 1e-6,
            bias: false,
            o_bias: false,
            window: None,
            scale: None,
        }
    }

    /// Checks the sizes and options; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "AttentionConfig::validate";
        for (key, v) in [
            ("d_model", self.d_model),
            ("num_heads", self.num_heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::invalid(OP, key, "must be > 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::invalid(
                OP,
                "num_heads",
                format!(
                    "num_heads {} is not a multiple of kv_heads {} (each kv head serves num_heads / kv_heads \
                     query heads)",
                    self.num_heads, self.kv_heads
                ),
            ));
        }
        if let Some(r) = &self.rope {
            r.validate(OP)?;
            if !self.head_dim.is_multiple_of(2) {
                return Err(Error::invalid(
                    OP,
                    "head_dim",
                    format!("head_dim {} is odd, but RoPE rotates pairs of features", self.head_dim),
                ));
            }
        }
        if self.qk_norm && !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::invalid(
                OP,
                "norm_eps",
                format!("must be finite and > 0, got {}", self.norm_eps),
            ));
        }
        if self.window == Some(0) {
            return Err(Error::invalid(
                OP,
                "window",
                "a window of 0 tokens hides every key; use None or >= 1",
            ));
        }
        if let Some(s) = self.scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::invalid(OP, "scale", format!("must be finite and > 0, got {s}")));
            }
        }
        Ok(())
    }

    /// The softmax scale: [`AttentionConfig::scale`] or `1/√head_dim`.
    pub fn softmax_scale(&self) -> f64 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// The kernel options: causal, with this layer's scale and window.
    pub fn options(&self) -> AttentionOptions {
        AttentionOptions { scale: self.softmax_scale(), causal: true, window: self.window }
    }
}

/// Causal multi-head self-attention with grouped K/V heads (GQA), RoPE and optional qk-norm.
///
/// Parameters under the layer's path (HF Llama / Mixtral / Qwen3 names): `q_proj.weight
/// (num_heads·head_dim, d_model)`, `k_proj.weight`, `v_proj.weight (kv_heads·head_dim, d_model)`,
/// `o_proj.weight (d_model, num_heads·head_dim)`, `{q,k,v}_proj.bias` with `bias`,
/// `o_proj.bias` with `o_bias`, `q_norm.weight`, `k_norm.weight (head_dim)` with `qk_norm`.
#[derive(Clone, Debug)]
pub struct Attention {
    cfg: AttentionConfig,
    name: String,
    /// `(num_heads·head_dim, d_model)`.
    pub q_proj: Linear,
    /// `(kv_heads·head_dim, d_model)`.
    pub k_proj: Linear,
    /// `(kv_heads·head_dim, d_model)`.
    pub v_proj: Linear,
    /// `(d_model, num_heads·head_dim)`.
    pub o_proj: Linear,
    /// Per-head query norm `(head_dim)`, with `qk_norm`.
    pub q_norm: Option<RmsNorm>,
    /// Per-head key norm `(head_dim)`, with `qk_norm`.
    pub k_norm: Option<RmsNorm>,
}

impl Attention {
    /// Validates `cfg`, then creates (or finds) the parameters under `path`.
    pub fn new(path: &ParamPath, cfg: &AttentionConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, h, hkv, hd) = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(RmsNorm::new(&path.pp("q_norm"), hd, cfg.norm_eps)?),
                Some(RmsNorm::new(&path.pp("k_norm"), hd, cfg.norm_eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            cfg: *cfg,
            name: layer_name(path),
            q_proj: Linear::new(&path.pp("q_proj"), d, h * hd, cfg.bias)?,
            k_proj: Linear::new(&path.pp("k_proj"), d, hkv * hd, cfg.bias)?,
            v_proj: Linear::new(&path.pp("v_proj"), d, hkv * hd, cfg.bias)?,
            o_proj: Linear::new(&path.pp("o_proj"), h * hd, d, cfg.o_bias)?,
            q_norm,
            k_norm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AttentionConfig {
        &self.cfg
    }

    /// The layer's parameter path (what its caches are tied to).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An empty cache for this layer: `batch` sequences of at most `capacity` tokens, in the
    /// parameters' dtype and device.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let w = self.q_proj.weight.tensor();
        KvCache::new(&self.name, batch, self.cfg.kv_heads, self.cfg.head_dim, capacity, w.dtype(), w.device())
    }

    /// `x (b, l, d_model) → (b, l, d_model)`: causal self-attention over the whole sequence
    /// (positions `0..l`), recorded on the tape as fused rope / attention nodes.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let (b, l) = check_input("Attention::forward", x.shape(), self.cfg.d_model, &self.name)?;
        let c = &self.cfg;
        let (h, hkv, hd) = (c.num_heads, c.kv_heads, c.head_dim);
        let mut q = self.q_proj.forward(x)?.reshape((b, l, h, hd))?;
        let mut k = self.k_proj.forward(x)?.reshape((b, l, hkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((b, l, hkv, hd))?.transpose(1, 2)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (mut q, mut k) = (q.transpose(1, 2)?, k.transpose(1, 2)?);
        if let Some(r) = &c.rope {
            q = fused::rope(&q, &r.options(0))?;
            k = fused::rope(&k, &r.options(0))?;
        }
        let o = fused::attention(&q, &k, &v, &c.options())?;
        let o = o.transpose(1, 2)?.reshape((b, l, h * hd))?;
        self.o_proj.forward(&o)
    }

    /// One decoding step on plain tensors (no tape): `x (b, l_new, d_model)` are the next
    /// `l_new` tokens, at positions `cache.len()..`; their keys and values are appended to `cache`
    /// and the output `(b, l_new, d_model)` attends to everything cached. Prefill is a step on an
    /// empty cache. Errors naming the cache when it belongs to another layer, has another batch,
    /// head count, head width, dtype or device, or would pass its capacity.
    pub fn forward_step(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        const OP: &str = "Attention::forward_step";
        let (b, l) = check_input(OP, x.shape(), self.cfg.d_model, &self.name)?;
        let c = &self.cfg;
        let (h, hkv, hd) = (c.num_heads, c.kv_heads, c.head_dim);
        self.check_cache(OP, cache, b, l)?;
        check_dtype(OP, x, &self.q_proj)?;
        let pos = cache.len();
        let mut q = linear_tensor(x, &self.q_proj)?.reshape((b, l, h, hd))?;
        let mut k = linear_tensor(x, &self.k_proj)?.reshape((b, l, hkv, hd))?;
        let v = linear_tensor(x, &self.v_proj)?.reshape((b, l, hkv, hd))?.transpose(1, 2)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm_tensor(&q, &qn.weight.tensor(), c.norm_eps)?;
            k = rms_norm_tensor(&k, &kn.weight.tensor(), c.norm_eps)?;
        }
        let (mut q, mut k) = (q.transpose(1, 2)?, k.transpose(1, 2)?);
        if let Some(r) = &c.rope {
            q = ops::rope(&q, &r.options(pos))?;
            k = ops::rope(&k, &r.options(pos))?;
        }
        cache.append(&k, &v)?;
        let o = ops::attention(&q, &cache.k()?, &cache.v()?, &c.options())?.out;
        let o = ops::contiguous(&o.transpose(1, 2)?)?.reshape((b, l, h * hd))?;
        linear_tensor(&o, &self.o_proj)
    }

    fn check_cache(&self, op: &'static str, cache: &KvCache, b: usize, l: usize) -> Result<()> {
        check_layer(op, cache.layer(), &self.name, "Attention::new_cache")?;
        let c = &self.cfg;
        let w = self.q_proj.weight.tensor();
        if cache.batch() != b
            || cache.kv_heads() != c.kv_heads
            || cache.head_dim() != c.head_dim
            || cache.dtype() != w.dtype()
            || !cache.device().same_device(w.device())
        {
            return Err(Error::invalid(
                op,
                "cache",
                format!(
                    "the cache of layer `{}` holds batch {}, {} kv heads of {} ({} on {}); this step needs \
                     batch {b}, {} kv heads of {} ({} on {})",
                    self.name,
                    cache.batch(),
                    cache.kv_heads(),
                    cache.head_dim(),
                    cache.dtype(),
                    cache.device(),
                    c.kv_heads,
                    c.head_dim,
                    w.dtype(),
                    w.device()
                ),
            ));
        }
        check_capacity(op, &self.name, cache.len(), l, cache.capacity())
    }
}

/// The name a layer built under `path` goes by: the path itself (`model.layers.3.self_attn`).
pub(crate) fn layer_name(path: &ParamPath) -> String {
    let full = path.name("_");
    full.strip_suffix("_").unwrap_or(&full).trim_end_matches('.').to_string()
}

/// Checks `x (b, l, d_model)` and returns `(b, l)`.
pub(crate) fn check_input(
    op: &'static str,
    shape: &moeba_tensor::Shape,
    d: usize,
    layer: &str,
) -> Result<(usize, usize)> {
    match shape.dims() {
        &[b, l, dm] if dm == d => Ok((b, l)),
        _ => Err(Error::bad_shape(op, shape, format!("expected (batch, seq, {d}) for layer `{layer}`"))),
    }
}

/// Errors unless `x` has the dtype of `lin`'s weight.
pub(crate) fn check_dtype(op: &'static str, x: &Tensor, lin: &Linear) -> Result<()> {
    let w = lin.weight.tensor();
    if x.dtype() != w.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: w.dtype(), rhs: x.dtype() });
    }
    Ok(())
}

/// [`Linear::forward`] on a plain tensor: `x (..., in) → (..., out)`, the same ops in the same
/// order (so it rounds the same way).
pub(crate) fn linear_tensor(x: &Tensor, lin: &Linear) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (inf, outf) = (lin.in_features(), lin.out_features());
    if dims.last() != Some(&inf) {
        return Err(Error::bad_shape(
            "linear",
            x.shape(),
            format!("expected a last dim of {inf} ({})", lin.weight.name()),
        ));
    }
    let rows = x.elem_count() / inf.max(1);
    let flat = ops::contiguous(x)?.reshape((rows, inf))?;
    let mut y = ops::matmul(&flat, &lin.weight.tensor().t()?)?;
    if let Some(bias) = &lin.bias {
        y = ops::add(&y, &bias.tensor())?;
    }
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = outf;
    }
    y.reshape(out)
}

/// [`crate::rms_norm`] on plain tensors: `weight · x · (mean(x², -1) + eps)^(-1/2)`.
pub(crate) fn rms_norm_tensor(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let last = x.rank().checked_sub(1).ok_or_else(|| Error::bad_shape("rms_norm", x.shape(), "rank 0"))?;
    let inv =
        ops::powf(&ops::affine(&ops::mean(&ops::unary(x, UnaryOp::Sqr)?, &[last], true)?, 1.0, eps)?, -0.5)?;
    ops::mul(&ops::mul(x, &inv)?, weight)
}
