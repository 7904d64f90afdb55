//! Multi-head latent attention (DeepSeek-V2) and its latent cache.
//!
//! Keys and values come from a compressed latent: `kv_a_proj_with_mqa` maps the token to
//! `kv_latent_dim + d_rope` numbers, the first `kv_latent_dim` are normalised (`kv_a_layernorm`)
//! and expanded per head by `kv_b_proj` into the "nope" half of the key and the value; the last
//! `d_rope` are one rotary key shared by every head (decoupled RoPE). Queries come from `q_proj`,
//! or through their own latent (`q_a_proj`, `q_a_layernorm`, `q_b_proj`) when `q_latent_dim` is
//! set. HF DeepseekV2 parameter names.
//!
//! Training ([`Mla::forward`]) uses the naive form: keys `(nope ‖ rope)` and values expanded per
//! head, one fused attention node with `dk = nope + d_rope ≠ dv`. Decoding
//! ([`Mla::forward_step`]) uses the absorbed form over an [`MlaCache`] that holds only the
//! normalised latent and the rotated key (`kv_latent_dim + d_rope` numbers per token): the
//! "nope" query is folded through the K half of `kv_b_proj` into latent space, attention runs as
//! MQA over the cache (one kv head, `dk = kv_latent_dim + d_rope`, `dv = kv_latent_dim`), and the
//! V half of `kv_b_proj` is applied to the attention output before `o_proj`.

use moeba_autograd::fused::attention as fused;
use moeba_autograd::Var;
use moeba_kernels::ops::{self, AttentionOptions};
use moeba_tensor::{DType, Device, Error, Result, Tensor};

use crate::attention::{check_dtype, check_input, layer_name, linear_tensor, rms_norm_tensor, RopeConfig};
use crate::kv_cache::{check_capacity, check_layer, SeqBuffer};
use crate::{Linear, ParamPath, RmsNorm};

/// Sizes and options of an [`Mla`] layer (HF DeepseekV2 config keys in brackets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// Width of the residual stream (`hidden_size`).
    pub d_model: usize,
    /// Attention heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Rank of the query latent (`q_lora_rank`); `None`: a plain `q_proj` (DeepSeek-V2-Lite).
    pub q_latent_dim: Option<usize>,
    /// Rank of the key/value latent (`kv_lora_rank`): what the cache stores per token.
    pub kv_latent_dim: usize,
    /// Per-head query/key width without RoPE (`qk_nope_head_dim`).
    pub qk_nope_head_dim: usize,
    /// Width of the rotary part of queries and of the shared rotary key (`qk_rope_head_dim`); even.
    pub d_rope: usize,
    /// Per-head value width (`v_head_dim`).
    pub v_head_dim: usize,
    /// RoPE base and pairing (HF DeepSeek-V2 rotates interleaved pairs).
    pub rope: RopeConfig,
    /// Epsilon of `q_a_layernorm` and `kv_a_layernorm`.
    pub norm_eps: f64,
    /// Softmax scale; `None` means `1/√(qk_nope_head_dim + d_rope)`.
    pub softmax_scale: Option<f64>,
}

