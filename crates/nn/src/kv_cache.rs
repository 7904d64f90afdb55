//! Inference caches for the attention mixers: [`KvCache`] (keys and values of a GQA layer) and
//! the growable sequence buffer both it and the MLA latent cache ([`crate::mla::MlaCache`]) are
//! built on.
//!
//! A cache belongs to one layer (named by the layer's parameter path) and holds at most
//! `capacity` tokens. On the CPU, appends write in place into a buffer that grows by doubling
//! (amortised O(1) per token, no re-concatenation); the cached keys and values are handed to the
//! attention kernel as strided views of that buffer, never copied. On other devices appends
//! concatenate (O(len) per step).

use std::sync::Arc;

use moeba_kernels::ops;
use moeba_tensor::{CpuStorage, DType, Device, Error, Layout, Result, Shape, Storage, Tensor, WithDType};

/// The smallest number of token slots a buffer allocates at its first append.
const MIN_ALLOC: usize = 16;

/// `outer` independent sequences of `inner`-wide rows, appended to along the sequence dim.
/// The logical content is `(outer, len, inner)`; on the CPU the buffer is `(outer, alloc, inner)`
/// with `alloc >= len` token slots.
#[derive(Clone, Debug)]
pub(crate) struct SeqBuffer {
    outer: usize,
    inner: usize,
    /// The most tokens it may hold.
    pub(crate) capacity: usize,
    len: usize,
    /// The element type.
    pub(crate) dtype: DType,
    /// Where the buffer lives.
    pub(crate) device: Device,
    data: Backing,
}

#[derive(Clone, Debug)]
enum Backing {
    /// Host memory written in place; `alloc` token slots per outer row.
    Host { storage: Arc<Storage>, alloc: usize },
    /// Any other device: the content so far, `(outer, len, inner)` contiguous (`None` while empty).
    Concat(Option<Tensor>),
}

impl SeqBuffer {
    /// An empty buffer of at most `capacity` tokens.
    pub(crate) fn new(outer: usize, inner: usize, capacity: usize, dtype: DType, device: &Device) -> Self {
        let data = if device.is_cpu() {
            Backing::Host { storage: Arc::new(Storage::Cpu(CpuStorage::full(0.0, 0, dtype))), alloc: 0 }
        } else {
            Backing::Concat(None)
        };
        SeqBuffer { outer, inner, capacity, len: 0, dtype, device: device.clone(), data }
    }

    /// Tokens held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Token slots allocated (the buffer's size along the sequence dim).
    pub(crate) fn allocated(&self) -> usize {
        match &self.data {
            Backing::Host { alloc, .. } => *alloc,
            Backing::Concat(_) => self.len,
        }
    }

