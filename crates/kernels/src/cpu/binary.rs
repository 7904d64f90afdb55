//! Elementwise binary ops with broadcasting on the CPU, and the strided walker that the
//! elementwise kernels share.
//!
//! Both operands are broadcast to the output shape (stride 0 on repeated dims), then the dims
//! are coalesced: size-1 dims dropped, neighbours merged wherever every operand is contiguous
//! across them. What remains is walked in *runs*: pieces of the innermost dim. Inside a run each
//! operand is a contiguous slice (inner stride 1), a repeated scalar (inner stride 0), or, for
//! other strides, gathered into a small stack buffer first. So
//! - same shape, both contiguous: one run per output chunk, straight into the SIMD kernel;
//! - one side a scalar: slice ⊕ scalar;
//! - row broadcasts (`[m, n] ⊕ [n]`, `[m, n] ⊕ [m, 1]`): one run per row, slice ⊕ slice or
//!   slice ⊕ scalar;
//! - anything else (transposes, general broadcasts): runs of the innermost dim, never per-element
//!   index arithmetic.
//!
//! The output is written in parallel chunks (see [`super::par`]) without zero-filling.
//! f32 runs on the SIMD kernels of [`super::simd`]; f64 on plain loops (one per op, so they
//! vectorise); bf16/f16 convert runs to f32 in stack buffers, compute there and round once.

use std::mem::MaybeUninit;

use half::{bf16, f16};
use moeba_tensor::{CpuStorage, Error, Layout, Result, Shape, Tensor, WithDType};

use super::par;
use super::simd::{self, Arg};
use crate::ops::*;

/// Length of the stack buffers used to gather strided runs and convert half-precision data.
pub(crate) const BUF: usize = 256;

// ------------------------------------------------------------------------------ strided walk

/// `N` operands walked together in the row-major order of a common shape, as runs of the
/// innermost dim (see the module docs). Operand layouts must already have that shape
/// (broadcast ones with stride 0).
pub(crate) struct Walk<const N: usize> {
    dims: Vec<usize>,
    strides: [Vec<usize>; N],
    offsets: [usize; N],
}

impl<const N: usize> Walk<N> {
    /// Coalesces `dims` for operands given as `(strides, offset)`.
    pub(crate) fn new(dims: &[usize], ops: [(&[usize], usize); N]) -> Self {
        let mut d: Vec<usize> = Vec::with_capacity(dims.len());
        let mut st: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(dims.len()));
        for (i, &n) in dims.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let merge = !d.is_empty() && (0..N).all(|k| st[k].last() == Some(&(ops[k].0[i] * n)));
            if merge {
                if let Some(last) = d.last_mut() {
                    *last *= n;
                }
                for k in 0..N {
                    if let Some(l) = st[k].last_mut() {
                        *l = ops[k].0[i];
                    }
                }
            } else {
                d.push(n);
                for k in 0..N {
                    st[k].push(ops[k].0[i]);
                }
            }
        }
        if d.is_empty() {
            d.push(1);
            for s in st.iter_mut() {
                s.push(0);
            }
        }
        Walk { dims: d, strides: st, offsets: std::array::from_fn(|k| ops[k].1) }
    }

    /// Number of dims left after coalescing (at least 1).
    pub(crate) fn rank(&self) -> usize {
        self.dims.len()
    }

    /// Each operand's stride along the innermost (coalesced) dim.
    pub(crate) fn inner_strides(&self) -> [usize; N] {
        std::array::from_fn(|k| self.strides[k][self.dims.len() - 1])
    }

    /// Calls `f(pos, len, offsets)` for each run of output positions `pos..pos+len` inside
    /// `start..end` that lies within one innermost row; `offsets[k]` is operand `k`'s storage
    /// index of the run's first element.
    pub(crate) fn runs(&self, start: usize, end: usize, mut f: impl FnMut(usize, usize, [usize; N])) {
        if start >= end {
            return;
        }
        let r = self.dims.len();
        let inner = self.dims[r - 1];
        let inner_st = self.inner_strides();
        let mut j = start % inner;
        let mut row = start / inner;
        let mut idx = vec![0usize; r - 1];
        let mut base = self.offsets;
        for d in (0..r - 1).rev() {
            idx[d] = row % self.dims[d];
            row /= self.dims[d];
            for k in 0..N {
                base[k] += idx[d] * self.strides[k][d];
            }
        }
        let mut pos = start;
        loop {
            let len = (inner - j).min(end - pos);
            f(pos, len, std::array::from_fn(|k| base[k] + j * inner_st[k]));
            pos += len;
            if pos >= end {
                return;
            }
            j = 0;
            for d in (0..r - 1).rev() {
                idx[d] += 1;
                for k in 0..N {
                    base[k] += self.strides[k][d];
                }
                if idx[d] < self.dims[d] {
                    break;
                }
                for k in 0..N {
                    base[k] -= self.dims[d] * self.strides[k][d];
                }
                idx[d] = 0;
            }
        }
    }
}