impl MlaConfig {
    /// The key width of the naive form: `qk_nope_head_dim + d_rope`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.d_rope
    }

    /// The softmax scale: [`MlaConfig::softmax_scale`] or `1/√(qk_nope_head_dim + d_rope)`.
    pub fn scale(&self) -> f64 {
        self.softmax_scale.unwrap_or(1.0 / (self.qk_head_dim() as f64).sqrt())
    }

    /// Numbers the latent cache holds per token and layer: `kv_latent_dim + d_rope`.
    pub fn cache_numbers_per_token(&self) -> usize {
        self.kv_latent_dim + self.d_rope
    }

    /// Checks the sizes and options; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "MlaConfig::validate";
        for (key, v) in [
            ("d_model", self.d_model),
            ("num_heads", self.num_heads),
            ("kv_latent_dim", self.kv_latent_dim),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("d_rope", self.d_rope),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return Err(Error::invalid(OP, key, "must be > 0"));
            }
        }
        if self.q_latent_dim == Some(0) {
            return Err(Error::invalid(OP, "q_latent_dim", "must be > 0 (or None for a plain q_proj)"));
        }
        if !self.d_rope.is_multiple_of(2) {
            return Err(Error::invalid(
                OP,
                "d_rope",
                format!("d_rope {} is odd, but RoPE rotates pairs of features", self.d_rope),
            ));
        }
        self.rope.validate(OP)?;
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::invalid(
                OP,
                "norm_eps",
                format!("must be finite and > 0, got {}", self.norm_eps),
            ));
        }
        if let Some(s) = self.softmax_scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::invalid(OP, "softmax_scale", format!("must be finite and > 0, got {s}")));
            }
        }
        Ok(())
    }
}

/// How an [`Mla`] layer forms its queries.
#[derive(Clone, Debug)]
pub enum MlaQuery {
    /// `q_proj.weight (num_heads·(nope + d_rope), d_model)` (no `q_lora_rank`).
    Direct {
        /// The query projection.
        q_proj: Linear,
    },
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))` through a latent of `q_latent_dim`.
    Latent {
        /// `(q_latent_dim, d_model)`.
        q_a_proj: Linear,
        /// `(q_latent_dim)`.
        q_a_layernorm: RmsNorm,
        /// `(num_heads·(nope + d_rope), q_latent_dim)`.
        q_b_proj: Linear,
    },
}

/// Multi-head latent attention (DeepSeek-V2), causal.
///
/// Parameters under the layer's path: the query ([`MlaQuery`]), `kv_a_proj_with_mqa.weight
/// (kv_latent_dim + d_rope, d_model)`, `kv_a_layernorm.weight (kv_latent_dim)`,
/// `kv_b_proj.weight (num_heads·(nope + v_head_dim), kv_latent_dim)` (per head: the nope key
/// rows, then the value rows), `o_proj.weight (d_model, num_heads·v_head_dim)`. No biases.
#[derive(Clone, Debug)]
pub struct Mla {
    cfg: MlaConfig,
    name: String,
    /// The query projection(s).
    pub query: MlaQuery,
    /// `(kv_latent_dim + d_rope, d_model)`.
    pub kv_a_proj_with_mqa: Linear,
    /// `(kv_latent_dim)`.
    pub kv_a_layernorm: RmsNorm,
    /// `(num_heads·(nope + v_head_dim), kv_latent_dim)`.
    pub kv_b_proj: Linear,
    /// `(d_model, num_heads·v_head_dim)`.
    pub o_proj: Linear,
}

