//! The dispatching functions: one per op. Each checks its arguments, then runs the CPU
//! implementation ([`crate::cpu`]) or the CUDA launcher (`crate::cuda`, with the `cuda` feature)
//! depending on where the inputs live. This is the API the layers above use.
//!
//! Conventions shared by every op here:
//! - float ops take f32, f64, bf16 or f16; bf16/f16 compute in f32 internally and round once
//!   at the end; index arguments are `U32` or `I64`;
//! - binary ops broadcast with numpy rules and require equal dtypes and devices;
//! - inputs may be any strided view; outputs are fresh contiguous tensors;
//! - every error names the op and the offending shapes or values.

use moeba_tensor::{DType, Device, Error, Result, Tensor};

mod attention;
mod conv1d;
mod moe;
mod rope_scaling;
mod selective_scan;
mod ssd;

pub use attention::*;
pub use conv1d::*;
pub use moe::*;
pub use rope_scaling::*;
pub use selective_scan::*;
pub use ssd::*;

/// Elementwise functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `e^x`
    Exp,
    /// natural log
    Log,
    /// square root
    Sqrt,
    /// `x * sigmoid(x)` (a.k.a. swish)
    Silu,
    /// GELU, tanh approximation: `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))`
    Gelu,
    /// `ln(1 + e^x)`, computed stably (`x` itself above 20, as torch does)
    Softplus,
    /// `1 / (1 + e^-x)`
    Sigmoid,
    /// hyperbolic tangent
    Tanh,
    /// `max(x, 0)`
    Relu,
    /// `|x|`
    Abs,
    /// `1 / x`
    Recip,
    /// `x²`
    Sqr,
}

impl UnaryOp {
    /// Every unary op, for tests that walk them all.
    pub const ALL: [UnaryOp; 13] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Silu,
        UnaryOp::Gelu,
        UnaryOp::Softplus,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Relu,
        UnaryOp::Abs,
        UnaryOp::Recip,
        UnaryOp::Sqr,
    ];

    /// The op's name in messages and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Silu => "silu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Relu => "relu",
            UnaryOp::Abs => "abs",
            UnaryOp::Recip => "recip",
            UnaryOp::Sqr => "sqr",
        }
    }
}

/// Elementwise functions of two (broadcast) arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
    /// `max(a, b)`
    Maximum,
    /// `min(a, b)`
    Minimum,
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 6] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Maximum, BinaryOp::Minimum];

    /// The op's name in messages and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
        }
    }
}

/// Reductions over a set of dims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Mean,
    /// Maximum (NaN propagates).
    Max,
    /// Minimum (NaN propagates).
    Min,
}

impl ReduceOp {
    /// The op's name in messages and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

macro_rules! dispatch {
    ($x:expr, $cpu:expr, $cuda:expr) => {
        match $x.device() {
            Device::Cpu => $cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => $cuda,
        }
    };
}

fn check_float(op: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { op, dtype: x.dtype(), hint: "; expected f32, f64, bf16 or f16".into() })
    }
}

fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    if !a.device().same_device(b.device()) {
        return Err(Error::DeviceMismatch { op, lhs: a.device().to_string(), rhs: b.device().to_string() });
    }
    Ok(())
}

fn check_index(op: &'static str, arg: &'static str, ids: &Tensor, x: &Tensor) -> Result<()> {
    if !matches!(ids.dtype(), DType::U32 | DType::I64) {
        return Err(Error::invalid(op, arg, format!("indices must be u32 or i64, got {}", ids.dtype())));
    }
    if !ids.device().same_device(x.device()) {
        return Err(Error::DeviceMismatch { op, lhs: x.device().to_string(), rhs: ids.device().to_string() });
    }
    Ok(())
}

fn check_dim(op: &'static str, x: &Tensor, dim: usize) -> Result<()> {
    if dim >= x.rank() {
        return Err(Error::DimOutOfRange { op, dim, rank: x.rank() });
    }
    Ok(())
}

// ------------------------------------------------------------------------------ elementwise

/// `op(x)` elementwise. Output: x's shape, x's dtype.
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    check_float(op.name(), x)?;
    dispatch!(x, crate::cpu::unary::unary(x, op), crate::cuda::unary(x, op))
}

