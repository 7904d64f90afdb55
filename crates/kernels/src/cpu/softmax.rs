//! Softmax and log-softmax on the CPU, along any dim, numerically stable (max-subtracted).
//!
//! - Last dim: rows in parallel; per row one SIMD pass for the max, one fused pass writing
//!   `e^(x - max)` and summing it (f32 blocks, f64 total), one pass scaling by `1/sum`
//!   (log-softmax: `x - (max + ln sum)`).
//! - Other dims: the tensor is seen as `[outer, n, inner]` and blocks of up to 256 columns are
//!   processed together: running max over the `n` rows, then `e^(x - max)` and its sum, then the
//!   scaling, all as contiguous vector operations. Outer slices run in parallel.
//!
//! Non-contiguous inputs are made contiguous first. bf16/f16 compute in f32 and round once.
//! A row containing NaN gives NaN; a row of `-inf` gives NaN (as torch).

use std::mem::MaybeUninit;

use moeba_tensor::{CpuStorage, DType, Error, Result, Tensor};

use super::binary::{cpu_storage, BUF};
use super::par;
use super::reduce::RedElem;
use super::simd::{self, Arg, MapOp};
use crate::ops::*;

/// Rough cost of one softmax element relative to a copy, for the parallelism threshold.
const COST: usize = 8;

/// The vector operations softmax needs, natively in f32 (SIMD) and f64 (scalar).
trait SmElem: RedElem {
    /// `out = e^(x - shift)`, returning the sum of `out` (`out` is written, never read).
    fn exp_sub_sum(x: &[Self], shift: Self, out: &mut [MaybeUninit<Self>]) -> f64;
    /// `x *= s`.
    fn scale(x: &mut [Self], s: Self);
    /// `out = x - c`.
    fn sub_scalar(x: &[Self], c: Self, out: &mut [Self]);
    /// `out = e^(x - m)` elementwise (`out` is written, never read).
    fn exp_sub_vec(x: &[Self], m: &[Self], out: &mut [MaybeUninit<Self>]);
    /// `out = x - c` elementwise.
    fn sub_vec(x: &[Self], c: &[Self], out: &mut [Self]);
    /// `acc += x` elementwise.
    fn add_assign(acc: &mut [Self], x: &[Self]);
    /// `x *= s` elementwise.
    fn mul_assign(x: &mut [Self], s: &[Self]);
}

impl SmElem for f32 {
    fn exp_sub_sum(x: &[f32], shift: f32, out: &mut [MaybeUninit<f32>]) -> f64 {
        simd::exp_sub_sum_f32(x, shift, out)
    }
    fn scale(x: &mut [f32], s: f32) {
        simd::map_inplace_f32(MapOp::Affine { mul: s, add: 0.0 }, x)
    }
    fn sub_scalar(x: &[f32], c: f32, out: &mut [f32]) {
        simd::binary_into_f32(BinaryOp::Sub, Arg::Slice(x), Arg::Scalar(c), out)
    }
    fn exp_sub_vec(x: &[f32], m: &[f32], out: &mut [MaybeUninit<f32>]) {
        simd::binary_f32(BinaryOp::Sub, Arg::Slice(x), Arg::Slice(m), out);
        // SAFETY: `binary_f32` wrote every element.
        simd::map_inplace_f32(MapOp::Exp, unsafe { simd::assume_init_mut(out) });
    }
    fn sub_vec(x: &[f32], c: &[f32], out: &mut [f32]) {
        simd::binary_into_f32(BinaryOp::Sub, Arg::Slice(x), Arg::Slice(c), out)
    }
    fn add_assign(acc: &mut [f32], x: &[f32]) {
        simd::binary_assign_f32(BinaryOp::Add, acc, Arg::Slice(x))
    }
    fn mul_assign(x: &mut [f32], s: &[f32]) {
        simd::binary_assign_f32(BinaryOp::Mul, x, Arg::Slice(s))
    }
}

impl SmElem for f64 {
    fn exp_sub_sum(x: &[f64], shift: f64, out: &mut [MaybeUninit<f64>]) -> f64 {
        let mut s = 0.0;
        for (o, &v) in out.iter_mut().zip(x) {
            let e = (v - shift).exp();
            o.write(e);
            s += e;
        }
        s
    }
    fn scale(x: &mut [f64], s: f64) {
        x.iter_mut().for_each(|v| *v *= s);
    }
    fn sub_scalar(x: &[f64], c: f64, out: &mut [f64]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v - c;
        }
    }
    fn exp_sub_vec(x: &[f64], m: &[f64], out: &mut [MaybeUninit<f64>]) {
        for ((o, &v), &mv) in out.iter_mut().zip(x).zip(m) {
            o.write((v - mv).exp());
        }
    }
    fn sub_vec(x: &[f64], c: &[f64], out: &mut [f64]) {
        for ((o, &v), &cv) in out.iter_mut().zip(x).zip(c) {
            *o = v - cv;
        }
    }
    fn add_assign(acc: &mut [f64], x: &[f64]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
    fn mul_assign(x: &mut [f64], s: &[f64]) {
        for (v, &sv) in x.iter_mut().zip(s) {
            *v *= sv;
        }
    }
}

