//! Fused RMSNorm on the CPU: `y = w ⊙ x · (mean(x², last dim) + eps)^(-1/2)` and its backward,
//! one pass per row instead of the six elementwise ops and reductions of the composite form
//! (which stays the reference: `moeba_nn::norm::rms_norm_composite`, compared with these on
//! random shapes in the nn tests).
//!
//! f32 and f64 compute in their own type (bf16/f16 are not handled here: callers fall back to
//! the composite form). Rows run in parallel when large. The weight gradient is reduced over
//! fixed blocks of rows, then the blocks are summed in order: deterministic for a given shape.

use moeba_tensor::{CpuStorage, DType, Error, Result, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::par;

/// Rows of one block of the weight-gradient reduction.
const GW_BLOCK_ROWS: usize = 64;

fn check(op: &'static str, x: &Tensor, w: &Tensor) -> Result<usize> {
    let d = *x.dims().last().ok_or_else(|| Error::bad_shape(op, x.shape(), "rank 0"))?;
    if w.dims() != [d] {
        return Err(Error::ShapeMismatch { op, lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    if x.dtype() != w.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: x.dtype(), rhs: w.dtype() });
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Err(Error::UnsupportedDType { op, dtype: x.dtype(), hint: "; expected f32 or f64".into() });
    }
    if !(x.device().is_cpu() && w.device().is_cpu()) {
        return Err(Error::Unsupported { op, msg: "CPU tensors only".into() });
    }
    Ok(d)
}

/// `Σ a ⊙ b ⊙ c` with eight independent partial sums (so that the compiler vectorises it; a
/// single running sum is a chain of dependent adds).
#[inline(always)]
fn dot3<F: Float>(a: &[F], b: &[F], c: &[F]) -> F {
    let mut acc = [F::zero(); 8];
    let (ac, bc, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ar, br, cr) = (ac.remainder(), bc.remainder(), cc.remainder());
    for ((x, y), z) in ac.zip(bc).zip(cc) {
        for i in 0..8 {
            acc[i] = acc[i] + x[i] * y[i] * z[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for ((&x, &y), &z) in ar.iter().zip(br).zip(cr) {
        s = s + x * y * z;
    }
    s
}

/// `Σ a ⊙ b`, eight partial sums.
#[inline(always)]
fn dot2<F: Float>(a: &[F], b: &[F]) -> F {
    let mut acc = [F::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] = acc[i] + x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in ar.iter().zip(br) {
        s = s + x * y;
    }
    s
}

#[inline(always)]
fn inv_rms<F: Float>(row: &[F], eps: F) -> F {
    let ss = dot2(row, row);
    let n = F::from(row.len()).unwrap_or_else(F::one);
    F::one() / (ss / n + eps).sqrt()
}

fn forward_typed<F: Float + Send + Sync>(x: &[F], w: &[F], d: usize, eps: F) -> Vec<F> {
    let mut out = vec![F::zero(); x.len()];
    if d == 0 {
        return out;
    }
    par::for_each_rows_mut(&mut out, d, 3 * d, |first, chunk| {
        for (r, o) in chunk.chunks_mut(d).enumerate() {
            let xr = &x[(first + r) * d..(first + r + 1) * d];
            let s = inv_rms(xr, eps);
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * s * wv;
            }
        }
    });
    out
}

fn backward_typed<F: Float + Send + Sync>(x: &[F], w: &[F], gy: &[F], d: usize, eps: F) -> (Vec<F>, Vec<F>) {
    let mut gx = vec![F::zero(); x.len()];
    if d == 0 {
        return (gx, Vec::new());
    }
    let rows = x.len() / d;
    let inv_d = F::one() / F::from(d).unwrap_or_else(F::one);
    par::for_each_rows_mut(&mut gx, d, 5 * d, |first, chunk| {
        for (r, o) in chunk.chunks_mut(d).enumerate() {
            let i = first + r;
            let (xr, gr) = (&x[i * d..(i + 1) * d], &gy[i * d..(i + 1) * d]);
            let s = inv_rms(xr, eps);
            // dot = Σ (gy ⊙ w) ⊙ x
            let dot = dot3(xr, gr, w);
            let c = s * s * s * dot * inv_d;
            for (((o, &xv), &gv), &wv) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = s * gv * wv - xv * c;
            }
        }
    });
    // gw = Σ_rows gy ⊙ x · s, by fixed blocks of rows summed in order.
    let blocks = rows.div_ceil(GW_BLOCK_ROWS);
    let block_sum = |b: usize| {
        let mut acc = vec![F::zero(); d];
        for i in b * GW_BLOCK_ROWS..((b + 1) * GW_BLOCK_ROWS).min(rows) {
            let (xr, gr) = (&x[i * d..(i + 1) * d], &gy[i * d..(i + 1) * d]);
            let s = inv_rms(xr, eps);
            for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
                *a = *a + gv * xv * s;
            }
        }
        acc
    };
    let partial: Vec<Vec<F>> = if par::use_threads(x.len() * 3) {
        (0..blocks).into_par_iter().map(block_sum).collect()
    } else {
        (0..blocks).map(block_sum).collect()
    };
    let mut gw = vec![F::zero(); d];
    for p in partial {
        for (a, v) in gw.iter_mut().zip(p) {
            *a = *a + v;
        }
    }
    (gx, gw)
}

/// Fused RMSNorm over the last dim: `x (..., d)`, `w (d)`, both f32 or both f64 on the CPU (any
/// layout) → `(..., d)` contiguous.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = check("rms_norm", x, w)?;
    let storage = match x.dtype() {
        DType::F32 => {
            let (xv, wv) = (x.cpu_data::<f32>()?, w.cpu_data::<f32>()?);
            CpuStorage::F32(forward_typed(&xv, &wv, d, eps as f32))
        }
        _ => {
            let (xv, wv) = (x.cpu_data::<f64>()?, w.cpu_data::<f64>()?);
            CpuStorage::F64(forward_typed(&xv, &wv, d, eps))
        }
    };
    Tensor::from_cpu_storage(storage, x.shape().clone())
}

/// The backward of [`rms_norm`]: from `grad (..., d)`, the gradients `(gx (..., d), gw (d))`.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f64, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = check("rms_norm_backward", x, w)?;
    if grad.shape() != x.shape() || grad.dtype() != x.dtype() {
        return Err(Error::ShapeMismatch {
            op: "rms_norm_backward",
            lhs: x.shape().clone(),
            rhs: grad.shape().clone(),
        });
    }
    let (gx, gw) = match x.dtype() {
        DType::F32 => {
            let (xv, wv, gv) = (x.cpu_data::<f32>()?, w.cpu_data::<f32>()?, grad.cpu_data::<f32>()?);
            let (gx, gw) = backward_typed(&xv, &wv, &gv, d, eps as f32);
            (CpuStorage::F32(gx), CpuStorage::F32(gw))
        }
        _ => {
            let (xv, wv, gv) = (x.cpu_data::<f64>()?, w.cpu_data::<f64>()?, grad.cpu_data::<f64>()?);
            let (gx, gw) = backward_typed(&xv, &wv, &gv, d, eps);
            (CpuStorage::F64(gx), CpuStorage::F64(gw))
        }
    };
    Ok((Tensor::from_cpu_storage(gx, x.shape().clone())?, Tensor::from_cpu_storage(gw, d)?))
}