/// Copies `len` elements of `src` starting at `off` with stride `stride` into `buf`.
#[inline]
pub(crate) fn gather_run<T: Copy>(src: &[T], off: usize, stride: usize, buf: &mut [T]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = src[off + i * stride];
    }
}

// ------------------------------------------------------------------------------ the engines

/// Runs `k` over `x` (any layout) in runs, producing the contiguous output of `x`'s shape.
/// `k(input, output)` gets equal-length slices.
pub(crate) fn map_unary<T: WithDType>(
    x: &[T],
    layout: &Layout,
    k: impl Fn(&[T], &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let n = layout.elem_count();
    if let Some(r) = layout.contiguous_range() {
        let x = &x[r];
        // SAFETY: `k` writes every element of the output slice it gets.
        return unsafe { par::collect_uninit(n, |s, out| k(&x[s..s + out.len()], out)) };
    }
    let walk = Walk::new(layout.dims(), [(layout.strides(), layout.offset())]);
    let [st] = walk.inner_strides();
    // SAFETY: the runs cover the chunk exactly and `k` writes every element it is given.
    unsafe {
        par::collect_uninit(n, |start, out| {
            let mut buf = [T::zeroed(); BUF];
            walk.runs(start, start + out.len(), |pos, len, [off]| {
                let o = &mut out[pos - start..pos - start + len];
                if st == 1 {
                    k(&x[off..off + len], o);
                } else {
                    let mut p = 0;
                    while p < len {
                        let m = BUF.min(len - p);
                        gather_run(x, off + p * st, st, &mut buf[..m]);
                        k(&buf[..m], &mut o[p..p + m]);
                        p += m;
                    }
                }
            })
        })
    }
}

/// Runs `k` over `a` and `b` (layouts already broadcast to `shape`) in runs, producing the
/// contiguous output of `shape`. `k(a, b, output)` gets operands as slices of the output's
/// length or as repeated scalars.
pub(crate) fn map_binary<T: WithDType>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    shape: &Shape,
    k: impl Fn(Arg<'_, T>, Arg<'_, T>, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let n = shape.elem_count();
    let walk = Walk::new(shape.dims(), [(la.strides(), la.offset()), (lb.strides(), lb.offset())]);
    let [sa, sb] = walk.inner_strides();
    // SAFETY: the runs cover the chunk exactly and `k` writes every element it is given.
    unsafe {
        par::collect_uninit(n, |start, out| {
            let mut ba = [T::zeroed(); BUF];
            let mut bb = [T::zeroed(); BUF];
            walk.runs(start, start + out.len(), |pos, len, [oa, ob]| {
                let o = &mut out[pos - start..pos - start + len];
                if let (Some(x), Some(y)) = (direct(a, oa, sa, len), direct(b, ob, sb, len)) {
                    k(x, y, o);
                    return;
                }
                let mut p = 0;
                while p < len {
                    let m = BUF.min(len - p);
                    let x = match direct(a, oa + p * sa, sa, m) {
                        Some(x) => x,
                        None => {
                            gather_run(a, oa + p * sa, sa, &mut ba[..m]);
                            Arg::Slice(&ba[..m])
                        }
                    };
                    let y = match direct(b, ob + p * sb, sb, m) {
                        Some(y) => y,
                        None => {
                            gather_run(b, ob + p * sb, sb, &mut bb[..m]);
                            Arg::Slice(&bb[..m])
                        }
                    };
                    k(x, y, &mut o[p..p + m]);
                    p += m;
                }
            })
        })
    }
}

/// An operand run read in place: a repeated scalar (stride 0) or a slice (stride 1).
#[inline(always)]
fn direct<T: Copy>(s: &[T], off: usize, st: usize, len: usize) -> Option<Arg<'_, T>> {
    match st {
        0 => Some(Arg::Scalar(s[off])),
        1 => Some(Arg::Slice(&s[off..off + len])),
        _ => None,
    }
}

