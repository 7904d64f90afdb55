//! Attention ops: RoPE and causal (GQA, sliding-window) attention, forward and backward.
//!
//! - [`rope`] / [`rope_backward`]: rotary position embedding of `x (b, h, l, dim)` in the
//!   rotate-half (Llama, HF) or interleaved (DeepSeek-V2 HF) convention, and its inverse rotation.
//! - [`attention`] / [`attention_backward`]: softmax attention with grouped K/V heads (GQA/MQA),
//!   a bottom-right aligned causal mask and an optional sliding window, computed tile by tile
//!   with an online softmax: the `(lq × lk)` score matrix is never materialised, and the backward
//!   recomputes the probabilities from the saved log-sum-exp. Memory is `O(l)` for both.
//!
//! f32 and f64 compute natively (f64 accumulates in f64); bf16/f16 compute in f32 and round the
//! outputs once. Inputs may be any strided views; outputs are fresh contiguous tensors.

use moeba_tensor::{DType, Device, Error, Result, Tensor};

use super::RopeScaling;

/// Which pairs of features RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RopeStyle {
    /// Pairs `(i, i + dim/2)` (GPT-NeoX, Llama, HF `rotate_half`).
    #[default]
    RotateHalf,
    /// Pairs `(2i, 2i + 1)`; the output stays interleaved (DeepSeek-V2 in HF transformers).
    Interleaved,
}

/// Settings of [`rope`]: pair `i` of a token at position `p` turns by `p · theta^(-2i/dim)`
/// (with [`RopeScaling::Yarn`]: by `p · inv_freq_i` from YaRN's blended frequencies, and cos and
/// sin are multiplied by its attention factor).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeOptions {
    /// The base of the frequencies (`rope_theta`, 10000 in Llama 2).
    pub theta: f64,
    /// Which features form the rotated pairs.
    pub style: RopeStyle,
    /// Position of the first token (the cache length when decoding).
    pub position_offset: usize,
    /// Frequency scaling for long contexts (none by default).
    pub scaling: RopeScaling,
}

impl RopeOptions {
    /// Rotate-half RoPE with base `theta`, starting at position 0, unscaled.
    pub fn new(theta: f64) -> Self {
        RopeOptions { theta, style: RopeStyle::RotateHalf, position_offset: 0, scaling: RopeScaling::None }
    }

    /// The same settings with the first token at `offset`.
    pub fn with_offset(self, offset: usize) -> Self {
        RopeOptions { position_offset: offset, ..self }
    }

    /// The same settings with another pairing.
    pub fn with_style(self, style: RopeStyle) -> Self {
        RopeOptions { style, ..self }
    }

    /// The same settings with another frequency scaling.
    pub fn with_scaling(self, scaling: RopeScaling) -> Self {
        RopeOptions { scaling, ..self }
    }

    /// `(cos, sin)` of every `(position, pair)` of `l` tokens from [`RopeOptions::position_offset`]
    /// in a `dim`-wide head, row-major `(l, dim / 2)`, amplitude included, in f64.
    pub fn cos_sin_table(&self, l: usize, dim: usize) -> (Vec<f64>, Vec<f64>) {
        let inv = self.scaling.inv_freqs(dim, self.theta);
        let amp = self.scaling.amplitude();
        let (mut cos, mut sin) = (Vec::with_capacity(l * inv.len()), Vec::with_capacity(l * inv.len()));
        for t in 0..l {
            let pos = (self.position_offset + t) as f64;
            for f in &inv {
                let a = pos * f;
                cos.push(amp * a.cos());
                sin.push(amp * a.sin());
            }
        }
        (cos, sin)
    }
}

/// Settings of [`attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    /// Factor on `q·k` before the softmax (usually `1/√dk`).
    pub scale: f64,
    /// Bottom-right aligned causal mask: query `i` sits at absolute position `lk - lq + i` and
    /// sees keys `j <= lk - lq + i`.
    pub causal: bool,
    /// Sliding window `w` (needs `causal`): a query at position `p` sees keys `p - w < j <= p`.
    pub window: Option<usize>,
}

impl AttentionOptions {
    /// Causal attention with scale `1/√head_dim` and no window.
    pub fn causal(head_dim: usize) -> Self {
        AttentionOptions { scale: 1.0 / (head_dim.max(1) as f64).sqrt(), causal: true, window: None }
    }

    /// The same settings with a sliding window of `w` keys.
    pub fn with_window(self, w: usize) -> Self {
        AttentionOptions { window: Some(w), ..self }
    }
}

/// What [`attention`] returns: the output and the per-row log-sum-exp its backward needs.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `(b, hq, lq, dv)`, the inputs' dtype.
    pub out: Tensor,
    /// `(b, hq, lq)`: `ln Σ_j e^(scale · q·k_j)` over the visible keys (`-inf` for a query that
    /// sees none, whose output row is 0). f64 for f64 inputs, f32 otherwise.
    pub lse: Tensor,
}