    /// Forgets every token (keeps the allocation).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        if let Backing::Concat(t) = &mut self.data {
            *t = None;
        }
    }

    /// Keeps the first `len` tokens (no-op when it holds no more); the allocation stays.
    pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if let Backing::Concat(Some(t)) = &mut self.data {
            *t = ops::contiguous(&t.narrow(1, 0, len)?)?;
        }
        self.len = len;
        Ok(())
    }

    /// The content as a view of shape `lead ++ [len, inner]`, where `lead` multiplies to `outer`
    /// (e.g. `(batch, heads)`). No copy on the CPU.
    pub(crate) fn view(&self, lead: &[usize]) -> Result<Tensor> {
        if lead.iter().product::<usize>() != self.outer {
            return Err(Error::invalid(
                "SeqBuffer::view",
                "lead",
                format!("{lead:?} does not multiply to the buffer's {} rows", self.outer),
            ));
        }
        let mut dims = lead.to_vec();
        dims.extend([self.len, self.inner]);
        match &self.data {
            Backing::Host { storage, alloc } => {
                let mut strides = vec![0; dims.len()];
                let (r, mut acc) = (lead.len(), alloc * self.inner);
                strides[r] = self.inner;
                strides[r + 1] = 1;
                for i in (0..r).rev() {
                    strides[i] = acc;
                    acc *= lead[i];
                }
                let layout = Layout::new(Shape::new(dims), strides, 0)?;
                Tensor::from_arc_storage(storage.clone(), layout, self.device.clone())
            }
            Backing::Concat(Some(t)) => t.reshape(dims),
            Backing::Concat(None) => Tensor::zeros(dims, self.dtype, &self.device),
        }
    }

    /// Appends `n` tokens given as `parts`, each `(outer, n, w_i)` with `Σ w_i = inner`: part `i`
    /// fills columns `Σ_{j<i} w_j ..` of each new row. Any strides. The caller has checked the
    /// shapes, dtypes and the capacity; violations are still errors here.
    pub(crate) fn append(&mut self, parts: &[&Tensor]) -> Result<()> {
        const OP: &str = "SeqBuffer::append";
        let first = parts.first().ok_or_else(|| Error::invalid(OP, "parts", "nothing to append"))?;
        let n = first.dims().get(1).copied().unwrap_or(0);
        let mut width = 0;
        for p in parts {
            let d = p.dims();
            if d.len() != 3 || d[0] != self.outer || d[1] != n || p.dtype() != self.dtype {
                return Err(Error::bad_shape(
                    OP,
                    p.shape(),
                    format!("expected ({}, {n}, _) of {}", self.outer, self.dtype),
                ));
            }
            width += d[2];
        }
        if width != self.inner {
            return Err(Error::invalid(
                OP,
                "parts",
                format!("widths add to {width}, expected {}", self.inner),
            ));
        }
        let need = self.len + n;
        if need > self.capacity {
            return Err(Error::invalid(
                OP,
                "parts",
                format!("{} + {n} tokens exceed the capacity of {}", self.len, self.capacity),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (outer, inner, len) = (self.outer, self.inner, self.len);
        match &mut self.data {
            Backing::Host { storage, alloc } => {
                if need > *alloc {
                    let new_alloc = need.max(2 * *alloc).max(MIN_ALLOC).min(self.capacity);
                    let old = storage.as_cpu().ok_or_else(|| host_only(OP))?;
                    let g = Grow { outer, inner, len, from: *alloc, to: new_alloc };
                    let grown = match old {
                        CpuStorage::F32(v) => CpuStorage::F32(g.run(v)),
                        CpuStorage::F64(v) => CpuStorage::F64(g.run(v)),
                        CpuStorage::BF16(v) => CpuStorage::BF16(g.run(v)),
                        CpuStorage::F16(v) => CpuStorage::F16(g.run(v)),
                        CpuStorage::I64(v) => CpuStorage::I64(g.run(v)),
                        CpuStorage::U32(v) => CpuStorage::U32(g.run(v)),
                    };
                    *storage = Arc::new(Storage::Cpu(grown));
                    *alloc = new_alloc;
                } else if Arc::get_mut(storage).is_none() {
                    // A caller still holds a view of the buffer: copy on write, so that view keeps
                    // showing what it showed.
                    let copy = storage.as_cpu().ok_or_else(|| host_only(OP))?.clone();
                    *storage = Arc::new(Storage::Cpu(copy));
                }
                let Some(Storage::Cpu(dst)) = Arc::get_mut(storage) else {
                    return Err(host_only(OP));
                };
                let mut col = 0;
                for p in parts {
                    let w = p.dims()[2];
                    let at = Write { outer, inner, alloc: *alloc, len, n, col, w };
                    match dst {
                        CpuStorage::F32(d) => at.run(d, p)?,
                        CpuStorage::F64(d) => at.run(d, p)?,
                        CpuStorage::BF16(d) => at.run(d, p)?,
                        CpuStorage::F16(d) => at.run(d, p)?,
                        CpuStorage::I64(d) => at.run(d, p)?,
                        CpuStorage::U32(d) => at.run(d, p)?,
                    }
                    col += w;
                }
            }
            Backing::Concat(content) => {
                let new = if parts.len() == 1 { parts[0].clone() } else { ops::concat(parts, 2)? };
                *content = Some(match content.take() {
                    Some(old) => ops::concat(&[&old, &new], 1)?,
                    None => ops::contiguous(&new)?,
                });
            }
        }
        self.len = need;
        Ok(())
    }
}

fn host_only(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "the in-place buffer lives in host memory".into() }
}

/// Copies the first `len` slots of every row from a buffer of `from` slots to one of `to`.
#[derive(Clone, Copy)]
struct Grow {
    outer: usize,
    inner: usize,
    len: usize,
    from: usize,
    to: usize,
}

impl Grow {
    fn run<T: WithDType>(self, v: &[T]) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); self.outer * self.to * self.inner];
        let live = self.len * self.inner;
        for o in 0..self.outer {
            out[o * self.to * self.inner..][..live].copy_from_slice(&v[o * self.from * self.inner..][..live]);
        }
        out
    }
}

/// Where one part of an append goes: rows `len..len+n`, columns `col..col+w`.
#[derive(Clone, Copy)]
struct Write {
    outer: usize,
    inner: usize,
    alloc: usize,
    len: usize,
    n: usize,
    col: usize,
    w: usize,
}

impl Write {
    fn run<T: WithDType>(self, dst: &mut [T], part: &Tensor) -> Result<()> {
        let src = part.cpu_data::<T>()?;
        for o in 0..self.outer {
            for t in 0..self.n {
                let d = (o * self.alloc + self.len + t) * self.inner + self.col;
                let s = (o * self.n + t) * self.w;
                dst[d..d + self.w].copy_from_slice(&src[s..s + self.w]);
            }
        }
        Ok(())
    }
}

