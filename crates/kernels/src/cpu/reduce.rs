//! Reductions (sum, mean, max, min over any set of dims) and argmax on the CPU.
//!
//! The reduced dims are moved innermost (a view), then one of three paths runs:
//! - **rows**: when the reduced elements of each output are one contiguous run in storage (reduce
//!   over the last dims of a contiguous tensor, or over a dim that a transpose made innermost),
//!   each output is a SIMD reduction of a slice. Outputs are spread over threads; a single huge
//!   row (e.g. a sum of everything) is itself split over threads.
//! - **columns**: for a contiguous tensor reduced over consecutive leading or middle dims
//!   (`[outer, R, inner]` reduced over `R`), rows of `inner` values are combined into a block of
//!   accumulators, so memory is read in order.
//! - otherwise the permuted view is copied contiguous and the row path runs.
//!
//! Accuracy: f32 sums add blocks of 128 consecutive values in f32 (SIMD lanes, at most 32
//! sequential additions per lane) and the block totals in f64 (see [`super::simd`]); the column
//! path accumulates in f64 directly. f64 sums accumulate in f64 (four interleaved partial sums).
//! Means divide the f64 sum by the count. Max and min propagate NaN. bf16/f16 inputs are widened
//! to f32, reduced there, and the result rounded once.

use moeba_tensor::{CpuStorage, DType, Error, Layout, Result, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::binary::{cpu_storage, fmax, fmin, Walk, BUF};
use super::{par, simd};
use crate::ops::*;

/// Element types reduced natively (f32 with SIMD, f64 in scalar code).
pub(crate) trait RedElem: WithDType + Float {
    /// Sum of a slice, accumulated as documented in the module docs.
    fn row_sum(x: &[Self]) -> f64;
    /// NaN-propagating maximum of a non-empty slice.
    fn row_max(x: &[Self]) -> Self;
    /// NaN-propagating minimum of a non-empty slice.
    fn row_min(x: &[Self]) -> Self;
    /// `acc[i] = max(acc[i], x[i])`.
    fn acc_max(acc: &mut [Self], x: &[Self]);
    /// `acc[i] = min(acc[i], x[i])`.
    fn acc_min(acc: &mut [Self], x: &[Self]);
}

impl RedElem for f32 {
    fn row_sum(x: &[f32]) -> f64 {
        simd::sum_f32(x)
    }
    fn row_max(x: &[f32]) -> f32 {
        simd::max_f32(x)
    }
    fn row_min(x: &[f32]) -> f32 {
        simd::min_f32(x)
    }
    fn acc_max(acc: &mut [f32], x: &[f32]) {
        simd::binary_assign_f32(BinaryOp::Maximum, acc, simd::Arg::Slice(x))
    }
    fn acc_min(acc: &mut [f32], x: &[f32]) {
        simd::binary_assign_f32(BinaryOp::Minimum, acc, simd::Arg::Slice(x))
    }
}

impl RedElem for f64 {
    fn row_sum(x: &[f64]) -> f64 {
        let mut s = [0f64; 4];
        let mut it = x.chunks_exact(4);
        for c in &mut it {
            for k in 0..4 {
                s[k] += c[k];
            }
        }
        let tail: f64 = it.remainder().iter().sum();
        (s[0] + s[1]) + (s[2] + s[3]) + tail
    }
    fn row_max(x: &[f64]) -> f64 {
        x.iter().fold(f64::NEG_INFINITY, |m, &v| fmax(m, v))
    }
    fn row_min(x: &[f64]) -> f64 {
        x.iter().fold(f64::INFINITY, |m, &v| fmin(m, v))
    }
    fn acc_max(acc: &mut [f64], x: &[f64]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = fmax(*a, v);
        }
    }
    fn acc_min(acc: &mut [f64], x: &[f64]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = fmin(*a, v);
        }
    }
}

