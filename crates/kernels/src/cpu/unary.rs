//! Elementwise unary ops on the CPU: every [`UnaryOp`], its fused backward, affine, powf, clamp.
//!
//! Inputs of any layout are walked in runs (see [`super::binary`]); the output is contiguous
//! and written in parallel chunks when large. f32: the SIMD kernels of [`super::simd`] for
//! neg, abs, relu, sqr, sqrt, recip, exp, sigmoid, silu, gelu, affine and clamp; scalar `std`
//! code for log, tanh, softplus, powf and every backward. f64: scalar `std` code. bf16/f16: the
//! f32 kernels on widened runs, rounded once.

use std::mem::MaybeUninit;

use moeba_tensor::{CpuStorage, Error, Result, Tensor};
use num_traits::Float;

use super::binary::{cpu_storage, fmax, half_binary, half_unary, map_binary, map_unary, zip_with};
use super::simd::{self, Arg, MapOp};
use crate::ops::*;

/// `√(2/π)`, the GELU tanh-approximation constant.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

#[inline(always)]
fn c<F: Float>(v: f64) -> F {
    F::from(v).unwrap_or_else(F::nan)
}

#[inline(always)]
fn sigmoid<F: Float>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

/// `op(x)` in scalar code (f64, and the f32 ops without a SIMD kernel).
#[inline(always)]
pub(crate) fn unary_scalar<F: Float>(op: UnaryOp, x: F) -> F {
    let one = F::one();
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Gelu => {
            let u = c::<F>(SQRT_2_OVER_PI) * (x + c::<F>(GELU_C) * x * x * x);
            c::<F>(0.5) * x * (one + u.tanh())
        }
        UnaryOp::Softplus => {
            if x > c(20.0) {
                x
            } else {
                x.exp().ln_1p()
            }
        }
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Relu => fmax(x, F::zero()),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Recip => one / x,
        UnaryOp::Sqr => x * x,
    }
}

/// `dy * op'(x)` in scalar code. Conventions: relu' = 1 for x > 0 else 0; abs' = sign(x)
/// with sign(0) = 0; softplus' = 1 above the threshold 20.
#[inline(always)]
pub(crate) fn unary_grad<F: Float>(op: UnaryOp, x: F, dy: F) -> F {
    let one = F::one();
    let zero = F::zero();
    match op {
        UnaryOp::Neg => -dy,
        UnaryOp::Exp => dy * x.exp(),
        UnaryOp::Log => dy / x,
        UnaryOp::Sqrt => dy / (c::<F>(2.0) * x.sqrt()),
        UnaryOp::Silu => {
            let s = sigmoid(x);
            dy * s * (one + x * (one - s))
        }
        UnaryOp::Gelu => {
            let k = c::<F>(SQRT_2_OVER_PI);
            let a = c::<F>(GELU_C);
            let t = (k * (x + a * x * x * x)).tanh();
            let half = c::<F>(0.5);
            dy * (half * (one + t) + half * x * (one - t * t) * k * (one + c::<F>(3.0) * a * x * x))
        }
        UnaryOp::Softplus => {
            if x > c(20.0) {
                dy
            } else {
                dy * sigmoid(x)
            }
        }
        UnaryOp::Sigmoid => {
            let s = sigmoid(x);
            dy * s * (one - s)
        }
        UnaryOp::Tanh => {
            let t = x.tanh();
            dy * (one - t * t)
        }
        UnaryOp::Relu => {
            if x > zero {
                dy
            } else {
                zero
            }
        }
        UnaryOp::Abs => {
            if x > zero {
                dy
            } else if x < zero {
                -dy
            } else if x.is_nan() {
                x
            } else {
                zero
            }
        }
        UnaryOp::Recip => -dy / (x * x),
        UnaryOp::Sqr => c::<F>(2.0) * x * dy,
    }
}

