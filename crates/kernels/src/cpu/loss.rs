//! Losses on the CPU: cross-entropy over `(n, vocab)` logits and its gradient.
//!
//! Each counted row costs one log-sum-exp (max-subtracted, so large logits do not overflow):
//! `loss_r = ln Σ_j e^(x_rj - max_r) + max_r - x_r,t_r`. Rows run in parallel for large inputs;
//! the per-row losses are summed in f64 in row order, so the result is deterministic.
//! bf16/f16 logits are computed in f32 and the result rounded once.

use moeba_tensor::{DType, Device, Error, Result, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::index::PAR_ELEMS;
use super::simd;

/// Checks the shapes and turns `targets` into one entry per row: `None` for an ignored row,
/// otherwise the target class, checked to lie in `0..vocab` (an error names the row).
fn row_targets(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
) -> Result<Vec<Option<usize>>> {
    if logits.rank() != 2 || targets.rank() != 1 || targets.dims()[0] != logits.dims()[0] {
        return Err(Error::ShapeMismatch { op, lhs: logits.shape().clone(), rhs: targets.shape().clone() });
    }
    let vocab = logits.dims()[1];
    let raw: Vec<i64> = match targets.dtype() {
        DType::U32 => targets.cpu_data::<u32>()?.iter().map(|&t| t as i64).collect(),
        DType::I64 => targets.cpu_data::<i64>()?.into_owned(),
        dt => {
            return Err(Error::UnsupportedDType {
                op,
                dtype: dt,
                hint: "; targets must be u32 or i64".into(),
            })
        }
    };
    raw.iter()
        .enumerate()
        .map(|(row, &t)| {
            if Some(t) == ignore_index {
                Ok(None)
            } else if t < 0 || t as u64 >= vocab as u64 {
                let ignore = ignore_index.map_or(String::new(), |i| format!(" and is not ignore_index {i}"));
                Err(Error::invalid(
                    op,
                    "targets",
                    format!("target {t} at row {row} is outside 0..{vocab} (the vocab size){ignore}"),
                ))
            } else {
                Ok(Some(t as usize))
            }
        })
        .collect()
}

/// `ln Σ_j e^(x_j)` of one row, computed as `max + ln Σ_j e^(x_j - max)` (scalar).
fn log_sum_exp<F: Float>(row: &[F]) -> F {
    let max = row.iter().fold(F::neg_infinity(), |m, &x| if x > m || x.is_nan() { x } else { m });
    if max.is_infinite() {
        // All -inf (or a +inf): the sum is dominated by max; avoid inf - inf.
        return max;
    }
    let sum = row.iter().fold(F::zero(), |s, &x| s + (x - max).exp());
    max + sum.ln()
}

/// `dst = scale · softmax(row)` (scalar).
fn softmax_scaled_scalar<F: Float>(row: &[F], dst: &mut [F], scale: F) {
    let lse = log_sum_exp(row);
    for (d, &x) in dst.iter_mut().zip(row) {
        *d = scale * (x - lse).exp();
    }
}

/// The per-row kernels: scalar for f64, SIMD ([`super::simd`], chosen at run time) for f32.
trait RowMath: Float + WithDType {
    /// `ln Σ_j e^(x_j)` of `row`; `scratch` is a buffer the implementation may use.
    fn lse(row: &[Self], scratch: &mut Vec<Self>) -> f64;
    /// `dst = scale · softmax(row)`.
    fn softmax_scaled(row: &[Self], dst: &mut [Self], scale: Self);
}

impl RowMath for f64 {
    fn lse(row: &[f64], _: &mut Vec<f64>) -> f64 {
        log_sum_exp(row)
    }
    fn softmax_scaled(row: &[f64], dst: &mut [f64], scale: f64) {
        softmax_scaled_scalar(row, dst, scale)
    }
}

impl RowMath for f32 {
    fn lse(row: &[f32], scratch: &mut Vec<f32>) -> f64 {
        let max = simd::max_f32(row);
        if !max.is_finite() {
            return log_sum_exp(row) as f64;
        }
        scratch.resize(row.len(), 0.0);
        // The exponentials go to `scratch`; only their sum (accumulated in f64) is kept.
        let sum = simd::exp_sub_sum_f32(row, max, simd::as_uninit_mut(&mut scratch[..row.len()]));
        max as f64 + sum.ln()
    }
    fn softmax_scaled(row: &[f32], dst: &mut [f32], scale: f32) {
        let max = simd::max_f32(row);
        if !max.is_finite() {
            return softmax_scaled_scalar(row, dst, scale);
        }
        let sum = simd::exp_sub_sum_f32(row, max, simd::as_uninit_mut(dst));
        let f = (scale as f64 / sum) as f32;
        for d in dst.iter_mut() {
            *d *= f;
        }
    }
}

/// See [`crate::ops::cross_entropy`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<i64>) -> Result<Tensor> {
    let tgt = row_targets("cross_entropy", logits, targets, ignore_index)?;
    match logits.dtype() {
        DType::F32 => ce_t::<f32>(logits, &tgt),
        DType::F64 => ce_t::<f64>(logits, &tgt),
        dt @ (DType::BF16 | DType::F16) => ce_t::<f32>(&logits.to_dtype(DType::F32)?, &tgt)?.to_dtype(dt),
        dt => Err(Error::dtype("cross_entropy", dt)),
    }
}

