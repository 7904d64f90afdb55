//! Causal depthwise conv1d: forward, backward and the single-step update.
//!
//! `out[b, c, t] = act(bias[c] + Σ_{j<k} weight[c, j] · x[b, c, t - (k-1) + j])` with `x` taken as
//! zero before the start of the row (and, with `seq_idx`, before the start of the token's own
//! document). `weight[:, k-1]` multiplies the current token (the HF/PyTorch `Conv1d` weight
//! `(d, 1, k)` with dim 1 squeezed). `act` is SiLU when `silu` is set, else the identity.
//!
//! Layout: `x` may be any strided view. When `x` is channel-last in memory (stride 1 along `d`,
//! e.g. the transposed view of a `(b, l, d)` tensor, as the Mamba blocks pass it), the output
//! (and `grad x` in the backward) is a `(b, d, l)` view of a fresh `(b, l, d)`-contiguous tensor,
//! so that transposing it back costs nothing; otherwise it is `(b, d, l)`-contiguous.

use moeba_tensor::{DType, Device, Error, Result, Tensor};

use super::{check_float, check_same};

/// The gradients of [`causal_conv1d_backward`].
#[derive(Debug, Clone)]
pub struct Conv1dGrads {
    /// `(b, d, l)`: gradient of `x`.
    pub x: Tensor,
    /// `(d, k)`: gradient of `weight`.
    pub weight: Tensor,
    /// `(d)`: gradient of `bias`, when a bias was given.
    pub bias: Option<Tensor>,
}

/// Checks the arguments shared by the conv1d ops; returns `(b, d, l, k)`.
fn check_conv(
    op: &'static str,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    seq_idx: Option<&Tensor>,
) -> Result<(usize, usize, usize, usize)> {
    check_float(op, x)?;
    check_same(op, x, weight)?;
    if x.rank() != 3 {
        return Err(Error::bad_shape(op, x.shape(), "x must be (batch, channels, length)"));
    }
    let (b, d, l) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    if weight.rank() != 2 || weight.dims()[0] != d || weight.dims()[1] == 0 {
        return Err(Error::invalid(
            op,
            "weight",
            format!(
                "expected (d, k) = ({d}, k >= 1) for x {}, got {} (HINT: squeeze dim 1 of an HF (d, 1, k) \
                 conv1d weight)",
                x.shape(),
                weight.shape()
            ),
        ));
    }
    let k = weight.dims()[1];
    if let Some(bias) = bias {
        check_same(op, x, bias)?;
        if bias.dims() != [d] {
            return Err(Error::invalid(op, "bias", format!("expected ({d}), got {}", bias.shape())));
        }
    }
    if let Some(s) = seq_idx {
        check_seq_idx(op, s, b, l, x.device())?;
    }
    Ok((b, d, l, k))
}

/// Checks a `seq_idx` argument: `(b, l)`, U32 or I64, on `device`.
pub(crate) fn check_seq_idx(op: &'static str, s: &Tensor, b: usize, l: usize, device: &Device) -> Result<()> {
    if !matches!(s.dtype(), DType::U32 | DType::I64) {
        return Err(Error::invalid(op, "seq_idx", format!("must be u32 or i64, got {}", s.dtype())));
    }
    if s.dims() != [b, l] {
        return Err(Error::invalid(
            op,
            "seq_idx",
            format!("expected (batch, length) = ({b}, {l}), got {}", s.shape()),
        ));
    }
    if !s.device().same_device(device) {
        return Err(Error::DeviceMismatch { op, lhs: device.to_string(), rhs: s.device().to_string() });
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn no_cuda(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "no CUDA kernel yet; HINT: move the inputs to the CPU".into() }
}

/// Causal depthwise conv1d: `x (b, d, l)`, `weight (d, k)`, `bias (d)` → `(b, d, l)`, then SiLU
/// when `silu`. With `seq_idx (b, l)` (U32/I64 document id per token), the window restarts
/// wherever the id changes (packed documents do not see each other).
pub fn causal_conv1d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    seq_idx: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "causal_conv1d";
    check_conv(OP, x, weight, bias, seq_idx)?;
    match x.device() {
        Device::Cpu => crate::cpu::conv1d::causal_conv1d(x, weight, bias, silu, seq_idx),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(no_cuda(OP)),
    }
}

/// The backward of [`causal_conv1d`] for the cotangent `grad_out (b, d, l)`: the gradients of
/// `x`, `weight` and (when given) `bias`. Deterministic: the same inputs give bit-identical
/// gradients whatever the thread count.
pub fn causal_conv1d_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    seq_idx: Option<&Tensor>,
    grad_out: &Tensor,
) -> Result<Conv1dGrads> {
    const OP: &str = "causal_conv1d_backward";
    check_conv(OP, x, weight, bias, seq_idx)?;
    check_same(OP, x, grad_out)?;
    if grad_out.shape() != x.shape() {
        return Err(Error::ShapeMismatch { op: OP, lhs: x.shape().clone(), rhs: grad_out.shape().clone() });
    }
    match x.device() {
        Device::Cpu => crate::cpu::conv1d::causal_conv1d_backward(x, weight, bias, silu, seq_idx, grad_out),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(no_cuda(OP)),
    }
}

/// One decoding step: `conv_state (b, d, k)` holds the last `k` pre-conv inputs (HF layout:
/// oldest first, the newest in column `k-1`, as HF `MambaCache` keeps it). Shifts `x (b, d)` in
/// and returns `(out (b, d), new_state (b, d, k))`, `out` as [`causal_conv1d`] gives for the
/// newest token.
pub fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "causal_conv1d_update";
    check_float(OP, x)?;
    check_same(OP, x, conv_state)?;
    check_same(OP, x, weight)?;
    if x.rank() != 2 {
        return Err(Error::bad_shape(OP, x.shape(), "x must be (batch, channels)"));
    }
    let (b, d) = (x.dims()[0], x.dims()[1]);
    if weight.rank() != 2 || weight.dims()[0] != d || weight.dims()[1] == 0 {
        return Err(Error::invalid(
            OP,
            "weight",
            format!("expected (d, k) = ({d}, k >= 1), got {}", weight.shape()),
        ));
    }
    let k = weight.dims()[1];
    if conv_state.dims() != [b, d, k] {
        return Err(Error::invalid(
            OP,
            "conv_state",
            format!("expected (batch, d, k) = ({b}, {d}, {k}), got {}", conv_state.shape()),
        ));
    }
    if let Some(bias) = bias {
        check_same(OP, x, bias)?;
        if bias.dims() != [d] {
            return Err(Error::invalid(OP, "bias", format!("expected ({d}), got {}", bias.shape())));
        }
    }
    match x.device() {
        Device::Cpu => crate::cpu::conv1d::causal_conv1d_update(x, conv_state, weight, bias, silu),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(no_cuda(OP)),
    }
}