/// `dy * op'(x)` elementwise: the backward of [`unary`] in one pass. `x` and `dy` have one shape.
pub fn unary_backward(x: &Tensor, dy: &Tensor, op: UnaryOp) -> Result<Tensor> {
    check_float(op.name(), x)?;
    check_same(op.name(), x, dy)?;
    if x.shape() != dy.shape() {
        return Err(Error::ShapeMismatch {
            op: "unary_backward",
            lhs: x.shape().clone(),
            rhs: dy.shape().clone(),
        });
    }
    dispatch!(x, crate::cpu::unary::unary_backward(x, dy, op), crate::cuda::unary_backward(x, dy, op))
}

/// `a op b` elementwise with broadcasting. Output: the broadcast shape.
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    check_float(op.name(), a)?;
    check_same(op.name(), a, b)?;
    a.shape().broadcast_with(op.name(), b.shape())?;
    dispatch!(a, crate::cpu::binary::binary(a, b, op), crate::cuda::binary(a, b, op))
}

/// `x * mul + add` elementwise (scaling, shifting) in one pass.
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    check_float("affine", x)?;
    dispatch!(x, crate::cpu::unary::affine(x, mul, add), crate::cuda::affine(x, mul, add))
}

/// `x^e` elementwise (real power; negative bases give NaN unless `e` is an integer).
pub fn powf(x: &Tensor, e: f64) -> Result<Tensor> {
    check_float("powf", x)?;
    dispatch!(x, crate::cpu::unary::powf(x, e), crate::cuda::powf(x, e))
}

/// `min(max(x, lo), hi)` elementwise. Errors if `lo > hi`.
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    check_float("clamp", x)?;
    if lo > hi || lo.is_nan() || hi.is_nan() {
        return Err(Error::invalid("clamp", "lo/hi", format!("need lo <= hi, got lo {lo}, hi {hi}")));
    }
    dispatch!(x, crate::cpu::unary::clamp(x, lo, hi), crate::cuda::clamp(x, lo, hi))
}

/// `a + b` with broadcasting.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add)
}
/// `a - b` with broadcasting.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Sub)
}
/// `a * b` with broadcasting.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul)
}
/// `a / b` with broadcasting.
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Div)
}
/// `-x`.
pub fn neg(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Neg)
}
/// `e^x`.
pub fn exp(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Exp)
}
/// `ln x`.
pub fn log(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Log)
}
/// `√x`.
pub fn sqrt(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Sqrt)
}
/// `x·σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Silu)
}
/// GELU (tanh approximation).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Gelu)
}
/// `ln(1 + e^x)`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Softplus)
}
/// `σ(x)`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Sigmoid)
}
/// `tanh x`.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    unary(x, UnaryOp::Tanh)
}

// ------------------------------------------------------------------------------ reductions

/// Reduces `x` over `dims` (any subset, in any order; empty = no-op copy). With `keepdim` the
/// reduced dims stay as size 1, otherwise they are removed. Sums accumulate in f64 for f64 input
/// and, for f32, in blocks of 128 summed in f32 whose totals are added in f64 (bf16/f16 as f32).
pub fn reduce(x: &Tensor, dims: &[usize], keepdim: bool, op: ReduceOp) -> Result<Tensor> {
    check_float(op.name(), x)?;
    for &d in dims {
        check_dim(op.name(), x, d)?;
    }
    dispatch!(x, crate::cpu::reduce::reduce(x, dims, keepdim, op), crate::cuda::reduce(x, dims, keepdim, op))
}