fn ce_t<F: RowMath>(logits: &Tensor, tgt: &[Option<usize>]) -> Result<Tensor> {
    let vocab = logits.dims()[1];
    let count = tgt.iter().filter(|t| t.is_some()).count();
    let mean = if count == 0 || vocab == 0 {
        0.0
    } else {
        let data = logits.cpu_data::<F>()?;
        let row_loss = |scratch: &mut Vec<F>, (row, t): (&[F], &Option<usize>)| match *t {
            Some(t) => F::lse(row, scratch) - WithDType::to_f64(row[t]),
            None => 0.0,
        };
        let losses: Vec<f64> = if data.len() >= PAR_ELEMS {
            data.par_chunks(vocab)
                .zip(tgt.par_iter())
                .with_min_len((PAR_ELEMS / 4 / vocab).max(1))
                .map_init(Vec::new, row_loss)
                .collect()
        } else {
            let mut scratch = Vec::new();
            data.chunks(vocab).zip(tgt).map(|r| row_loss(&mut scratch, r)).collect()
        };
        let total: f64 = losses.iter().sum();
        total / count as f64
    };
    Tensor::from_vec(vec![<F as WithDType>::from_f64(mean)], (), &Device::Cpu)
}

/// See [`crate::ops::cross_entropy_backward`].
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
    grad: &Tensor,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let tgt = row_targets(op, logits, targets, ignore_index)?;
    if grad.elem_count() != 1 {
        return Err(Error::bad_shape(
            op,
            grad.shape(),
            "the incoming gradient must hold one element (the loss is a scalar)",
        ));
    }
    let g = grad.to_vec_f64()?[0];
    match logits.dtype() {
        DType::F32 => ce_backward_t::<f32>(logits, &tgt, g),
        DType::F64 => ce_backward_t::<f64>(logits, &tgt, g),
        dt @ (DType::BF16 | DType::F16) => {
            ce_backward_t::<f32>(&logits.to_dtype(DType::F32)?, &tgt, g)?.to_dtype(dt)
        }
        dt => Err(Error::dtype(op, dt)),
    }
}

fn ce_backward_t<F: RowMath>(logits: &Tensor, tgt: &[Option<usize>], g: f64) -> Result<Tensor> {
    let vocab = logits.dims()[1];
    let count = tgt.iter().filter(|t| t.is_some()).count();
    let mut out = vec![F::zero(); logits.elem_count()];
    if count > 0 && vocab > 0 {
        let scale = <F as WithDType>::from_f64(g / count as f64);
        let data = logits.cpu_data::<F>()?;
        let row_grad = |((dst, row), t): ((&mut [F], &[F]), &Option<usize>)| {
            if let Some(t) = *t {
                F::softmax_scaled(row, dst, scale);
                dst[t] = dst[t] - scale;
            }
        };
        if out.len() >= PAR_ELEMS {
            out.par_chunks_mut(vocab)
                .zip(data.par_chunks(vocab))
                .zip(tgt.par_iter())
                .with_min_len((PAR_ELEMS / 4 / vocab).max(1))
                .for_each(row_grad);
        } else {
            out.chunks_mut(vocab).zip(data.chunks(vocab)).zip(tgt).for_each(row_grad);
        }
    }
    Tensor::from_vec(out, logits.shape().clone(), &Device::Cpu)
}