/// One output of a row reduction (`count` = number of reduced elements, for the mean).
#[inline]
fn reduce_row<T: RedElem>(row: &[T], op: ReduceOp) -> T {
    match op {
        ReduceOp::Sum => T::from_f64(T::row_sum(row)),
        ReduceOp::Mean => T::from_f64(T::row_sum(row) / row.len() as f64),
        ReduceOp::Max => T::row_max(row),
        ReduceOp::Min => T::row_min(row),
    }
}

/// [`reduce_row`] with the row itself split over the threads (for few, long rows).
fn reduce_row_par<T: RedElem>(row: &[T], op: ReduceOp) -> T {
    let piece = 64 * 1024;
    match op {
        ReduceOp::Sum | ReduceOp::Mean => {
            // Pieces are summed in f64 in index order: deterministic whatever the thread count.
            let parts: Vec<f64> = row.par_chunks(piece).map(T::row_sum).collect();
            let s: f64 = parts.iter().sum();
            let s = if op == ReduceOp::Mean { s / row.len() as f64 } else { s };
            T::from_f64(s)
        }
        ReduceOp::Max => row
            .par_chunks(piece)
            .map(T::row_max)
            .collect::<Vec<_>>()
            .into_iter()
            .fold(T::neg_infinity(), fmax),
        ReduceOp::Min => {
            row.par_chunks(piece).map(T::row_min).collect::<Vec<_>>().into_iter().fold(T::infinity(), fmin)
        }
    }
}

/// The row path: `kept` walks the outputs (storage offset of each row), rows are `rcount`
/// contiguous elements.
fn rows_path<T: RedElem>(v: &[T], kept: &Walk<1>, ocount: usize, rcount: usize, op: ReduceOp) -> Vec<T> {
    let mut out = vec![T::zero(); ocount];
    let [ks] = kept.inner_strides();
    let few_long = ocount < 2 * rayon::current_num_threads() && par::use_threads(rcount);
    par::for_each_rows_mut(&mut out, 1, rcount, |first, chunk| {
        kept.runs(first, first + chunk.len(), |pos, len, [off]| {
            for i in 0..len {
                let b = off + i * ks;
                let row = &v[b..b + rcount];
                chunk[pos - first + i] = if few_long { reduce_row_par(row, op) } else { reduce_row(row, op) };
            }
        })
    });
    out
}

/// The column path over contiguous `[outer, r, inner]` data starting at `v[0]`.
fn cols_path<T: RedElem>(v: &[T], outer: usize, r: usize, inner: usize, op: ReduceOp) -> Vec<T> {
    let mut out = vec![T::zero(); outer * inner];
    par::for_each_rows_mut(&mut out, 1, r, |first, chunk| {
        let end = first + chunk.len();
        let mut p = first;
        while p < end {
            // A segment of columns c0..c0+m inside one outer index o.
            let (o, c0) = (p / inner, p % inner);
            let m = (inner - c0).min(end - p).min(BUF);
            let dst = &mut chunk[p - first..p - first + m];
            let src = |k: usize| {
                let s = (o * r + k) * inner + c0;
                &v[s..s + m]
            };
            match op {
                ReduceOp::Sum | ReduceOp::Mean => {
                    let mut acc = [0f64; BUF];
                    for k in 0..r {
                        for (a, &x) in acc[..m].iter_mut().zip(src(k)) {
                            *a += x.to_f64();
                        }
                    }
                    let scale = if op == ReduceOp::Mean { 1.0 / r as f64 } else { 1.0 };
                    for (d, &a) in dst.iter_mut().zip(&acc[..m]) {
                        *d = T::from_f64(if op == ReduceOp::Mean { a * scale } else { a });
                    }
                }
                ReduceOp::Max | ReduceOp::Min => {
                    dst.copy_from_slice(src(0));
                    for k in 1..r {
                        if op == ReduceOp::Max {
                            T::acc_max(dst, src(k));
                        } else {
                            T::acc_min(dst, src(k));
                        }
                    }
                }
            }
            p += m;
        }
    });
    out
}