/// Sum over `dims`.
pub fn sum(x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Tensor> {
    reduce(x, dims, keepdim, ReduceOp::Sum)
}
/// Mean over `dims`.
pub fn mean(x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Tensor> {
    reduce(x, dims, keepdim, ReduceOp::Mean)
}
/// Max over `dims`.
pub fn max(x: &Tensor, dims: &[usize], keepdim: bool) -> Result<Tensor> {
    reduce(x, dims, keepdim, ReduceOp::Max)
}
/// Sum of every element: a rank-0 tensor.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    let dims: Vec<usize> = (0..x.rank()).collect();
    reduce(x, &dims, false, ReduceOp::Sum)
}

/// Index of the maximum along `dim` (the first one on ties; NaN counts as the maximum).
/// Output dtype `U32`.
pub fn argmax(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    check_float("argmax", x)?;
    check_dim("argmax", x, dim)?;
    dispatch!(x, crate::cpu::reduce::argmax(x, dim, keepdim), crate::cuda::argmax(x, dim, keepdim))
}

/// Softmax along `dim`, max-subtracted for stability.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    check_float("softmax", x)?;
    check_dim("softmax", x, dim)?;
    dispatch!(x, crate::cpu::softmax::softmax(x, dim), crate::cuda::softmax(x, dim))
}

/// Log-softmax along `dim` (`x - max - ln Σ e^(x-max)`).
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    check_float("log_softmax", x)?;
    check_dim("log_softmax", x, dim)?;
    dispatch!(x, crate::cpu::softmax::log_softmax(x, dim), crate::cuda::log_softmax(x, dim))
}

// ------------------------------------------------------------------------------ matmul

/// Matrix product `a (..., m, k) @ b (..., k, n) -> (..., m, n)`. Leading (batch) dims broadcast;
/// rank-2 operands are plain GEMMs. Transposed views are read through their strides, not copied.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_float("matmul", a)?;
    check_same("matmul", a, b)?;
    if a.rank() < 2 || b.rank() < 2 || a.dims()[a.rank() - 1] != b.dims()[b.rank() - 2] {
        return Err(Error::ShapeMismatch { op: "matmul", lhs: a.shape().clone(), rhs: b.shape().clone() });
    }
    dispatch!(a, crate::cpu::matmul::matmul(a, b), crate::cuda::matmul(a, b))
}

// ------------------------------------------------------------------------------ indexing

/// Rows of `x` along `dim` picked by the 1-d index tensor `ids`: output dim `dim` has `ids.len()`.
/// An index out of range is an error naming it.
pub fn index_select(x: &Tensor, dim: usize, ids: &Tensor) -> Result<Tensor> {
    check_dim("index_select", x, dim)?;
    check_index("index_select", "ids", ids, x)?;
    if ids.rank() != 1 {
        return Err(Error::bad_shape("index_select", ids.shape(), "ids must be 1-d"));
    }
    dispatch!(x, crate::cpu::index::index_select(x, dim, ids), crate::cuda::index_select(x, dim, ids))
}

/// Embedding lookup: `table (vocab, d)`, `ids` of any shape → `ids.shape + [d]`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if table.rank() != 2 {
        return Err(Error::bad_shape("embedding", table.shape(), "table must be (vocab, dim)"));
    }
    let flat = ids.flatten_all()?;
    let rows = index_select(table, 0, &flat)?;
    let mut shape = ids.dims().to_vec();
    shape.push(table.dims()[1]);
    rows.reshape(shape)
}

/// torch.gather: `out[i][j][k] = x[i][idx[i][j][k]][k]` for `dim = 1`, and so on. `idx` has the
/// rank of `x` and, except along `dim`, sizes no larger than `x`'s. Output: idx's shape.
pub fn gather(x: &Tensor, dim: usize, idx: &Tensor) -> Result<Tensor> {
    check_dim("gather", x, dim)?;
    check_index("gather", "idx", idx, x)?;
    dispatch!(x, crate::cpu::index::gather(x, dim, idx), crate::cuda::gather(x, dim, idx))
}

/// torch.scatter_add (out of place): a copy of `x` with `src` added at `idx` along `dim`
/// (`out[i][idx[i][j]][k] += src[i][j][k]` for `dim = 1`). `idx` and `src` share a shape.
/// Deterministic: additions happen in index order.
pub fn scatter_add(x: &Tensor, dim: usize, idx: &Tensor, src: &Tensor) -> Result<Tensor> {
    check_dim("scatter_add", x, dim)?;
    check_index("scatter_add", "idx", idx, x)?;
    check_same("scatter_add", x, src)?;
    if idx.shape() != src.shape() {
        return Err(Error::ShapeMismatch {
            op: "scatter_add",
            lhs: idx.shape().clone(),
            rhs: src.shape().clone(),
        });
    }
    dispatch!(x, crate::cpu::index::scatter_add(x, dim, idx, src), crate::cuda::scatter_add(x, dim, idx, src))
}