/// The SIMD map for `op`, if it has one.
fn map_op(op: UnaryOp) -> Option<MapOp> {
    Some(match op {
        UnaryOp::Neg => MapOp::Neg,
        UnaryOp::Exp => MapOp::Exp,
        UnaryOp::Sqrt => MapOp::Sqrt,
        UnaryOp::Silu => MapOp::Silu,
        UnaryOp::Gelu => MapOp::Gelu,
        UnaryOp::Sigmoid => MapOp::Sigmoid,
        UnaryOp::Relu => MapOp::Relu,
        UnaryOp::Abs => MapOp::Abs,
        UnaryOp::Recip => MapOp::Recip,
        UnaryOp::Sqr => MapOp::Sqr,
        UnaryOp::Log | UnaryOp::Softplus | UnaryOp::Tanh => return None,
    })
}

/// `out[i] = f(x[i])` as a plain loop.
#[inline(always)]
fn map_scalar<T: Copy>(x: &[T], out: &mut [MaybeUninit<T>], f: impl Fn(T) -> T) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(f(v));
    }
}

/// An elementwise function as an f32 kernel (SIMD where there is one, else scalar).
#[derive(Clone, Copy)]
enum Fun {
    Unary(UnaryOp),
    Map(MapOp),
    Powf(f64),
}

impl Fun {
    /// `stream`: write with non-temporal stores (outputs far larger than the caches).
    fn f32_kernel(self, stream: bool) -> impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync {
        let map = move |m, x: &[f32], out: &mut [MaybeUninit<f32>]| {
            if stream {
                simd::map_f32_stream(m, x, out)
            } else {
                simd::map_f32(m, x, out)
            }
        };
        move |x, out| match self {
            Fun::Map(m) => map(m, x, out),
            Fun::Unary(op) => match map_op(op) {
                Some(m) => map(m, x, out),
                None => match op {
                    UnaryOp::Log => map_scalar(x, out, f32::ln),
                    UnaryOp::Tanh => map_scalar(x, out, f32::tanh),
                    _ => map_scalar(x, out, |v| unary_scalar(op, v)),
                },
            },
            Fun::Powf(e) => {
                let e = e as f32;
                map_scalar(x, out, |v| v.powf(e))
            }
        }
    }
}

fn run_unary(
    name: &'static str,
    x: &Tensor,
    f32k: Fun,
    f64k: impl Fn(&[f64], &mut [MaybeUninit<f64>]) + Sync,
) -> Result<Tensor> {
    let l = x.layout();
    let stream = x.elem_count() * 4 >= simd::STREAM_MIN_BYTES;
    let storage = match cpu_storage(name, x)? {
        CpuStorage::F32(v) => CpuStorage::F32(map_unary(v, l, f32k.f32_kernel(stream))),
        CpuStorage::F64(v) => CpuStorage::F64(map_unary(v, l, f64k)),
        CpuStorage::BF16(v) => CpuStorage::BF16(map_unary(v, l, half_unary(f32k.f32_kernel(false)))),
        CpuStorage::F16(v) => CpuStorage::F16(map_unary(v, l, half_unary(f32k.f32_kernel(false)))),
        s => return Err(float_only(name, s.dtype())),
    };
    Tensor::from_cpu_storage(storage, x.shape().clone())
}

fn float_only(op: &'static str, dtype: moeba_tensor::DType) -> Error {
    Error::UnsupportedDType { op, dtype, hint: "; expected f32, f64, bf16 or f16".into() }
}

/// See [`crate::ops::unary`].
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    run_unary(op.name(), x, Fun::Unary(op), move |x: &[f64], out: &mut [MaybeUninit<f64>]| {
        map_scalar(x, out, |v| unary_scalar(op, v))
    })
}

