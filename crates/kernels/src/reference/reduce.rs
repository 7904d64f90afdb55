//! Reference reduce ops (see the module docs of `reference`).
//!
//! Every function reads its input through `to_vec_f64` (row-major logical order), visits each
//! input element once in that order, accumulates plainly in f64 into the output element it
//! belongs to, and returns a contiguous **F64** tensor (argmax: **U32**). Max/min propagate NaN;
//! argmax returns the first maximum, and the first NaN if there is one.

use moeba_tensor::{CpuStorage, Device, Error, Result, Shape, Tensor};

use super::elementwise::{max_nan, min_nan};
use super::{ravel, unravel};
use crate::ops::ReduceOp;

fn check(op: &'static str, x: &Tensor, dims: &[usize]) -> Result<()> {
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: x.dtype(),
            hint: "; expected f32, f64, bf16 or f16".into(),
        });
    }
    for &d in dims {
        if d >= x.rank() {
            return Err(Error::DimOutOfRange { op, dim: d, rank: x.rank() });
        }
    }
    Ok(())
}

/// Reference [`crate::ops::reduce`] (F64 result). Empty `dims` returns the values unchanged;
/// a max/min over no element is an error; a sum over none is 0 and a mean NaN.
pub fn reduce(x: &Tensor, dims: &[usize], keepdim: bool, op: ReduceOp) -> Result<Tensor> {
    check(op.name(), x, dims)?;
    let xd = x.dims().to_vec();
    let red: Vec<bool> = (0..xd.len()).map(|d| dims.contains(&d)).collect();
    let kd: Vec<usize> = xd.iter().zip(&red).map(|(&n, &r)| if r { 1 } else { n }).collect();
    let count: usize = xd.iter().zip(&red).filter(|(_, &r)| r).map(|(&n, _)| n).product();
    let ocount: usize = kd.iter().product();
    if count == 0 && ocount > 0 && matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(Error::bad_shape(op.name(), x.shape(), "cannot reduce over dims that hold no element"));
    }
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Min => f64::INFINITY,
    };
    let mut acc = vec![init; ocount];
    for (flat, v) in x.to_vec_f64()?.into_iter().enumerate() {
        let mut idx = unravel(flat, &xd);
        for (i, &r) in idx.iter_mut().zip(&red) {
            if r {
                *i = 0;
            }
        }
        let o = &mut acc[ravel(&idx, &kd)];
        *o = match op {
            ReduceOp::Sum | ReduceOp::Mean => *o + v,
            ReduceOp::Max => max_nan(*o, v),
            ReduceOp::Min => min_nan(*o, v),
        };
    }
    if op == ReduceOp::Mean {
        acc.iter_mut().for_each(|a| *a /= count as f64);
    }
    let out_dims: Vec<usize> =
        if keepdim { kd } else { xd.iter().zip(&red).filter(|(_, &r)| !r).map(|(&n, _)| n).collect() };
    Tensor::from_vec(acc, Shape::new(out_dims), &Device::Cpu)
}

/// Reference [`crate::ops::argmax`] (U32 result).
pub fn argmax(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    check("argmax", x, &[dim])?;
    let xd = x.dims().to_vec();
    let n = xd[dim];
    let mut kd = xd.clone();
    kd[dim] = 1;
    let ocount: usize = kd.iter().product();
    if n == 0 && ocount > 0 {
        return Err(Error::bad_shape("argmax", x.shape(), "cannot take the argmax over an empty dim"));
    }
    let v = x.to_vec_f64()?;
    let mut out = Vec::with_capacity(ocount);
    for o in 0..ocount {
        let mut idx = unravel(o, &kd);
        let mut best: Option<(usize, f64)> = None;
        for i in 0..n {
            idx[dim] = i;
            let val = v[ravel(&idx, &xd)];
            best = match best {
                Some((_, b)) if b.is_nan() => best,
                _ if val.is_nan() => Some((i, val)),
                Some((_, b)) if val <= b => best,
                _ => Some((i, val)),
            };
        }
        out.push(best.map_or(0, |(i, _)| i as u32));
    }
    if !keepdim {
        kd.remove(dim);
    }
    Tensor::from_cpu_storage(CpuStorage::U32(out), Shape::new(kd))
}

fn softmax_impl(x: &Tensor, dim: usize, log: bool) -> Result<Tensor> {
    check(if log { "log_softmax" } else { "softmax" }, x, &[dim])?;
    let xd = x.dims().to_vec();
    let v = x.to_vec_f64()?;
    let n = xd[dim];
    let mut kd = xd.clone();
    kd[dim] = 1;
    let mut out = vec![0.0; v.len()];
    for o in 0..kd.iter().product::<usize>() {
        let mut idx = unravel(o, &kd);
        let flat: Vec<usize> = (0..n)
            .map(|i| {
                idx[dim] = i;
                ravel(&idx, &xd)
            })
            .collect();
        let m = flat.iter().fold(f64::NEG_INFINITY, |m, &f| max_nan(m, v[f]));
        let s: f64 = flat.iter().map(|&f| (v[f] - m).exp()).sum();
        for &f in &flat {
            out[f] = if log { v[f] - m - s.ln() } else { (v[f] - m).exp() / s };
        }
    }
    Tensor::from_vec(out, Shape::new(xd), &Device::Cpu)
}

/// Reference [`crate::ops::softmax`]: `e^(x - max) / Σ e^(x - max)` along `dim` (F64 result).
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    softmax_impl(x, dim, false)
}

/// Reference [`crate::ops::log_softmax`]: `x - max - ln Σ e^(x - max)` along `dim` (F64 result).
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    softmax_impl(x, dim, true)
}
