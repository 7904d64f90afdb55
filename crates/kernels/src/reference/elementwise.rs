//! Reference elementwise ops (see the module docs of `reference`).
//!
//! Every function reads its inputs through `to_vec_f64` (row-major logical order, any layout,
//! any float dtype), computes each element with the `std` f64 functions straight from the
//! definitions in [`crate::ops`], and returns a contiguous **F64** tensor. Binary ops walk the
//! output's logical multi-indices and map them to each operand by numpy broadcasting.
//!
//! Conventions (shared with the fast kernels): softplus returns `x` above 20 (as torch); GELU is
//! the tanh approximation; max/min/relu/clamp propagate NaN; in the backward, relu' = 1 for
//! `x > 0` else 0 and abs' = sign(x) with sign(0) = 0.

use moeba_tensor::{Device, Error, Result, Shape, Tensor};

use crate::ops::{BinaryOp, UnaryOp};

fn float_only(op: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { op, dtype: x.dtype(), hint: "; expected f32, f64, bf16 or f16".into() })
    }
}

fn f64_tensor(v: Vec<f64>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// NaN-propagating maximum.
pub fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// NaN-propagating minimum.
pub fn min_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

/// `op(x)` for one value, from the definition.
pub fn unary_f64(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Gelu => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
            0.5 * x * (1.0 + u.tanh())
        }
        UnaryOp::Softplus => {
            if x > 20.0 {
                x
            } else {
                x.exp().ln_1p()
            }
        }
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Relu => max_nan(x, 0.0),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Sqr => x * x,
    }
}

/// `op'(x)`, the derivative of [`unary_f64`], from the calculus.
pub fn unary_derivative_f64(op: UnaryOp, x: f64) -> f64 {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    match op {
        UnaryOp::Neg => -1.0,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Silu => sig(x) + x * sig(x) * (1.0 - sig(x)),
        UnaryOp::Gelu => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let u = k * (x + 0.044715 * x.powi(3));
            let du = k * (1.0 + 3.0 * 0.044715 * x * x);
            let sech2 = 1.0 - u.tanh().powi(2);
            0.5 * (1.0 + u.tanh()) + 0.5 * x * sech2 * du
        }
        UnaryOp::Softplus => {
            if x > 20.0 {
                1.0
            } else {
                sig(x)
            }
        }
        UnaryOp::Sigmoid => sig(x) * (1.0 - sig(x)),
        UnaryOp::Tanh => 1.0 - x.tanh().powi(2),
        UnaryOp::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        UnaryOp::Abs => {
            if x.is_nan() {
                f64::NAN
            } else if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnaryOp::Recip => -1.0 / (x * x),
        UnaryOp::Sqr => 2.0 * x,
    }
}

/// `a op b` for one pair of values.
pub fn binary_f64(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Maximum => max_nan(a, b),
        BinaryOp::Minimum => min_nan(a, b),
    }
}

fn map(op: &'static str, x: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
    float_only(op, x)?;
    let v: Vec<f64> = x.to_vec_f64()?.into_iter().map(f).collect();
    f64_tensor(v, x.shape().clone())
}

/// Reference [`crate::ops::unary`] (F64 result).
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    map(op.name(), x, |v| unary_f64(op, v))
}

/// Reference [`crate::ops::unary_backward`]: `dy * op'(x)` (F64 result).
pub fn unary_backward(x: &Tensor, dy: &Tensor, op: UnaryOp) -> Result<Tensor> {
    float_only(op.name(), x)?;
    if x.shape() != dy.shape() {
        return Err(Error::ShapeMismatch {
            op: "unary_backward",
            lhs: x.shape().clone(),
            rhs: dy.shape().clone(),
        });
    }
    let (xv, dv) = (x.to_vec_f64()?, dy.to_vec_f64()?);
    let v = xv.iter().zip(&dv).map(|(&x, &d)| d * unary_derivative_f64(op, x)).collect();
    f64_tensor(v, x.shape().clone())
}

/// Reference [`crate::ops::affine`]: `x * mul + add` (F64 result).
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    map("affine", x, |v| v * mul + add)
}

/// Reference [`crate::ops::powf`] (F64 result).
pub fn powf(x: &Tensor, e: f64) -> Result<Tensor> {
    map("powf", x, |v| v.powf(e))
}

/// Reference [`crate::ops::clamp`] (F64 result; NaN stays NaN).
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    if lo > hi || lo.is_nan() || hi.is_nan() {
        return Err(Error::invalid("clamp", "lo/hi", format!("need lo <= hi, got lo {lo}, hi {hi}")));
    }
    map("clamp", x, |v| if v.is_nan() { v } else { v.max(lo).min(hi) })
}

/// Reference [`crate::ops::binary`] with numpy broadcasting (F64 result).
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    float_only(op.name(), a)?;
    float_only(op.name(), b)?;
    let shape = a.shape().broadcast_with(op.name(), b.shape())?;
    let (av, bv) = (a.to_vec_f64()?, b.to_vec_f64()?);
    let out_dims = shape.dims().to_vec();
    // The flat index into an operand of `dims` for output multi-index `idx` (broadcast dims read 0).
    let operand_index = |idx: &[usize], dims: &[usize]| -> usize {
        let skip = out_dims.len() - dims.len();
        let mut flat = 0;
        for (d, &n) in dims.iter().enumerate() {
            let i = if n == 1 { 0 } else { idx[skip + d] };
            flat = flat * n + i;
        }
        flat
    };
    let mut out = Vec::with_capacity(shape.elem_count());
    for flat in 0..shape.elem_count() {
        let mut idx = vec![0; out_dims.len()];
        let mut rest = flat;
        for d in (0..out_dims.len()).rev() {
            idx[d] = rest % out_dims[d];
            rest /= out_dims[d];
        }
        let x = av[operand_index(&idx, a.dims())];
        let y = bv[operand_index(&idx, b.dims())];
        out.push(binary_f64(op, x, y));
    }
    f64_tensor(out, shape)
}