/// See [`crate::ops::unary_backward`].
pub fn unary_backward(x: &Tensor, dy: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let name = op.name();
    if x.shape() != dy.shape() {
        return Err(Error::ShapeMismatch {
            op: "unary_backward",
            lhs: x.shape().clone(),
            rhs: dy.shape().clone(),
        });
    }
    let shape = x.shape();
    let (lx, ld) = (x.layout(), dy.layout());
    let k32 = move |a: Arg<'_, f32>, b: Arg<'_, f32>, out: &mut [MaybeUninit<f32>]| {
        if let (Arg::Slice(x), Arg::Slice(dy)) = (a, b) {
            if grad_f32_simd(op, x, dy, out) {
                return;
            }
        }
        zip_with(a, b, out, |x, dy| unary_grad(op, x, dy))
    };
    let storage = match (cpu_storage(name, x)?, cpu_storage(name, dy)?) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(map_binary(a, lx, b, ld, shape, k32)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(map_binary(a, lx, b, ld, shape, move |a, b, out| {
                zip_with(a, b, out, |x, dy| unary_grad(op, x, dy))
            }))
        }
        (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
            CpuStorage::BF16(map_binary(a, lx, b, ld, shape, half_binary(k32)))
        }
        (CpuStorage::F16(a), CpuStorage::F16(b)) => {
            CpuStorage::F16(map_binary(a, lx, b, ld, shape, half_binary(k32)))
        }
        _ if x.dtype() != dy.dtype() => {
            return Err(Error::DTypeMismatch { op: name, lhs: x.dtype(), rhs: dy.dtype() })
        }
        _ => return Err(float_only(name, x.dtype())),
    };
    Tensor::from_cpu_storage(storage, shape.clone())
}

/// `out = dy · op'(x)` for the f32 ops whose derivative needs a transcendental function
/// (exp, sigmoid, silu, softplus): the SIMD map of [`simd`] computes `e^x` or `σ(x)` into `out`,
/// then a plain loop (which the compiler vectorises) finishes the derivative in place. The scalar
/// [`unary_grad`] stays the reference (tests compare both on every SIMD path). Returns false,
/// writing nothing, for the other ops.
fn grad_f32_simd(op: UnaryOp, x: &[f32], dy: &[f32], out: &mut [MaybeUninit<f32>]) -> bool {
    let pre = match op {
        UnaryOp::Exp => MapOp::Exp,
        UnaryOp::Silu | UnaryOp::Sigmoid | UnaryOp::Softplus => MapOp::Sigmoid,
        _ => return false,
    };
    let n = out.len();
    let (x, dy) = (&x[..n], &dy[..n]);
    simd::map_f32(pre, x, out);
    // SAFETY: `map_f32` initialised every element of `out`; f32 has no invalid bit patterns.
    let v: &mut [f32] = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
    match op {
        UnaryOp::Exp => v.iter_mut().zip(dy).for_each(|(e, &g)| *e *= g),
        UnaryOp::Sigmoid => v.iter_mut().zip(dy).for_each(|(s, &g)| *s = g * *s * (1.0 - *s)),
        UnaryOp::Silu => {
            v.iter_mut().zip(x).zip(dy).for_each(|((s, &x), &g)| *s = g * *s * (1.0 + x * (1.0 - *s)))
        }
        _ => v.iter_mut().zip(x).zip(dy).for_each(|((s, &x), &g)| *s = if x > 20.0 { g } else { g * *s }),
    }
    true
}

/// See [`crate::ops::affine`].
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    let f32k = Fun::Map(MapOp::Affine { mul: mul as f32, add: add as f32 });
    run_unary("affine", x, f32k, move |x: &[f64], out: &mut [MaybeUninit<f64>]| {
        map_scalar(x, out, |v| v * mul + add)
    })
}

/// See [`crate::ops::powf`].
pub fn powf(x: &Tensor, e: f64) -> Result<Tensor> {
    run_unary("powf", x, Fun::Powf(e), move |x: &[f64], out: &mut [MaybeUninit<f64>]| {
        map_scalar(x, out, |v| v.powf(e))
    })
}

/// See [`crate::ops::clamp`].
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    if lo > hi || lo.is_nan() || hi.is_nan() {
        return Err(Error::invalid("clamp", "lo/hi", format!("need lo <= hi, got lo {lo}, hi {hi}")));
    }
    let f32k = Fun::Map(MapOp::Clamp { lo: lo as f32, hi: hi as f32 });
    run_unary("clamp", x, f32k, move |x: &[f64], out: &mut [MaybeUninit<f64>]| {
        map_scalar(x, out, |v| super::binary::fmin(fmax(v, lo), hi))
    })
}