/// `out[i] = f(a[i], b[i])` for slice or scalar operands (plain loops that LLVM vectorises).
#[inline(always)]
pub(crate) fn zip_with<T: Copy, U: Copy>(
    a: Arg<'_, T>,
    b: Arg<'_, T>,
    out: &mut [MaybeUninit<U>],
    f: impl Fn(T, T) -> U,
) {
    match (a, b) {
        (Arg::Slice(x), Arg::Slice(y)) => {
            for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
                o.write(f(x, y));
            }
        }
        (Arg::Slice(x), Arg::Scalar(y)) => {
            for (o, &x) in out.iter_mut().zip(x) {
                o.write(f(x, y));
            }
        }
        (Arg::Scalar(x), Arg::Slice(y)) => {
            for (o, &y) in out.iter_mut().zip(y) {
                o.write(f(x, y));
            }
        }
        (Arg::Scalar(x), Arg::Scalar(y)) => {
            let v = f(x, y);
            for o in out.iter_mut() {
                o.write(v);
            }
        }
    }
}

// ------------------------------------------------------------------------------ half precision

/// bf16 / f16: stored in half precision, computed in f32.
pub(crate) trait Half: WithDType {
    /// Exact widening.
    fn to_f32(self) -> f32;
    /// Rounding to nearest.
    fn from_f32(v: f32) -> Self;
}

impl Half for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Half for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Widens `src` into `dst` (equal lengths).
#[inline]
pub(crate) fn widen<H: Half>(src: &[H], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Rounds `src` into `dst` (equal lengths).
#[inline]
pub(crate) fn narrow_into<H: Half>(src: &[f32], dst: &mut [MaybeUninit<H>]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(H::from_f32(s));
    }
}