impl Mla {
    /// Validates `cfg`, then creates (or finds) the parameters under `path`.
    pub fn new(path: &ParamPath, cfg: &MlaConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, h) = (cfg.d_model, cfg.num_heads);
        let q_out = h * cfg.qk_head_dim();
        let query = match cfg.q_latent_dim {
            None => MlaQuery::Direct { q_proj: Linear::new(&path.pp("q_proj"), d, q_out, false)? },
            Some(r) => MlaQuery::Latent {
                q_a_proj: Linear::new(&path.pp("q_a_proj"), d, r, false)?,
                q_a_layernorm: RmsNorm::new(&path.pp("q_a_layernorm"), r, cfg.norm_eps)?,
                q_b_proj: Linear::new(&path.pp("q_b_proj"), r, q_out, false)?,
            },
        };
        Ok(Mla {
            cfg: *cfg,
            name: layer_name(path),
            query,
            kv_a_proj_with_mqa: Linear::new(
                &path.pp("kv_a_proj_with_mqa"),
                d,
                cfg.kv_latent_dim + cfg.d_rope,
                false,
            )?,
            kv_a_layernorm: RmsNorm::new(&path.pp("kv_a_layernorm"), cfg.kv_latent_dim, cfg.norm_eps)?,
            kv_b_proj: Linear::new(
                &path.pp("kv_b_proj"),
                cfg.kv_latent_dim,
                h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                false,
            )?,
            o_proj: Linear::new(&path.pp("o_proj"), h * cfg.v_head_dim, d, false)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MlaConfig {
        &self.cfg
    }

    /// The layer's parameter path (what its caches are tied to).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An empty latent cache for this layer: `batch` sequences of at most `capacity` tokens, in
    /// the parameters' dtype and device.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<MlaCache> {
        let w = self.kv_b_proj.weight.tensor();
        MlaCache::new(
            &self.name,
            batch,
            self.cfg.kv_latent_dim,
            self.cfg.d_rope,
            capacity,
            w.dtype(),
            w.device(),
        )
    }

    fn first_linear(&self) -> &Linear {
        match &self.query {
            MlaQuery::Direct { q_proj } => q_proj,
            MlaQuery::Latent { q_a_proj, .. } => q_a_proj,
        }
    }

    fn attention_options(&self) -> AttentionOptions {
        AttentionOptions { scale: self.cfg.scale(), causal: true, window: None }
    }

    /// `x (b, l, d_model) → (b, l, d_model)`: causal MLA over positions `0..l` in the naive
    /// form (keys and values expanded per head), on the tape.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let c = &self.cfg;
        let (b, l) = check_input("Mla::forward", x.shape(), c.d_model, &self.name)?;
        let (h, nope, dr, dv, kvr) =
            (c.num_heads, c.qk_nope_head_dim, c.d_rope, c.v_head_dim, c.kv_latent_dim);
        let q = match &self.query {
            MlaQuery::Direct { q_proj } => q_proj.forward(x)?,
            MlaQuery::Latent { q_a_proj, q_a_layernorm, q_b_proj } => {
                q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)?
            }
        };
        let q = q.reshape((b, l, h, nope + dr))?.transpose(1, 2)?;
        let q_rot = fused::rope(&q.narrow(3, nope, dr)?, &c.rope.options(0))?;
        let q = Var::concat(&[&q.narrow(3, 0, nope)?, &q_rot], 3)?;
        let ckv = self.kv_a_proj_with_mqa.forward(x)?;
        let latent = self.kv_a_layernorm.forward(&ckv.narrow(2, 0, kvr)?)?;
        let k_rot = fused::rope(&ckv.narrow(2, kvr, dr)?.unsqueeze(1)?, &c.rope.options(0))?;
        let kv = self.kv_b_proj.forward(&latent)?.reshape((b, l, h, nope + dv))?.transpose(1, 2)?;
        let k = Var::concat(&[&kv.narrow(3, 0, nope)?, &k_rot.broadcast_as((b, h, l, dr))?], 3)?;
        let v = kv.narrow(3, nope, dv)?;
        let o = fused::attention(&q, &k, &v, &self.attention_options())?;
        let o = o.transpose(1, 2)?.reshape((b, l, h * dv))?;
        self.o_proj.forward(&o)
    }

    /// One decoding step on plain tensors (no tape), in the absorbed form: `x (b, l_new,
    /// d_model)` are the next tokens, at positions `cache.len()..`; their normalised latent and
    /// rotated key are appended to `cache`, and the output `(b, l_new, d_model)` attends to
    /// everything cached. Prefill is a step on an empty cache. Errors naming the cache when it
    /// belongs to another layer, has another batch, latent or rope width, dtype or device, or
    /// would pass its capacity.
    pub fn forward_step(&self, x: &Tensor, cache: &mut MlaCache) -> Result<Tensor> {
        const OP: &str = "Mla::forward_step";
        let c = &self.cfg;
        let (b, l) = check_input(OP, x.shape(), c.d_model, &self.name)?;
        let (h, nope, dr, dv, kvr) =
            (c.num_heads, c.qk_nope_head_dim, c.d_rope, c.v_head_dim, c.kv_latent_dim);
        self.check_cache(OP, cache, b, l)?;
        check_dtype(OP, x, self.first_linear())?;
        let pos = cache.len();
        // Queries: (b, h, l, nope) and the rotated (b, h, l, d_rope).
        let q = match &self.query {
            MlaQuery::Direct { q_proj } => linear_tensor(x, q_proj)?,
            MlaQuery::Latent { q_a_proj, q_a_layernorm, q_b_proj } => {
                let a = linear_tensor(x, q_a_proj)?;
                linear_tensor(&rms_norm_tensor(&a, &q_a_layernorm.weight.tensor(), c.norm_eps)?, q_b_proj)?
            }
        };
        let q = q.reshape((b, l, h, nope + dr))?.transpose(1, 2)?;
        let q_rot = ops::rope(&q.narrow(3, nope, dr)?, &c.rope.options(pos))?;
        // The new cache entries: normalised latent (b, l, kvr) and rotated key (b, l, d_rope).
        let ckv = linear_tensor(x, &self.kv_a_proj_with_mqa)?;
        let latent =
            rms_norm_tensor(&ckv.narrow(2, 0, kvr)?, &self.kv_a_layernorm.weight.tensor(), c.norm_eps)?;
        let k_rot = ops::rope(&ckv.narrow(2, kvr, dr)?.unsqueeze(1)?, &c.rope.options(pos))?.squeeze(1)?;
        cache.append(&latent, &k_rot)?;
        // Absorb the K half of kv_b_proj into the query: q_lat[h] = q_nope[h] · W_uk[h].
        let w = self.kv_b_proj.weight.tensor().reshape((h, nope + dv, kvr))?;
        let q_lat = ops::matmul(&q.narrow(3, 0, nope)?, &w.narrow(1, 0, nope)?)?;
        let q_abs = ops::concat(&[&q_lat, &q_rot], 3)?;
        // MQA over the cache: keys (latent ‖ rotated key), values the latent.
        let keys = cache.entries()?.unsqueeze(1)?;
        let values = keys.narrow(3, 0, kvr)?;
        let o_lat = ops::attention(&q_abs, &keys, &values, &self.attention_options())?.out;
        // The V half: o[h] = o_lat[h] · W_uv[h]ᵀ, then o_proj.
        let o = ops::matmul(&o_lat, &w.narrow(1, nope, dv)?.t()?)?;
        let o = ops::contiguous(&o.transpose(1, 2)?)?.reshape((b, l, h * dv))?;
        linear_tensor(&o, &self.o_proj)
    }

    fn check_cache(&self, op: &'static str, cache: &MlaCache, b: usize, l: usize) -> Result<()> {
        check_layer(op, cache.layer(), &self.name, "Mla::new_cache")?;
        let c = &self.cfg;
        let w = self.kv_b_proj.weight.tensor();
        if cache.batch() != b
            || cache.kv_latent_dim() != c.kv_latent_dim
            || cache.d_rope() != c.d_rope
            || cache.dtype() != w.dtype()
            || !cache.device().same_device(w.device())
        {
            return Err(Error::invalid(
                op,
                "cache",
                format!(
                    "the cache of layer `{}` holds batch {}, latent {} + rope {} ({} on {}); this step needs \
                     batch {b}, latent {} + rope {} ({} on {})",
                    self.name,
                    cache.batch(),
                    cache.kv_latent_dim(),
                    cache.d_rope(),
                    cache.dtype(),
                    cache.device(),
                    c.kv_latent_dim,
                    c.d_rope,
                    w.dtype(),
                    w.device()
                ),
            ));
        }
        check_capacity(op, &self.name, cache.len(), l, cache.capacity())
    }
}

