//! Launchers of kernels/elementwise.cu: unary ops (and affine, powf, clamp), their backward, and
//! binary ops with broadcasting.

use moeba_tensor::{Layout, Result, Shape, Tensor};

use super::ffi::{self, BinaryParams, UnaryParams};
use super::runtime::{alloc_out, coalesce, fixed, float_suffix, kernels, launch, narrow_index, parts, ptr};
use crate::ops::{BinaryOp, UnaryOp};

/// Threads per block and blocks per SM of the elementwise grid-stride loops.
const THREADS: u32 = 256;
const BLOCKS_PER_SM: u32 = 16;

/// The [`UnaryParams`] of an elementwise pass over `shape` reading `x` (and `dy`), writing a
/// contiguous output, or a strided one through `y` when given.
pub(crate) fn unary_params(
    op: &'static str,
    shape: &Shape,
    x: &Layout,
    dy: Option<&Layout>,
    y: Option<&Layout>,
) -> Result<UnaryParams> {
    let contiguous_y = Layout::contiguous(shape.clone());
    let y = y.unwrap_or(&contiguous_y);
    let dy_l = dy.unwrap_or(x);
    let c = coalesce(shape.dims(), &[x.strides(), dy_l.strides(), y.strides()]);
    Ok(UnaryParams {
        numel: shape.elem_count() as i64,
        rank: c.dims.len() as i32,
        op: 0,
        x_contiguous: x.is_contiguous() as i32,
        dy_contiguous: dy_l.is_contiguous() as i32,
        y_contiguous: y.is_contiguous() as i32,
        _pad: 0,
        s0: 0.0,
        s1: 0.0,
        dims: fixed(op, shape, &c.dims)?,
        x_strides: fixed(op, shape, &c.strides[0])?,
        dy_strides: fixed(op, shape, &c.strides[1])?,
        y_strides: fixed(op, shape, &c.strides[2])?,
    })
}

fn unary_code(op: UnaryOp) -> u32 {
    match op {
        UnaryOp::Neg => ffi::MOEBA_UNARY_NEG,
        UnaryOp::Exp => ffi::MOEBA_UNARY_EXP,
        UnaryOp::Log => ffi::MOEBA_UNARY_LOG,
        UnaryOp::Sqrt => ffi::MOEBA_UNARY_SQRT,
        UnaryOp::Silu => ffi::MOEBA_UNARY_SILU,
        UnaryOp::Gelu => ffi::MOEBA_UNARY_GELU,
        UnaryOp::Softplus => ffi::MOEBA_UNARY_SOFTPLUS,
        UnaryOp::Sigmoid => ffi::MOEBA_UNARY_SIGMOID,
        UnaryOp::Tanh => ffi::MOEBA_UNARY_TANH,
        UnaryOp::Relu => ffi::MOEBA_UNARY_RELU,
        UnaryOp::Abs => ffi::MOEBA_UNARY_ABS,
        UnaryOp::Recip => ffi::MOEBA_UNARY_RECIP,
        UnaryOp::Sqr => ffi::MOEBA_UNARY_SQR,
    }
}

/// Runs `unary_<dtype>` with op `code` and scalars `s0`, `s1` over `x`.
fn run_unary(op: &'static str, x: &Tensor, code: u32, s0: f64, s1: f64) -> Result<Tensor> {
    let (_, dev) = parts(op, x)?;
    let sfx = float_suffix(op, x.dtype())?;
    let out = alloc_out(dev, x.shape().clone(), x.dtype())?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let x = &narrow_index(x)?;
    let mut p = unary_params(op, x.shape(), x.layout(), None, None)?;
    p.op = code as i32;
    p.s0 = s0;
    p.s1 = s1;
    let k = kernels(dev)?;
    let (xp, yp) = (ptr(x)?, ptr(&out)?);
    launch!(k, &format!("unary_{sfx}"), k.grid_1d(n, THREADS, BLOCKS_PER_SM), &p, &xp, &yp)?;
    Ok(out)
}

/// See [`crate::ops::unary`].
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    run_unary(op.name(), x, unary_code(op), 0.0, 0.0)
}

/// See [`crate::ops::unary_backward`].
pub fn unary_backward(x: &Tensor, dy: &Tensor, op: UnaryOp) -> Result<Tensor> {
    let name = op.name();
    let (_, dev) = parts(name, x)?;
    parts(name, dy)?;
    let sfx = float_suffix(name, x.dtype())?;
    let out = alloc_out(dev, x.shape().clone(), x.dtype())?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let (x, dy) = (&narrow_index(x)?, &narrow_index(dy)?);
    let mut p = unary_params(name, x.shape(), x.layout(), Some(dy.layout()), None)?;
    p.op = unary_code(op) as i32;
    let k = kernels(dev)?;
    let (xp, dyp, dxp) = (ptr(x)?, ptr(dy)?, ptr(&out)?);
    launch!(k, &format!("unary_backward_{sfx}"), k.grid_1d(n, THREADS, BLOCKS_PER_SM), &p, &xp, &dyp, &dxp)?;
    Ok(out)
}

/// See [`crate::ops::affine`].
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    run_unary("affine", x, ffi::MOEBA_UNARY_AFFINE, mul, add)
}

/// See [`crate::ops::powf`].
pub fn powf(x: &Tensor, e: f64) -> Result<Tensor> {
    run_unary("powf", x, ffi::MOEBA_UNARY_POWF, e, 0.0)
}

/// See [`crate::ops::clamp`].
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    run_unary("clamp", x, ffi::MOEBA_UNARY_CLAMP, lo, hi)
}

/// See [`crate::ops::binary`].
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let name = op.name();
    let (_, dev) = parts(name, a)?;
    parts(name, b)?;
    let sfx = float_suffix(name, a.dtype())?;
    let shape = a.shape().broadcast_with(name, b.shape())?;
    let out = alloc_out(dev, shape.clone(), a.dtype())?;
    let n = shape.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let a = &narrow_index(&a.broadcast_as(shape.clone())?)?;
    let b = &narrow_index(&b.broadcast_as(shape.clone())?)?;
    let (al, bl) = (a.layout(), b.layout());
    let c = coalesce(shape.dims(), &[al.strides(), bl.strides()]);
    let code = match op {
        BinaryOp::Add => ffi::MOEBA_BINARY_ADD,
        BinaryOp::Sub => ffi::MOEBA_BINARY_SUB,
        BinaryOp::Mul => ffi::MOEBA_BINARY_MUL,
        BinaryOp::Div => ffi::MOEBA_BINARY_DIV,
        BinaryOp::Maximum => ffi::MOEBA_BINARY_MAXIMUM,
        BinaryOp::Minimum => ffi::MOEBA_BINARY_MINIMUM,
    };
    let p = BinaryParams {
        numel: n as i64,
        rank: c.dims.len() as i32,
        op: code as i32,
        a_contiguous: al.is_contiguous() as i32,
        b_contiguous: bl.is_contiguous() as i32,
        dims: fixed(name, &shape, &c.dims)?,
        a_strides: fixed(name, &shape, &c.strides[0])?,
        b_strides: fixed(name, &shape, &c.strides[1])?,
    };
    let k = kernels(dev)?;
    let (ap, bp, yp) = (ptr(a)?, ptr(b)?, ptr(&out)?);
    launch!(k, &format!("binary_{sfx}"), k.grid_1d(n, THREADS, BLOCKS_PER_SM), &p, &ap, &bp, &yp)?;
    Ok(out)
}
