//! Helpers shared by the backward rules.

use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Shape, Tensor};

/// Sums a broadcast gradient `g` back to `shape`: over the leading dims that broadcasting added
/// and over the dims where `shape` has size 1 but `g` does not. Every binary op's backward (and
/// `broadcast_as`, `matmul`'s batch dims, `where_cond`) uses it; fused ops with broadcasting
/// inputs can too. Returns `g` itself when the shapes already agree.
pub fn reduce_to_shape(g: &Tensor, shape: &Shape) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let (gd, sd) = (g.dims(), shape.dims());
    let mismatch =
        || Error::ShapeMismatch { op: "reduce_to_shape", lhs: g.shape().clone(), rhs: shape.clone() };
    if sd.len() > gd.len() {
        return Err(mismatch());
    }
    let lead = gd.len() - sd.len();
    let mut dims: Vec<usize> = (0..lead).collect();
    for (i, &s) in sd.iter().enumerate() {
        let n = gd[lead + i];
        if s == n {
            continue;
        }
        if s != 1 {
            return Err(mismatch());
        }
        dims.push(lead + i);
    }
    ops::sum(g, &dims, true)?.reshape(shape.clone())
}

/// Which dims of a rank-`rank` tensor `dims` names (duplicates allowed, as the kernels allow).
pub(crate) fn dim_flags(rank: usize, dims: &[usize]) -> Vec<bool> {
    let mut red = vec![false; rank];
    for &d in dims {
        if let Some(r) = red.get_mut(d) {
            *r = true;
        }
    }
    red
}

/// The reduced tensor `r` of a reduction over the dims flagged in `red` of `x_shape`, seen with
/// the reduced dims kept as size 1 (a view when possible).
pub(crate) fn keepdim_view(r: &Tensor, x_shape: &Shape, red: &[bool], keepdim: bool) -> Result<Tensor> {
    if keepdim {
        return Ok(r.clone());
    }
    let kept: Vec<usize> = x_shape.dims().iter().zip(red).map(|(&n, &r)| if r { 1 } else { n }).collect();
    reshape(r, kept)
}

/// `g` where `x > 0`, zero elsewhere (NaN counts as not positive): the mask primitive that the
/// max/min/clamp rules build on (relu's derivative convention in the kernels).
pub(crate) fn where_positive(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    ops::unary_backward(x, g, ops::UnaryOp::Relu)
}

/// `Some(f())` when `need`, `None` otherwise: backward rules compute only the gradients asked for.
pub(crate) fn grad_if(need: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if need {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// `t` with a new shape: a view when `t` is contiguous, else a contiguous copy first (through
/// the kernels, so it works on every device; `Tensor::reshape` copies on the CPU only).
pub(crate) fn reshape(t: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    if t.is_contiguous() {
        t.reshape(shape)
    } else {
        ops::contiguous(t)?.reshape(shape)
    }
}