/// Reduces `v` (seen through `layout`) over the dims flagged in `red`; the output is in the
/// row-major order of the kept dims.
fn reduce_native<T: RedElem>(v: &[T], layout: &Layout, red: &[bool], op: ReduceOp) -> Result<Vec<T>> {
    let dims = layout.dims();
    let strides = layout.strides();
    let rank = dims.len();
    let kept: Vec<usize> = (0..rank).filter(|&d| !red[d]).collect();
    let rdims: Vec<usize> = (0..rank).filter(|&d| red[d]).collect();
    let ocount: usize = kept.iter().map(|&d| dims[d]).product();
    let rcount: usize = rdims.iter().map(|&d| dims[d]).product();
    if ocount == 0 {
        return Ok(Vec::new());
    }
    if rcount == 0 {
        // Sum/mean of nothing (max/min were rejected by the caller).
        let fill = if op == ReduceOp::Sum { T::zero() } else { T::nan() };
        return Ok(vec![fill; ocount]);
    }
    let sub = |ds: &[usize]| -> (Vec<usize>, Vec<usize>) {
        (ds.iter().map(|&d| dims[d]).collect(), ds.iter().map(|&d| strides[d]).collect())
    };
    let (kd, ks) = sub(&kept);
    let (rd, rs) = sub(&rdims);
    // Rows: the reduced elements of each output are one stride-1 run.
    let rwalk = Walk::new(&rd, [(&rs, 0)]);
    if rcount == 1 || (rwalk.rank() == 1 && rwalk.inner_strides() == [1]) {
        let kwalk = Walk::new(&kd, [(&ks, layout.offset())]);
        return Ok(rows_path(v, &kwalk, ocount, rcount, op));
    }
    // Columns: contiguous tensor, reduced dims consecutive.
    let consecutive = rdims.windows(2).all(|w| w[1] == w[0] + 1);
    if let (Some(range), true) = (layout.contiguous_range(), consecutive) {
        let (i, j) = (rdims[0], rdims[rdims.len() - 1] + 1);
        let outer: usize = dims[..i].iter().product();
        let inner: usize = dims[j..].iter().product();
        return Ok(cols_path(&v[range], outer, rcount, inner, op));
    }
    // Anything else: copy with the reduced dims innermost, then rows.
    let perm: Vec<usize> = kept.iter().chain(&rdims).copied().collect();
    let lp = layout.permute(&perm)?;
    let packed = moeba_tensor::gather(v, &lp);
    let kwalk = Walk::new(&[ocount], [(&[rcount][..], 0)]);
    Ok(rows_path(&packed, &kwalk, ocount, rcount, op))
}

fn float_only(op: &'static str, dtype: DType) -> Error {
    Error::UnsupportedDType { op, dtype, hint: "; expected f32, f64, bf16 or f16".into() }
}

/// See [`crate::ops::reduce`].
pub fn reduce(x: &Tensor, dims: &[usize], keepdim: bool, op: ReduceOp) -> Result<Tensor> {
    let name = op.name();
    let rank = x.rank();
    let mut red = vec![false; rank];
    for &d in dims {
        if d >= rank {
            return Err(Error::DimOutOfRange { op: name, dim: d, rank });
        }
        red[d] = true;
    }
    if !x.dtype().is_float() {
        return Err(float_only(name, x.dtype()));
    }
    if dims.is_empty() {
        return x.contiguous();
    }
    let xd = x.dims();
    let out_dims: Vec<usize> = if keepdim {
        xd.iter().zip(&red).map(|(&n, &r)| if r { 1 } else { n }).collect()
    } else {
        xd.iter().zip(&red).filter(|(_, &r)| !r).map(|(&n, _)| n).collect()
    };
    let out_shape = Shape::new(out_dims);
    let rcount: usize = xd.iter().zip(&red).filter(|(_, &r)| r).map(|(&n, _)| n).product();
    if rcount == 0 && out_shape.elem_count() > 0 && matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(Error::bad_shape(
            name,
            x.shape(),
            format!("cannot take the {name} over dims {dims:?}: they hold no element"),
        ));
    }
    let storage = match cpu_storage(name, x)? {
        CpuStorage::F32(v) => CpuStorage::F32(reduce_native(v, x.layout(), &red, op)?),
        CpuStorage::F64(v) => CpuStorage::F64(reduce_native(v, x.layout(), &red, op)?),
        CpuStorage::BF16(_) | CpuStorage::F16(_) => {
            let x32 = x.to_dtype(DType::F32)?;
            let v = x32.cpu_data::<f32>()?;
            let r = reduce_native(&v, &Layout::contiguous(x.shape().clone()), &red, op)?;
            CpuStorage::F32(r).to_dtype(x.dtype())
        }
        s => return Err(float_only(name, s.dtype())),
    };
    Tensor::from_cpu_storage(storage, out_shape)
}