/// Softmax of contiguous rows of length `n`.
fn rows<T: SmElem>(v: &[T], n: usize, log: bool) -> Vec<T> {
    let mut out = Vec::<T>::with_capacity(v.len());
    let spare = &mut out.spare_capacity_mut()[..v.len()];
    par::advise_huge_pages(spare);
    par::for_each_rows_mut(spare, n, n * COST, |first, chunk| {
        for (r, o) in chunk.chunks_exact_mut(n).enumerate() {
            let x = &v[(first + r) * n..(first + r + 1) * n];
            let m = T::row_max(x);
            let s = T::exp_sub_sum(x, m, o);
            // SAFETY: `exp_sub_sum` wrote the whole row.
            let o = unsafe { simd::assume_init_mut(o) };
            if log {
                T::sub_scalar(x, m + T::from_f64(s.ln()), o);
            } else {
                T::scale(o, T::from_f64(1.0 / s));
            }
        }
    });
    // SAFETY: the rows cover the buffer and each was written in full.
    unsafe { out.set_len(v.len()) };
    out
}

/// Softmax over the middle dim of contiguous `[outer, n, inner]` data.
fn cols<T: SmElem>(v: &[T], n: usize, inner: usize, log: bool) -> Vec<T> {
    let mut out = Vec::<T>::with_capacity(v.len());
    let spare = &mut out.spare_capacity_mut()[..v.len()];
    par::advise_huge_pages(spare);
    let slab = n * inner;
    par::for_each_rows_mut(spare, slab, slab * COST, |first, chunk| {
        let mut mx = [T::zero(); BUF];
        let mut sum = [T::zero(); BUF];
        for (oi, o) in chunk.chunks_exact_mut(slab).enumerate() {
            let x = &v[(first + oi) * slab..(first + oi + 1) * slab];
            let mut c0 = 0;
            while c0 < inner {
                let m = BUF.min(inner - c0);
                let at = |d: usize| d * inner + c0..d * inner + c0 + m;
                let (mx, sum) = (&mut mx[..m], &mut sum[..m]);
                mx.copy_from_slice(&x[at(0)]);
                for d in 1..n {
                    T::acc_max(mx, &x[at(d)]);
                }
                sum.fill(T::zero());
                for d in 0..n {
                    T::exp_sub_vec(&x[at(d)], mx, &mut o[at(d)]);
                    // SAFETY: just written in full.
                    T::add_assign(sum, unsafe { simd::assume_init_mut(&mut o[at(d)]) });
                }
                if log {
                    // sum <- max + ln(sum), then out = x - sum.
                    for (s, &mv) in sum.iter_mut().zip(mx.iter()) {
                        *s = mv + s.ln();
                    }
                    for d in 0..n {
                        // SAFETY: written by `exp_sub_vec` above.
                        T::sub_vec(&x[at(d)], sum, unsafe { simd::assume_init_mut(&mut o[at(d)]) });
                    }
                } else {
                    for s in sum.iter_mut() {
                        *s = s.recip();
                    }
                    for d in 0..n {
                        // SAFETY: written by `exp_sub_vec` above.
                        T::mul_assign(unsafe { simd::assume_init_mut(&mut o[at(d)]) }, sum);
                    }
                }
                c0 += m;
            }
        }
    });
    // SAFETY: every slab was written in full (each column block, every row of it).
    unsafe { out.set_len(v.len()) };
    out
}

fn native<T: SmElem>(v: &[T], dims: &[usize], dim: usize, log: bool) -> Vec<T> {
    let n = dims[dim];
    let inner: usize = dims[dim + 1..].iter().product();
    if v.is_empty() || n == 0 {
        return vec![T::zero(); v.len()];
    }
    if inner == 1 {
        rows(v, n, log)
    } else {
        cols(v, n, inner, log)
    }
}

fn run(x: &Tensor, dim: usize, log: bool) -> Result<Tensor> {
    let name = if log { "log_softmax" } else { "softmax" };
    let rank = x.rank();
    if dim >= rank {
        return Err(Error::DimOutOfRange { op: name, dim, rank });
    }
    let dims = x.dims();
    let storage = match cpu_storage(name, x)? {
        CpuStorage::F32(_) => CpuStorage::F32(native(&x.cpu_data::<f32>()?, dims, dim, log)),
        CpuStorage::F64(_) => CpuStorage::F64(native(&x.cpu_data::<f64>()?, dims, dim, log)),
        CpuStorage::BF16(_) | CpuStorage::F16(_) => {
            let x32 = x.to_dtype(DType::F32)?;
            CpuStorage::F32(native(&x32.cpu_data::<f32>()?, dims, dim, log)).to_dtype(x.dtype())
        }
        s => {
            return Err(Error::UnsupportedDType {
                op: name,
                dtype: s.dtype(),
                hint: "; expected f32, f64, bf16 or f16".into(),
            })
        }
    };
    Tensor::from_cpu_storage(storage, x.shape().clone())
}

/// See [`crate::ops::softmax`].
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    run(x, dim, false)
}

/// See [`crate::ops::log_softmax`].
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    run(x, dim, true)
}