/// `cond ? a : b` elementwise with broadcasting over all three; `cond` is any dtype, nonzero = true.
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same("where_cond", a, b)?;
    dispatch!(a, crate::cpu::index::where_cond(cond, a, b), crate::cuda::where_cond(cond, a, b))
}

/// `x` with `value` wherever `mask` (broadcast to x's shape; nonzero = true) is set.
pub fn masked_fill(x: &Tensor, mask: &Tensor, value: f64) -> Result<Tensor> {
    let fill = Tensor::full(value, (), x.dtype(), x.device())?;
    let out = where_cond(mask, &fill, x)?;
    if out.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            op: "masked_fill",
            lhs: x.shape().clone(),
            rhs: mask.shape().clone(),
        });
    }
    Ok(out)
}

/// Joins tensors along `dim`; all other dims must agree. Works for every dtype.
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::invalid("concat", "xs", "no tensors given"))?;
    for x in xs {
        check_dim("concat", x, dim)?;
        if x.dtype() != first.dtype() {
            return Err(Error::DTypeMismatch { op: "concat", lhs: first.dtype(), rhs: x.dtype() });
        }
        let ok = x.rank() == first.rank()
            && x.dims().iter().zip(first.dims()).enumerate().all(|(i, (a, b))| i == dim || a == b);
        if !ok {
            return Err(Error::ShapeMismatch {
                op: "concat",
                lhs: first.shape().clone(),
                rhs: x.shape().clone(),
            });
        }
    }
    dispatch!(first, crate::cpu::concat::concat(xs, dim), crate::cuda::concat(xs, dim))
}

/// Stacks same-shaped tensors along a new dim `dim` (0..=rank).
pub fn stack(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let us = xs.iter().map(|x| x.unsqueeze(dim)).collect::<Result<Vec<_>>>()?;
    concat(&us.iter().collect::<Vec<_>>(), dim)
}

// ------------------------------------------------------------------------------ losses

/// Mean cross-entropy of `logits (n, vocab)` against `targets (n)` (u32 or i64), skipping the
/// rows whose target equals `ignore_index`. Returns a rank-0 tensor (0 when every row is ignored).
/// A target outside `0..vocab` (other than `ignore_index`) is an error naming the row.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<i64>) -> Result<Tensor> {
    check_float("cross_entropy", logits)?;
    check_index("cross_entropy", "targets", targets, logits)?;
    if logits.rank() != 2 || targets.rank() != 1 || targets.dims()[0] != logits.dims()[0] {
        return Err(Error::ShapeMismatch {
            op: "cross_entropy",
            lhs: logits.shape().clone(),
            rhs: targets.shape().clone(),
        });
    }
    dispatch!(
        logits,
        crate::cpu::loss::cross_entropy(logits, targets, ignore_index),
        crate::cuda::cross_entropy(logits, targets, ignore_index)
    )
}

/// Gradient of [`cross_entropy`] with respect to the logits, scaled by the rank-0 `grad`:
/// `grad * (softmax(logits) - onehot(targets)) / n_counted`, zero on ignored rows.
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
    grad: &Tensor,
) -> Result<Tensor> {
    check_float("cross_entropy_backward", logits)?;
    check_index("cross_entropy_backward", "targets", targets, logits)?;
    dispatch!(
        logits,
        crate::cpu::loss::cross_entropy_backward(logits, targets, ignore_index, grad),
        crate::cuda::cross_entropy_backward(logits, targets, ignore_index, grad)
    )
}

// ------------------------------------------------------------------------------ copies

/// A contiguous copy (or `x` itself when already contiguous), on any device.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    dispatch!(x, crate::cpu::copy::contiguous(x), crate::cuda::contiguous(x))
}

/// `x` converted to `dtype`, on any device.
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    dispatch!(x, x.to_dtype(dtype), crate::cuda::to_dtype(x, dtype))
}