fn check_float_op(op: &'static str, arg: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            arg,
            format!("expected a float tensor (f32, f64, bf16, f16), got {}", x.dtype()),
        ))
    }
}

fn check_like(op: &'static str, arg: &'static str, first: &Tensor, x: &Tensor) -> Result<()> {
    if x.dtype() != first.dtype() {
        return Err(Error::invalid(
            op,
            arg,
            format!("dtype {} differs from the first operand's {}", x.dtype(), first.dtype()),
        ));
    }
    if !x.device().same_device(first.device()) {
        return Err(Error::DeviceMismatch {
            op,
            lhs: first.device().to_string(),
            rhs: x.device().to_string(),
        });
    }
    Ok(())
}

fn rank4(op: &'static str, arg: &'static str, x: &Tensor, what: &str) -> Result<()> {
    if x.rank() != 4 {
        return Err(Error::invalid(op, arg, format!("expected rank 4 {what}, got shape {}", x.shape())));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn not_on_cuda(op: &'static str) -> Error {
    Error::Unsupported {
        op,
        msg: format!(
            "`{op}` is not yet implemented on CUDA; HINT: move the operands to the CPU \
             (`tensor.to_device(&Device::Cpu)`) for this op"
        ),
    }
}

/// Checks the operand and options of [`rope`] / [`rope_backward`] (rank 4, even head dim, theta).
pub fn check_rope(op: &'static str, x: &Tensor, opts: &RopeOptions) -> Result<()> {
    check_float_op(op, "x", x)?;
    rank4(op, "x", x, "(b, h, l, dim)")?;
    let dim = x.dims()[3];
    if !dim.is_multiple_of(2) {
        return Err(Error::invalid(
            op,
            "x",
            format!("RoPE rotates pairs of features: head dim {dim} of shape {} is odd", x.shape()),
        ));
    }
    if !(opts.theta.is_finite() && opts.theta > 0.0) {
        return Err(Error::invalid(op, "theta", format!("must be finite and > 0, got {}", opts.theta)));
    }
    opts.scaling.validate(op)
}

/// Rotary position embedding of `x (b, h, l, dim)` (any strides, e.g. a transposed view of
/// `(b, l, h, dim)`); token `t` sits at position `opts.position_offset + t`. Output: contiguous
/// `(b, h, l, dim)`, x's dtype. Errors if x is not rank 4 or `dim` is odd.
pub fn rope(x: &Tensor, opts: &RopeOptions) -> Result<Tensor> {
    check_rope("rope", x, opts)?;
    match x.device() {
        Device::Cpu => crate::cpu::attention::rope(x, opts, false),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda("rope")),
    }
}

/// The backward of [`rope`]: `grad_out (b, h, l, dim)` turned by the inverse rotation, times the
/// scaling's amplitude (plain RoPE is orthogonal, so this is also the inverse of [`rope`]; under
/// YaRN it is the inverse up to the amplitude squared). Output: contiguous, grad_out's dtype.
pub fn rope_backward(grad_out: &Tensor, opts: &RopeOptions) -> Result<Tensor> {
    check_rope("rope_backward", grad_out, opts)?;
    match grad_out.device() {
        Device::Cpu => crate::cpu::attention::rope(grad_out, opts, true),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda("rope_backward")),
    }
}

/// The sizes of one attention call, validated by [`check_attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Batch.
    pub b: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads (`hq` is a multiple of it).
    pub hkv: usize,
    /// Queries per head.
    pub lq: usize,
    /// Keys per head.
    pub lk: usize,
    /// Query/key head dim.
    pub dk: usize,
    /// Value head dim.
    pub dv: usize,
}