/// The keys and values of one GQA attention layer seen so far, for decoding.
///
/// `k()` and `v()` are `(batch, kv_heads, len, head_dim)` (strided views of the buffer). The cache
/// holds at most `capacity` tokens, belongs to the layer named [`KvCache::layer`] (the layer's
/// parameter path) and stores `2 · kv_heads · head_dim` numbers per token.
/// [`Attention::forward_step`](crate::attention::Attention::forward_step) appends to it.
#[derive(Clone, Debug)]
pub struct KvCache {
    layer: String,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    k: SeqBuffer,
    v: SeqBuffer,
}

impl KvCache {
    /// An empty cache for layer `layer` of `batch` sequences, at most `capacity` tokens each.
    pub fn new(
        layer: impl Into<String>,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op: "KvCache::new",
                dtype,
                hint: "; a KV cache holds f32, f64, bf16 or f16".into(),
            });
        }
        let outer = batch * kv_heads;
        Ok(KvCache {
            layer: layer.into(),
            batch,
            kv_heads,
            head_dim,
            k: SeqBuffer::new(outer, head_dim, capacity, dtype, device),
            v: SeqBuffer::new(outer, head_dim, capacity, dtype, device),
        })
    }

    /// The parameter path of the layer this cache belongs to.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// Tokens cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.k.len()
    }

    /// Whether no token is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.k.capacity
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Width of each head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.k.dtype
    }

    /// The device holding the cache.
    pub fn device(&self) -> &Device {
        &self.k.device
    }

    /// Cached keys, `(batch, kv_heads, len, head_dim)` (a view).
    pub fn k(&self) -> Result<Tensor> {
        self.k.view(&[self.batch, self.kv_heads])
    }

    /// Cached values, `(batch, kv_heads, len, head_dim)` (a view).
    pub fn v(&self) -> Result<Tensor> {
        self.v.view(&[self.batch, self.kv_heads])
    }

    /// Numbers stored per token and sequence: `2 · kv_heads · head_dim`.
    pub fn numbers_per_token(&self) -> usize {
        2 * self.kv_heads * self.head_dim
    }

    /// Bytes stored per token and sequence.
    pub fn bytes_per_token(&self) -> usize {
        self.numbers_per_token() * self.dtype().size_in_bytes()
    }

    /// Token slots currently allocated (at least `len`, at most `capacity`).
    pub fn allocated(&self) -> usize {
        self.k.allocated()
    }

    /// Forgets every token (keeps the allocation), for a new sequence.
    pub fn clear(&mut self) {
        self.k.clear();
        self.v.clear();
    }

    /// Keeps the first `len` tokens (no-op when it holds no more), e.g. to re-run a step or to
    /// drop rejected speculative tokens. O(1) on the CPU.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.k.truncate(len)?;
        self.v.truncate(len)
    }

    /// Appends `k`, `v` of shape `(batch, kv_heads, n, head_dim)` (any strides). Errors naming the
    /// layer on a shape, dtype or device mismatch, or when `len + n` exceeds the capacity.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        const OP: &str = "KvCache::append";
        let want = [self.batch, self.kv_heads];
        for (name, t) in [("k", k), ("v", v)] {
            let d = t.dims();
            if d.len() != 4
                || d[..2] != want
                || d[3] != self.head_dim
                || d[2] != k.dims().get(2).copied().unwrap_or(0)
            {
                return Err(Error::invalid(
                    OP,
                    if name == "k" { "k" } else { "v" },
                    format!(
                        "{name} has shape {}, the cache of layer `{}` expects ({}, {}, n, {})",
                        t.shape(),
                        self.layer,
                        self.batch,
                        self.kv_heads,
                        self.head_dim
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
        let n = k.dims()[2];
        check_capacity(OP, &self.layer, self.len(), n, self.capacity())?;
        let flat = |t: &Tensor| -> Result<Tensor> {
            let t = ops::contiguous(t)?;
            t.reshape((self.batch * self.kv_heads, n, self.head_dim))
        };
        self.k.append(&[&flat(k)?])?;
        self.v.append(&[&flat(v)?])
    }
}

/// The error for a cache of layer `cache_layer` handed to layer `layer`; `new_cache` names the
/// constructor that makes the right one (in the hint).
pub(crate) fn check_layer(op: &'static str, cache_layer: &str, layer: &str, new_cache: &str) -> Result<()> {
    if cache_layer != layer {
        return Err(Error::invalid(
            op,
            "cache",
            format!(
                "the cache belongs to layer `{cache_layer}`, not to `{layer}`. HINT: keep one cache per \
                 layer ({new_cache})"
            ),
        ));
    }
    Ok(())
}

/// The error for appending `n` tokens to a cache holding `len` of `capacity`.
pub(crate) fn check_capacity(
    op: &'static str,
    layer: &str,
    len: usize,
    n: usize,
    capacity: usize,
) -> Result<()> {
    if len + n > capacity {
        return Err(Error::invalid(
            op,
            "cache",
            format!(
                "the cache of layer `{layer}` holds {len} of at most {capacity} tokens; {n} more do not fit. \
                 HINT: create it with a larger capacity, or clear() it for a new sequence"
            ),
        ));
    }
    Ok(())
}