/// Index of the first maximum of `n` values `row(i)`; the first NaN wins.
#[inline]
fn argmax_row<T: Float>(n: usize, row: impl Fn(usize) -> T) -> u32 {
    let mut best = row(0);
    let mut idx = 0;
    if best.is_nan() {
        return 0;
    }
    for i in 1..n {
        let v = row(i);
        if v.is_nan() {
            return i as u32;
        }
        if v > best {
            best = v;
            idx = i;
        }
    }
    idx as u32
}

fn argmax_native<T: Float + WithDType>(v: &[T], layout: &Layout, dim: usize) -> Vec<u32> {
    let dims = layout.dims();
    let strides = layout.strides();
    let n = dims[dim];
    let st = strides[dim];
    let kept: Vec<usize> = (0..dims.len()).filter(|&d| d != dim).collect();
    let kd: Vec<usize> = kept.iter().map(|&d| dims[d]).collect();
    let ks: Vec<usize> = kept.iter().map(|&d| strides[d]).collect();
    let ocount: usize = kd.iter().product();
    let kwalk = Walk::new(&kd, [(&ks, layout.offset())]);
    let [kst] = kwalk.inner_strides();
    let mut out = vec![0u32; ocount];
    par::for_each_rows_mut(&mut out, 1, n, |first, chunk| {
        kwalk.runs(first, first + chunk.len(), |pos, len, [off]| {
            for i in 0..len {
                let b = off + i * kst;
                chunk[pos - first + i] = if st == 1 {
                    let row = &v[b..b + n];
                    argmax_row(n, |k| row[k])
                } else {
                    argmax_row(n, |k| v[b + k * st])
                };
            }
        })
    });
    out
}

/// See [`crate::ops::argmax`].
pub fn argmax(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    let rank = x.rank();
    if dim >= rank {
        return Err(Error::DimOutOfRange { op: "argmax", dim, rank });
    }
    let mut out_dims = x.dims().to_vec();
    if keepdim {
        out_dims[dim] = 1;
    } else {
        out_dims.remove(dim);
    }
    let out_shape = Shape::new(out_dims);
    if x.dims()[dim] == 0 && out_shape.elem_count() > 0 {
        return Err(Error::bad_shape(
            "argmax",
            x.shape(),
            format!("cannot take the argmax over dim {dim} of size 0"),
        ));
    }
    let ids = match cpu_storage("argmax", x)? {
        CpuStorage::F32(v) => argmax_native(v, x.layout(), dim),
        CpuStorage::F64(v) => argmax_native(v, x.layout(), dim),
        CpuStorage::BF16(_) | CpuStorage::F16(_) => {
            // Widening is exact, so the order (and the ties) are the half-precision ones.
            let x32 = x.to_dtype(DType::F32)?;
            let v = x32.cpu_data::<f32>()?;
            argmax_native(&v, &Layout::contiguous(x.shape().clone()), dim)
        }
        s => return Err(float_only("argmax", s.dtype())),
    };
    Tensor::from_cpu_storage(CpuStorage::U32(ids), out_shape)
}