/// Checks the operands of [`attention`] (dtypes, devices, ranks, matching sizes, head counts,
/// options) and returns their sizes. Every error names the offending argument and shapes.
pub fn check_attention(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<AttentionDims> {
    check_float_op(op, "q", q)?;
    check_like(op, "k", q, k)?;
    check_like(op, "v", q, v)?;
    rank4(op, "q", q, "(b, hq, lq, dk)")?;
    rank4(op, "k", k, "(b, hkv, lk, dk)")?;
    rank4(op, "v", v, "(b, hkv, lk, dv)")?;
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let shapes = format!("q {}, k {}, v {}", q.shape(), k.shape(), v.shape());
    if kd[0] != qd[0] {
        return Err(Error::invalid(
            op,
            "k",
            format!("batch {} differs from q's {} ({shapes})", kd[0], qd[0]),
        ));
    }
    if vd[0] != qd[0] {
        return Err(Error::invalid(
            op,
            "v",
            format!("batch {} differs from q's {} ({shapes})", vd[0], qd[0]),
        ));
    }
    if vd[1] != kd[1] {
        return Err(Error::invalid(op, "v", format!("{} heads, k has {} ({shapes})", vd[1], kd[1])));
    }
    if kd[1] == 0 || qd[1] % kd[1] != 0 {
        return Err(Error::invalid(
            op,
            "num_heads",
            format!(
                "q's {} heads must be a multiple of k/v's {} heads (q head i reads kv head \
                 i / (hq / hkv)) ({shapes})",
                qd[1], kd[1]
            ),
        ));
    }
    if vd[2] != kd[2] {
        return Err(Error::invalid(op, "v", format!("{} keys, k has {} ({shapes})", vd[2], kd[2])));
    }
    if kd[3] != qd[3] {
        return Err(Error::invalid(
            op,
            "k",
            format!("head dim {} differs from q's {} ({shapes})", kd[3], qd[3]),
        ));
    }
    if !opts.scale.is_finite() {
        return Err(Error::invalid(op, "scale", format!("must be finite, got {}", opts.scale)));
    }
    if let Some(w) = opts.window {
        if w == 0 {
            return Err(Error::invalid(
                op,
                "window",
                "a window of 0 keys hides every key; use None or w >= 1",
            ));
        }
        if !opts.causal {
            return Err(Error::invalid(op, "window", "a sliding window needs causal = true"));
        }
    }
    Ok(AttentionDims { b: qd[0], hq: qd[1], hkv: kd[1], lq: qd[2], lk: kd[2], dk: qd[3], dv: vd[3] })
}

/// Memory-efficient softmax attention.
///
/// q `(b, hq, lq, dk)`, k `(b, hkv, lk, dk)`, v `(b, hkv, lk, dv)`, any strides; `hq` a multiple
/// of `hkv` (q head `i` reads kv head `i / (hq / hkv)`, K/V are never copied per head); `dv` may
/// differ from `dk` (MLA). The causal mask is bottom-right aligned (query `i` sits at absolute
/// position `lk - lq + i`; decoding is `lq < lk`); a window `w` lets a query at position `p` see
/// keys `p - w < j <= p`. Never materialises `(lq × lk)`: tiles of queries walk tiles of keys with
/// an online softmax, in parallel over (batch, head, query tile).
///
/// Errors (naming the argument): hq not a multiple of hkv, mismatched batch / key count / head
/// dim, non-float or mixed dtypes, a window of 0 or a window without `causal`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<AttentionOutput> {
    let dims = check_attention("attention", q, k, v, opts)?;
    match q.device() {
        Device::Cpu => crate::cpu::attention::attention(q, k, v, &dims, opts),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda("attention")),
    }
}

/// The backward of [`attention`]: `(grad_q, grad_k, grad_v)` of `L = Σ out ⊙ grad_out`, with the
/// shapes and dtype of q, k, v (grad_k / grad_v summed over the q heads sharing a kv head).
///
/// `fwd` is what [`attention`] returned for these inputs and options; the probabilities are
/// recomputed tile by tile from `fwd.lse` (FlashAttention-2). Deterministic (no float atomics:
/// the q heads sharing a kv head add in a fixed order) for a given thread count; memory `O(l)`.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttentionOutput,
    grad_out: &Tensor,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "attention_backward";
    let d = check_attention(op, q, k, v, opts)?;
    check_like(op, "grad_out", q, grad_out)?;
    check_like(op, "fwd.out", q, &fwd.out)?;
    let want = [d.b, d.hq, d.lq, d.dv];
    if grad_out.dims() != want {
        return Err(Error::invalid(
            op,
            "grad_out",
            format!("shape {} differs from the output's {:?}", grad_out.shape(), want),
        ));
    }
    if fwd.out.dims() != want {
        return Err(Error::invalid(
            op,
            "fwd.out",
            format!("shape {} differs from the expected {:?}", fwd.out.shape(), want),
        ));
    }
    if fwd.lse.dims() != [d.b, d.hq, d.lq] || !fwd.lse.dtype().is_float() {
        return Err(Error::invalid(
            op,
            "fwd.lse",
            format!(
                "expected a float (b, hq, lq) = {:?} tensor, got {} {}",
                [d.b, d.hq, d.lq],
                fwd.lse.dtype(),
                fwd.lse.shape()
            ),
        ));
    }
    match q.device() {
        Device::Cpu => crate::cpu::attention::attention_backward(q, k, v, fwd, grad_out, &d, opts),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda(op)),
    }
}

/// The dtype the log-sum-exp of an attention over `dtype` inputs has (f64 for f64, else f32).
pub fn attention_lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