/// Lifts an f32 unary kernel to half precision: pieces of [`BUF`] are widened, computed, rounded.
pub(crate) fn half_unary<H: Half>(
    k32: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> impl Fn(&[H], &mut [MaybeUninit<H>]) + Sync {
    move |x: &[H], out: &mut [MaybeUninit<H>]| {
        let mut xi = [0f32; BUF];
        let mut yo = [0f32; BUF];
        for (xc, oc) in x.chunks(BUF).zip(out.chunks_mut(BUF)) {
            let m = xc.len();
            widen(xc, &mut xi[..m]);
            // The elementwise kernels write only initialised values.
            k32(&xi[..m], simd::as_uninit_mut(&mut yo[..m]));
            narrow_into(&yo[..m], oc);
        }
    }
}

/// Lifts an f32 binary kernel to half precision (see [`half_unary`]).
pub(crate) fn half_binary<H: Half>(
    k32: impl Fn(Arg<'_, f32>, Arg<'_, f32>, &mut [MaybeUninit<f32>]) + Sync,
) -> impl Fn(Arg<'_, H>, Arg<'_, H>, &mut [MaybeUninit<H>]) + Sync {
    move |a: Arg<'_, H>, b: Arg<'_, H>, out: &mut [MaybeUninit<H>]| {
        let mut xa = [0f32; BUF];
        let mut xb = [0f32; BUF];
        let mut yo = [0f32; BUF];
        let mut p = 0;
        while p < out.len() {
            let m = BUF.min(out.len() - p);
            let fa = match a {
                Arg::Slice(s) => {
                    widen(&s[p..p + m], &mut xa[..m]);
                    Arg::Slice(&xa[..m])
                }
                Arg::Scalar(v) => Arg::Scalar(v.to_f32()),
            };
            let fb = match b {
                Arg::Slice(s) => {
                    widen(&s[p..p + m], &mut xb[..m]);
                    Arg::Slice(&xb[..m])
                }
                Arg::Scalar(v) => Arg::Scalar(v.to_f32()),
            };
            // The elementwise kernels write only initialised values.
            k32(fa, fb, simd::as_uninit_mut(&mut yo[..m]));
            narrow_into(&yo[..m], &mut out[p..p + m]);
            p += m;
        }
    }
}

/// The CPU storage of `t` (the ops layer only sends CPU tensors here).
pub(crate) fn cpu_storage<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a CpuStorage> {
    t.storage().as_cpu().ok_or_else(|| Error::Unsupported {
        op,
        msg: format!("expected a CPU tensor, got one on {}", t.device()),
    })
}

// ------------------------------------------------------------------------------ binary ops

/// NaN-propagating maximum (`a` when `a > b` or `a` is NaN, else `b`), as the SIMD kernels.
#[inline(always)]
pub(crate) fn fmax<F: num_traits::Float>(a: F, b: F) -> F {
    if a > b || a.is_nan() {
        a
    } else {
        b
    }
}

/// NaN-propagating minimum.
#[inline(always)]
pub(crate) fn fmin<F: num_traits::Float>(a: F, b: F) -> F {
    if a < b || a.is_nan() {
        a
    } else {
        b
    }
}

fn f64_kernel(op: BinaryOp) -> impl Fn(Arg<'_, f64>, Arg<'_, f64>, &mut [MaybeUninit<f64>]) + Sync {
    move |a, b, out| match op {
        BinaryOp::Add => zip_with(a, b, out, |x, y| x + y),
        BinaryOp::Sub => zip_with(a, b, out, |x, y| x - y),
        BinaryOp::Mul => zip_with(a, b, out, |x, y| x * y),
        BinaryOp::Div => zip_with(a, b, out, |x, y| x / y),
        BinaryOp::Maximum => zip_with(a, b, out, fmax),
        BinaryOp::Minimum => zip_with(a, b, out, fmin),
    }
}

/// The f32 kernel; `stream`: write with non-temporal stores (outputs far larger than caches).
fn f32_kernel(
    op: BinaryOp,
    stream: bool,
) -> impl Fn(Arg<'_, f32>, Arg<'_, f32>, &mut [MaybeUninit<f32>]) + Sync {
    move |a, b, out| {
        if stream {
            simd::binary_f32_stream(op, a, b, out)
        } else {
            simd::binary_f32(op, a, b, out)
        }
    }
}

/// See [`crate::ops::binary`].
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    let name = op.name();
    let shape = a.shape().broadcast_with(name, b.shape())?;
    let la = a.layout().broadcast_as(shape.clone())?;
    let lb = b.layout().broadcast_as(shape.clone())?;
    let (sa, sb) = (cpu_storage(name, a)?, cpu_storage(name, b)?);
    let stream = shape.elem_count() * 4 >= simd::STREAM_MIN_BYTES;
    let storage = match (sa, sb) {
        (CpuStorage::F32(x), CpuStorage::F32(y)) => {
            CpuStorage::F32(map_binary(x, &la, y, &lb, &shape, f32_kernel(op, stream)))
        }
        (CpuStorage::F64(x), CpuStorage::F64(y)) => {
            CpuStorage::F64(map_binary(x, &la, y, &lb, &shape, f64_kernel(op)))
        }
        (CpuStorage::BF16(x), CpuStorage::BF16(y)) => {
            CpuStorage::BF16(map_binary(x, &la, y, &lb, &shape, half_binary(f32_kernel(op, false))))
        }
        (CpuStorage::F16(x), CpuStorage::F16(y)) => {
            CpuStorage::F16(map_binary(x, &la, y, &lb, &shape, half_binary(f32_kernel(op, false))))
        }
        _ if a.dtype() != b.dtype() => {
            return Err(Error::DTypeMismatch { op: name, lhs: a.dtype(), rhs: b.dtype() })
        }
        _ => {
            return Err(Error::UnsupportedDType {
                op: name,
                dtype: a.dtype(),
                hint: "; expected f32, f64, bf16 or f16".into(),
            })
        }
    };
    Tensor::from_cpu_storage(storage, shape)
}