/// The latent cache of one [`Mla`] layer: per token only the normalised KV latent
/// `(kv_latent_dim)` and the rotated shared key `(d_rope)`, side by side in one buffer, so
/// `kv_latent_dim + d_rope` numbers per token and sequence (no per-head keys or values).
#[derive(Clone, Debug)]
pub struct MlaCache {
    layer: String,
    batch: usize,
    kv_latent_dim: usize,
    d_rope: usize,
    buf: SeqBuffer,
}

impl MlaCache {
    /// An empty cache for layer `layer` of `batch` sequences, at most `capacity` tokens each.
    pub fn new(
        layer: impl Into<String>,
        batch: usize,
        kv_latent_dim: usize,
        d_rope: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op: "MlaCache::new",
                dtype,
                hint: "; a latent cache holds f32, f64, bf16 or f16".into(),
            });
        }
        Ok(MlaCache {
            layer: layer.into(),
            batch,
            kv_latent_dim,
            d_rope,
            buf: SeqBuffer::new(batch, kv_latent_dim + d_rope, capacity, dtype, device),
        })
    }

    /// The parameter path of the layer this cache belongs to.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// Tokens cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no token is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.buf.capacity
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Width of the cached latent.
    pub fn kv_latent_dim(&self) -> usize {
        self.kv_latent_dim
    }

    /// Width of the cached rotary key.
    pub fn d_rope(&self) -> usize {
        self.d_rope
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.buf.dtype
    }

    /// The device holding the cache.
    pub fn device(&self) -> &Device {
        &self.buf.device
    }

    /// Every cached token as `(batch, len, kv_latent_dim + d_rope)`: latent, then rotated key
    /// (a view; this is the key matrix of the absorbed attention).
    pub fn entries(&self) -> Result<Tensor> {
        self.buf.view(&[self.batch])
    }

    /// The normalised latents, `(batch, len, kv_latent_dim)` (a view).
    pub fn latent(&self) -> Result<Tensor> {
        self.entries()?.narrow(2, 0, self.kv_latent_dim)
    }

    /// The rotated shared keys, `(batch, len, d_rope)` (a view).
    pub fn k_rope(&self) -> Result<Tensor> {
        self.entries()?.narrow(2, self.kv_latent_dim, self.d_rope)
    }

    /// Numbers stored per token and sequence: `kv_latent_dim + d_rope`.
    pub fn numbers_per_token(&self) -> usize {
        self.kv_latent_dim + self.d_rope
    }

    /// Bytes stored per token and sequence.
    pub fn bytes_per_token(&self) -> usize {
        self.numbers_per_token() * self.dtype().size_in_bytes()
    }

    /// Token slots currently allocated (at least `len`, at most `capacity`).
    pub fn allocated(&self) -> usize {
        self.buf.allocated()
    }

    /// Forgets every token (keeps the allocation), for a new sequence.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Keeps the first `len` tokens (no-op when it holds no more), e.g. to re-run a step or to
    /// drop rejected speculative tokens. O(1) on the CPU.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.buf.truncate(len)
    }

    /// Appends `latent (batch, n, kv_latent_dim)` and `k_rope (batch, n, d_rope)` (any strides).
    /// Errors naming the layer on a shape, dtype or device mismatch, or past the capacity.
    pub fn append(&mut self, latent: &Tensor, k_rope: &Tensor) -> Result<()> {
        const OP: &str = "MlaCache::append";
        let n = latent.dims().get(1).copied().unwrap_or(0);
        for (arg, t, w) in [("latent", latent, self.kv_latent_dim), ("k_rope", k_rope, self.d_rope)] {
            if t.dims() != [self.batch, n, w] {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "{arg} has shape {}, the cache of layer `{}` expects ({}, {n}, {w})",
                        t.shape(),
                        self.layer,
                        self.batch
                    ),
                ));
            }
            if t.dtype() != self.dtype() {
                return Err(Error::DTypeMismatch { op: OP, lhs: self.dtype(), rhs: t.dtype() });
            }
            if !t.device().same_device(self.device()) {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    lhs: self.device().to_string(),
                    rhs: t.device().to_string(),
                });
            }
        }
        check_capacity(OP, &self.layer, self.len(), n, self.capacity())?;
        self.buf.append(&[latent, k_rope])
    }
}
