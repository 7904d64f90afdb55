//! CPU fused selective scan (S6): forward and chunk-recomputing backward.
//!
//! # Work split
//! Channels are processed `N` at a time (one SIMD vector: 8 on AVX2, 16 on AVX-512, 1 on the
//! scalar path and for f64), each lane one channel, the `n` state vectors of a block kept in L1
//! (registers where they fit). A *task* is one batch row, one group, and up to 64 channels of it
//! (a run of whole vectors), or the channels of a group left over after its whole vectors (run
//! one lane at a time). Tasks depend on the shapes and the SIMD path only, never on the thread
//! count; rayon spreads them over the threads.
//!
//! Inside a task, time is walked in chunks of [`SELECTIVE_SCAN_CHUNK`] steps, chunks outer and
//! the task's vectors inner, so that B and C of a chunk are gathered once (into a `(T, n)` tile)
//! for all of them.
//!
//! # Per step and state (one vector of channels)
//! `decay = 2^(dt · A·log2e)` (a degree-6 polynomial after range reduction, f32; `f64::exp` for
//! f64), `h = decay · h + (dt·u) · B`, `y += h · C`: 17 vector operations.
//!
//! # Backward
//! The forward stores the state at the start of every chunk. The backward walks the chunks in
//! reverse; for each vector it recomputes the chunk forward from the saved state (keeping the
//! states and decays of the chunk, `2 · T · n` vectors, in L2), then runs the chunk backward,
//! carrying `dL/dh` from chunk to chunk. Per-channel sums (dA, dD, d delta_bias) accumulate in
//! lanes and are added over the batch in order; the cross-channel sums dB and dC accumulate
//! per lane over a task's vectors, are summed over lanes in order, then over the tasks of a
//! group in order: the gradients are bit-identical whatever the thread count.

use moeba_tensor::{DType, Device, Error, Result, Tensor, WithDType};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

use super::simd::{self, Kernel, Vf32};
use crate::ops::{
    ScanDims, SelectiveScanArgs, SelectiveScanGrads, SelectiveScanOutput, SELECTIVE_SCAN_CHUNK as CHUNK,
};

/// Channels per task (a run of whole vectors).
const TASK_CHANNELS: usize = 64;

// ------------------------------------------------------------------------------ lanes

/// The scalar types the scan computes in (f32 also for bf16/f16 inputs).
pub(crate) trait ScanFloat: Float + WithDType + Send + Sync {
    /// Lanes of the vector type the active path runs (1 for f64).
    fn lanes() -> usize;
    /// Runs a forward task; returns whether every `delta` it read was finite.
    fn forward_task(cx: &Ctx<Self>, tk: &Task) -> bool;
    /// Runs a backward task; returns its per-step dB and dC partial sums, `(l, n)` each.
    fn backward_task(cx: &Ctx<Self>, bx: &BwdCtx<Self>, tk: &Task) -> (Vec<Self>, Vec<Self>);
}

/// A vector of `N` lanes of `S`: the f32 SIMD types (through [`W`]) or plain `f64`.
///
/// # Safety
/// As [`Vf32`]: only on a path that supports the type; pointers valid for `N` lanes.
#[allow(clippy::missing_safety_doc)]
pub(crate) unsafe trait Lanes: Copy {
    /// The scalar type.
    type S: ScanFloat;
    /// Lanes.
    const N: usize;
    unsafe fn splat(x: Self::S) -> Self;
    unsafe fn load(p: *const Self::S) -> Self;
    unsafe fn store(self, p: *mut Self::S);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// `self * b + c`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    /// `exp(dt · A)` from `dt` and `prep(A)` (A·log2e for f32, A for f64; see [`prep`]).
    unsafe fn decay(dt: Self, a_prep: Self) -> Self;
    /// torch's softplus (`x` above 20).
    unsafe fn softplus(self) -> Self;
    /// The derivative of [`Lanes::softplus`].
    unsafe fn softplus_grad(self) -> Self;
    /// `1 / (1 + e^-x)`.
    unsafe fn sigmoid(self) -> Self;

    /// The lanes as an array (first `N` entries).
    #[inline(always)]
    unsafe fn to_array(self) -> [Self::S; 16] {
        let mut buf = [Self::S::zero(); 16];
        unsafe { self.store(buf.as_mut_ptr()) };
        buf
    }
    /// Lanes `p[0], p[stride], ...`.
    #[inline(always)]
    unsafe fn gather(p: *const Self::S, stride: usize) -> Self {
        unsafe {
            if stride == 1 || Self::N == 1 {
                return Self::load(p);
            }
            let mut buf = [Self::S::zero(); 16];
            for (j, b) in buf.iter_mut().enumerate().take(Self::N) {
                *b = *p.add(j * stride);
            }
            Self::load(buf.as_ptr())
        }
    }
    /// Stores lane `j` to `p[j * stride]`.
    #[inline(always)]
    unsafe fn scatter(self, p: *mut Self::S, stride: usize) {
        unsafe {
            if stride == 1 || Self::N == 1 {
                return self.store(p);
            }
            let a = self.to_array();
            for (j, &v) in a.iter().enumerate().take(Self::N) {
                *p.add(j * stride) = v;
            }
        }
    }
    /// The sum of the lanes, in lane order.
    #[inline(always)]
    unsafe fn lane_sum(self) -> Self::S {
        let a = unsafe { self.to_array() };
        a[1..Self::N].iter().fold(a[0], |s, &v| s + v)
    }
}

/// An f32 SIMD vector as [`Lanes`].
#[derive(Clone, Copy)]
pub(crate) struct W<V>(V);

unsafe impl<V: Vf32> Lanes for W<V> {
    type S = f32;
    const N: usize = V::LANES;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        W(unsafe { V::splat(x) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        W(unsafe { V::load(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { self.0.store(p) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        W(unsafe { self.0.add(b.0) })
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        W(unsafe { self.0.sub(b.0) })
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        W(unsafe { self.0.mul(b.0) })
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        W(unsafe { self.0.fma(b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn decay(dt: Self, a_prep: Self) -> Self {
        W(unsafe { decay_v(dt.0, a_prep.0) })
    }
    #[inline(always)]
    unsafe fn softplus(self) -> Self {
        // max(x, 0) + ln(1 + e) with e = e^-|x| in (0, 1]: ln(1 + e) = 2 atanh(s), s = e / (2 + e)
        // <= 1/3, by its odd series to s^13 (truncation < 1e-8).
        unsafe {
            let x = self.0;
            let e = simd::exp(x.abs().neg());
            let s = e.div(e.add(V::splat(2.0)));
            let s2 = s.mul(s);
            let mut p = V::splat(1.0 / 13.0);
            p = p.fma(s2, V::splat(1.0 / 11.0));
            p = p.fma(s2, V::splat(1.0 / 9.0));
            p = p.fma(s2, V::splat(1.0 / 7.0));
            p = p.fma(s2, V::splat(1.0 / 5.0));
            p = p.fma(s2, V::splat(1.0 / 3.0));
            p = p.fma(s2, V::splat(1.0));
            let l1p = p.mul(s.add(s));
            W(x.max(V::splat(0.0)).add(l1p))
        }
    }
    #[inline(always)]
    unsafe fn softplus_grad(self) -> Self {
        // sigmoid(x); above 20 it rounds to 1 in f32, as torch's threshold gives.
        unsafe { self.sigmoid() }
    }
    #[inline(always)]
    unsafe fn sigmoid(self) -> Self {
        W(unsafe { simd::sigmoid(self.0) })
    }
}

/// `x` clamped to `[lo, hi]` lanewise, NaN propagating (as `V::max(lo).min(hi)`); two
/// instructions on AVX2 instead of the blends the generic NaN-propagating max/min need.
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn clamp_v<V: Vf32>(x: V, lo: f32, hi: f32) -> V {
    #[cfg(target_arch = "x86_64")]
    if V::LANES == 8 && std::mem::size_of::<V>() == 32 {
        use std::arch::x86_64::{__m256, _mm256_max_ps, _mm256_min_ps, _mm256_set1_ps};
        // SAFETY: on x86_64 the only 8-lane `Vf32` is the AVX2 `__m256` newtype, used only on
        // the AVX2 path. maxps/minps return their second operand when either is NaN: `x` goes
        // second so that a NaN propagates.
        unsafe {
            let v: __m256 = std::mem::transmute_copy(&x);
            let r = _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v));
            return std::mem::transmute_copy(&r);
        }
    }
    unsafe { x.max(V::splat(lo)).min(V::splat(hi)) }
}

/// `exp(dt · A)` from `dt` and `A·log2e` (see [`Lanes::decay`]).
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn decay_v<V: Vf32>(dt: V, a_prep: V) -> V {
    // 2^x with x = dt·A·log2e clamped to the normal range, x = k + f, |f| <= 1/2, and
    // 2^f = e^(f ln2) by its Taylor polynomial of degree 6 (relative error < 1.2e-7).
    unsafe {
        let x = clamp_v(dt.mul(a_prep), -126.0, 126.0);
        let k = x.round();
        let f = x.sub(k);
        let mut p = V::splat(1.540_353e-4);
        p = p.fma(f, V::splat(1.333_355_8e-3));
        p = p.fma(f, V::splat(9.618_129e-3));
        p = p.fma(f, V::splat(5.550_411e-2));
        p = p.fma(f, V::splat(0.240_226_5));
        p = p.fma(f, V::splat(std::f32::consts::LN_2));
        p = p.fma(f, V::splat(1.0));
        p.mul(k.pow2i())
    }
}

/// [`decay_v`] for finite `dt · A` (a NaN does not propagate): on AVX2 the scaling by 2^k is an
/// integer add to the exponent bits (the same value unless it is below 2^-126).
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn decay_fast<V: Vf32>(dt: V, a_prep: V) -> V {
    #[cfg(target_arch = "x86_64")]
    if V::LANES == 8 && std::mem::size_of::<V>() == 32 {
        use std::arch::x86_64::*;
        // SAFETY: as in `clamp_v`. The same polynomial; k = round(x) (nearest even) by adding
        // 1.5·2^23, whose low mantissa bits are then k, shifted into the exponent field and added
        // to the bits of 2^f (the product with 2^k, exact unless it is below 2^-126).
        unsafe {
            let magic = _mm256_set1_ps(12_582_912.0);
            let x: __m256 = std::mem::transmute_copy(&clamp_v(dt.mul(a_prep), -126.0, 126.0));
            let t = _mm256_add_ps(x, magic);
            let f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
            let c = |v: f32| _mm256_set1_ps(v);
            let mut p = c(1.540_353e-4);
            p = _mm256_fmadd_ps(p, f, c(1.333_355_8e-3));
            p = _mm256_fmadd_ps(p, f, c(9.618_129e-3));
            p = _mm256_fmadd_ps(p, f, c(5.550_411e-2));
            p = _mm256_fmadd_ps(p, f, c(0.240_226_5));
            p = _mm256_fmadd_ps(p, f, c(std::f32::consts::LN_2));
            p = _mm256_fmadd_ps(p, f, c(1.0));
            let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(t));
            let r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
            return std::mem::transmute_copy(&r);
        }
    }
    unsafe { decay_v(dt, a_prep) }
}

unsafe impl Lanes for f64 {
    type S = f64;
    const N: usize = 1;
    #[inline(always)]
    unsafe fn splat(x: f64) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        unsafe { *p = self }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        self * b
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        self * b + c
    }
    #[inline(always)]
    unsafe fn decay(dt: Self, a_prep: Self) -> Self {
        (dt * a_prep).exp()
    }
    #[inline(always)]
    unsafe fn softplus(self) -> Self {
        if self > 20.0 {
            self
        } else {
            self.exp().ln_1p()
        }
    }
    #[inline(always)]
    unsafe fn softplus_grad(self) -> Self {
        if self > 20.0 {
            1.0
        } else {
            1.0 / (1.0 + (-self).exp())
        }
    }
    #[inline(always)]
    unsafe fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
}

// ------------------------------------------------------------------------------ context

/// A strided view into a tensor's storage (rank <= 4, strides in elements).
#[derive(Clone, Copy)]
pub(crate) struct Arr<S> {
    p: *const S,
    st: [usize; 4],
}

impl<S> Arr<S> {
    /// Pointer to element `(i0, i1, i2, i3)` (trailing indices of lower ranks are 0).
    #[inline(always)]
    unsafe fn at(&self, i0: usize, i1: usize, i2: usize, i3: usize) -> *const S {
        unsafe { self.p.add(i0 * self.st[0] + i1 * self.st[1] + i2 * self.st[2] + i3 * self.st[3]) }
    }
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<S>(*mut S);

/// Everything a forward or backward task reads and writes.
pub(crate) struct Ctx<S> {
    dims: ScanDims,
    u: Arr<S>,
    delta: Arr<S>,
    z: Option<Arr<S>>,
    bm: Arr<S>,
    cm: Arr<S>,
    h0: Option<Arr<S>>,
    /// `(d, n)` contiguous, `prep(A)`.
    a_prep: Vec<S>,
    /// `(d, n)` contiguous.
    a: Vec<S>,
    /// Whether every `A` is finite (then `dt · A` is, for finite `delta`).
    a_finite: bool,
    dskip: Option<Vec<S>>,
    bias: Option<Vec<S>>,
    softplus: bool,
    /// `reset[b * l + t]`: a new document starts at t (t > 0).
    reset: Option<Vec<bool>>,
    /// Whether out/du/ddelta/dz are `(b, l, d)` (else `(b, d, l)`).
    channel_last: bool,
    /// Forward: `out`; backward: `du`.
    out: OutPtr<S>,
    /// Forward: `last_state (b, d, n)`; backward: `d initial_state (b, d, n)`.
    state: OutPtr<S>,
    /// Forward: `chunk_states (b, nch, n, d)` written; backward: read through `saved`.
    chunks: OutPtr<S>,
}

// SAFETY: the raw pointers point into tensors and buffers that outlive every task; tasks read
// shared inputs and write disjoint output elements.
unsafe impl<S: Send> Send for Ctx<S> {}
unsafe impl<S: Sync> Sync for Ctx<S> {}

/// What only the backward reads and writes.
pub(crate) struct BwdCtx<S> {
    grad_out: Arr<S>,
    grad_last: Option<Arr<S>>,
    saved: Arr<S>,
    /// `d delta`, `dz` (layout as `out`).
    ddelta: OutPtr<S>,
    dz: OutPtr<S>,
    /// Per batch row: `dA (b, d, n)`, `dD (b, d)`, `d delta_bias (b, d)`.
    da: OutPtr<S>,
    dd: OutPtr<S>,
    dbias: OutPtr<S>,
}

// SAFETY: as for `Ctx`.
unsafe impl<S: Send> Send for BwdCtx<S> {}
unsafe impl<S: Sync> Sync for BwdCtx<S> {}

/// One unit of parallel work: batch row `bi`, group `grp`, channels `c0..c1`. Built as whole
/// vectors of the active path (or the leftover channels of a group); a task runs whole vectors of
/// whatever path is active when it runs and its remaining channels one at a time, so a path
/// change between building and running the tasks cannot make it touch other channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Task {
    bi: usize,
    grp: usize,
    c0: usize,
    c1: usize,
}

fn tasks(dims: &ScanDims, lanes: usize) -> Vec<Task> {
    let dg = dims.dim / dims.groups;
    let per = (TASK_CHANNELS / lanes).max(1);
    let mut v = Vec::new();
    for bi in 0..dims.batch {
        for grp in 0..dims.groups {
            let g0 = grp * dg;
            let full = dg / lanes;
            let mut s = 0;
            while s < full {
                let nb = per.min(full - s);
                v.push(Task { bi, grp, c0: g0 + s * lanes, c1: g0 + (s + nb) * lanes });
                s += nb;
            }
            if !dg.is_multiple_of(lanes) {
                v.push(Task { bi, grp, c0: g0 + full * lanes, c1: g0 + dg });
            }
        }
    }
    v
}

/// A strided view of `t` in dtype `S` (converted, then kept alive in `keep`, when it differs).
fn arr<S: WithDType>(t: &Tensor, keep: &mut Vec<Tensor>) -> Result<Arr<S>> {
    let t = if t.dtype() == S::DTYPE { t.clone() } else { t.to_dtype(S::DTYPE)? };
    let slice = t.storage().as_cpu().and_then(|s| s.as_slice::<S>()).ok_or_else(|| Error::Unsupported {
        op: "selective_scan",
        msg: format!("expected a CPU tensor of {}", S::DTYPE),
    })?;
    let p = slice.as_ptr().wrapping_add(t.layout().offset());
    let mut st = [0usize; 4];
    st[..t.rank()].copy_from_slice(t.layout().strides());
    keep.push(t);
    Ok(Arr { p, st })
}

fn vec_of<S: WithDType>(t: &Tensor) -> Result<Vec<S>> {
    Ok(t.to_dtype(S::DTYPE)?.cpu_data::<S>()?.into_owned())
}

#[inline(always)]
fn is_reset<S>(cx: &Ctx<S>, bi: usize, t: usize) -> bool {
    cx.reset.as_ref().is_some_and(|r| r[bi * cx.dims.len + t])
}

/// Copies `(bi, c0..c0+w, t0..t0+tn)` of a `(b, d, l)` array into `tile[t * w + c]`: a few
/// wide loads per step when channel-last, a transpose of whole time runs otherwise (the
/// compute loop then reads unit-stride vectors whatever the input layout).
#[inline(always)]
unsafe fn stage<S: Copy>(a: &Arr<S>, bi: usize, c0: usize, w: usize, t0: usize, tn: usize, tile: &mut [S]) {
    unsafe {
        if a.st[1] == 1 {
            for t in 0..tn {
                std::ptr::copy_nonoverlapping(a.at(bi, c0, t0 + t, 0), tile.as_mut_ptr().add(t * w), w);
            }
        } else {
            for c in 0..w {
                let p = a.at(bi, c0 + c, t0, 0);
                for t in 0..tn {
                    tile[t * w + c] = *p.add(t * a.st[2]);
                }
            }
        }
    }
}

/// Writes `tile[t * w + c]` to `(bi, c0..c0+w, t0..t0+tn)` of a `(b, d, l)` output in the
/// context's layout.
#[inline(always)]
unsafe fn unstage<S: Copy>(
    cx: &Ctx<S>,
    out: OutPtr<S>,
    bi: usize,
    c0: usize,
    w: usize,
    t0: usize,
    tn: usize,
    tile: &[S],
) {
    let ScanDims { dim: d, len: l, .. } = cx.dims;
    unsafe {
        if cx.channel_last {
            for t in 0..tn {
                std::ptr::copy_nonoverlapping(
                    tile.as_ptr().add(t * w),
                    out.0.add((bi * l + t0 + t) * d + c0),
                    w,
                );
            }
        } else {
            for c in 0..w {
                let p = out.0.add((bi * d + c0 + c) * l + t0);
                for t in 0..tn {
                    *p.add(t) = tile[t * w + c];
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ forward

/// The forward of one task (see the module docs). Returns whether every delta was finite.
#[inline(always)]
unsafe fn forward_task<L: Lanes>(cx: &Ctx<L::S>, tk: &Task, c0: usize, nb: usize) -> bool {
    unsafe {
        let ScanDims { dim: d, len: l, state: n, .. } = cx.dims;
        let nch = l.div_ceil(CHUNK);
        let (bi, lanes) = (tk.bi, L::N);
        let zero = L::splat(L::S::zero());
        let chan = |blk: usize| c0 + blk * lanes;
        let mut a2: Vec<L> = Vec::with_capacity(nb * n);
        let mut h: Vec<L> = Vec::with_capacity(nb * n);
        let mut dvec = Vec::with_capacity(nb);
        let mut bvec = Vec::with_capacity(nb);
        for blk in 0..nb {
            let c = chan(blk);
            for i in 0..n {
                a2.push(L::gather(cx.a_prep.as_ptr().add(c * n + i), n));
                h.push(match &cx.h0 {
                    Some(h0) => L::gather(h0.at(bi, c, i, 0), h0.st[1]),
                    None => zero,
                });
            }
            dvec.push(cx.dskip.as_ref().map_or(zero, |v| L::load(v.as_ptr().add(c))));
            bvec.push(cx.bias.as_ref().map_or(zero, |v| L::load(v.as_ptr().add(c))));
        }
        let mut fin = zero;
        let mut bt = vec![L::S::zero(); CHUNK * n];
        let mut ct = vec![L::S::zero(); CHUNK * n];
        let w = nb * lanes;
        let mut tu = vec![L::S::zero(); CHUNK * w];
        let mut tdl = vec![L::S::zero(); CHUNK * w];
        let mut tz = vec![L::S::zero(); if cx.z.is_some() { CHUNK * w } else { 0 }];
        let mut to = vec![L::S::zero(); CHUNK * w];
        for k in 0..nch {
            let (t0, t1) = (k * CHUNK, ((k + 1) * CHUNK).min(l));
            for t in t0..t1 {
                for i in 0..n {
                    bt[(t - t0) * n + i] = *cx.bm.at(bi, tk.grp, i, t);
                    ct[(t - t0) * n + i] = *cx.cm.at(bi, tk.grp, i, t);
                }
            }
            let tn = t1 - t0;
            stage(&cx.u, bi, c0, w, t0, tn, &mut tu);
            stage(&cx.delta, bi, c0, w, t0, tn, &mut tdl);
            if let Some(z) = &cx.z {
                stage(z, bi, c0, w, t0, tn, &mut tz);
            }
            for blk in 0..nb {
                let c = chan(blk);
                let hb = &mut h[blk * n..(blk + 1) * n];
                let ab = &a2[blk * n..(blk + 1) * n];
                for (i, hi) in hb.iter().enumerate() {
                    hi.store(cx.chunks.0.add(((bi * nch + k) * n + i) * d + c));
                }
                for t in t0..t1 {
                    let tl = t - t0;
                    if is_reset(cx, bi, t) {
                        hb.iter_mut().for_each(|v| *v = zero);
                    }
                    let at = tl * w + blk * lanes;
                    let raw = L::load(tdl.as_ptr().add(at)).add(bvec[blk]);
                    fin = fin.add(raw.sub(raw));
                    let dt = if cx.softplus { raw.softplus() } else { raw };
                    let uu = L::load(tu.as_ptr().add(at));
                    let dtu = dt.mul(uu);
                    let mut y = zero;
                    let btr = &bt[tl * n..(tl + 1) * n];
                    let ctr = &ct[tl * n..(tl + 1) * n];
                    for ((hi, &ai), (&bv, &cv)) in hb.iter_mut().zip(ab).zip(btr.iter().zip(ctr)) {
                        let da = L::decay(dt, ai);
                        let hn = da.fma(*hi, dtu.mul(L::splat(bv)));
                        *hi = hn;
                        y = hn.fma(L::splat(cv), y);
                    }
                    if cx.dskip.is_some() {
                        y = uu.fma(dvec[blk], y);
                    }
                    if cx.z.is_some() {
                        let zz = L::load(tz.as_ptr().add(at));
                        y = y.mul(zz.mul(zz.sigmoid()));
                    }
                    y.store(to.as_mut_ptr().add(at));
                }
            }
            unstage(cx, cx.out, bi, c0, w, t0, tn, &to);
        }
        for blk in 0..nb {
            let c = chan(blk);
            for i in 0..n {
                h[blk * n + i].scatter(cx.state.0.add((bi * d + c) * n + i), n);
            }
        }
        let f = fin.to_array();
        f[..lanes].iter().all(|v| *v == L::S::zero())
    }
}

/// The forward of `nb` whole vectors of channels from `c0` (f32, `n == N` states): as
/// [`forward_task`], bit for bit, with the state of a vector in a `[V; N]` (registers), and per
/// chunk a vectorised pre-pass (`dt = softplus(delta + bias)`, `dt·u`) and post-pass (D skip,
/// silu(z) gate) around the recurrence. Returns whether every delta was finite.
#[inline(always)]
unsafe fn forward_fast<V: Vf32, const N: usize>(cx: &Ctx<f32>, tk: &Task, c0: usize, nb: usize) -> bool {
    unsafe {
        let ScanDims { dim: d, len: l, .. } = cx.dims;
        let nch = l.div_ceil(CHUNK);
        let (bi, lanes) = (tk.bi, V::LANES);
        let zero = V::splat(0.0);
        let chan = |blk: usize| c0 + blk * lanes;
        let mut a2: Vec<[V; N]> = Vec::with_capacity(nb);
        let mut h: Vec<[V; N]> = Vec::with_capacity(nb);
        let mut dvec = Vec::with_capacity(nb);
        let mut bvec = Vec::with_capacity(nb);
        for blk in 0..nb {
            let c = chan(blk);
            let (mut av, mut hv) = ([zero; N], [zero; N]);
            for i in 0..N {
                av[i] = W::<V>::gather(cx.a_prep.as_ptr().add(c * N + i), N).0;
                if let Some(h0) = &cx.h0 {
                    hv[i] = W::<V>::gather(h0.at(bi, c, i, 0), h0.st[1]).0;
                }
            }
            a2.push(av);
            h.push(hv);
            dvec.push(cx.dskip.as_ref().map_or(zero, |v| V::load(v.as_ptr().add(c))));
            bvec.push(cx.bias.as_ref().map_or(zero, |v| V::load(v.as_ptr().add(c))));
        }
        let mut fin = zero;
        let mut bt = vec![0f32; CHUNK * N];
        let mut ct = vec![0f32; CHUNK * N];
        let w = nb * lanes;
        let mut tu = vec![0f32; CHUNK * w];
        let mut tdl = vec![0f32; CHUNK * w];
        let mut tz = vec![0f32; if cx.z.is_some() { CHUNK * w } else { 0 }];
        let mut to = vec![0f32; CHUNK * w];
        let mut dts = [zero; CHUNK];
        let mut dtus = [zero; CHUNK];
        for k in 0..nch {
            let (t0, t1) = (k * CHUNK, ((k + 1) * CHUNK).min(l));
            let tn = t1 - t0;
            for i in 0..N {
                let (pb, pc) = (cx.bm.at(bi, tk.grp, i, t0), cx.cm.at(bi, tk.grp, i, t0));
                let (sb, sc) = (cx.bm.st[3], cx.cm.st[3]);
                for tl in 0..tn {
                    bt[tl * N + i] = *pb.add(tl * sb);
                    ct[tl * N + i] = *pc.add(tl * sc);
                }
            }
            stage(&cx.u, bi, c0, w, t0, tn, &mut tu);
            stage(&cx.delta, bi, c0, w, t0, tn, &mut tdl);
            if let Some(z) = &cx.z {
                stage(z, bi, c0, w, t0, tn, &mut tz);
            }
            for blk in 0..nb {
                let c = chan(blk);
                let off = blk * lanes;
                // Pre-pass: dt and dt·u of the chunk.
                let bias = bvec[blk];
                for tl in 0..tn {
                    let at = tl * w + off;
                    let raw = V::load(tdl.as_ptr().add(at)).add(bias);
                    fin = fin.add(raw.sub(raw));
                    let dt = if cx.softplus { W(raw).softplus().0 } else { raw };
                    *dts.get_unchecked_mut(tl) = dt;
                    *dtus.get_unchecked_mut(tl) = dt.mul(V::load(tu.as_ptr().add(at)));
                }
                let mut hb = h[blk];
                let ab = a2[blk];
                for (i, hi) in hb.iter().enumerate() {
                    hi.store(cx.chunks.0.add(((bi * nch + k) * N + i) * d + c));
                }
                let (bp, cp, op) = (bt.as_ptr(), ct.as_ptr(), to.as_mut_ptr().add(off));
                for tl in 0..tn {
                    if cx.reset.is_some() && is_reset(cx, bi, t0 + tl) {
                        hb = [zero; N];
                    }
                    let dt = *dts.get_unchecked(tl);
                    let dtu = *dtus.get_unchecked(tl);
                    let (br, cr) = (bp.add(tl * N), cp.add(tl * N));
                    let mut y = zero;
                    for i in 0..N {
                        let da = decay_fast(dt, ab[i]);
                        let hn = da.fma(hb[i], dtu.mul(V::splat(*br.add(i))));
                        hb[i] = hn;
                        y = hn.fma(V::splat(*cr.add(i)), y);
                    }
                    y.store(op.add(tl * w));
                }
                h[blk] = hb;
                // Post-pass: D skip and the silu(z) gate.
                if cx.dskip.is_some() || cx.z.is_some() {
                    let dv = dvec[blk];
                    for tl in 0..tn {
                        let at = tl * w + off;
                        let mut y = V::load(to.as_ptr().add(at));
                        if cx.dskip.is_some() {
                            y = V::load(tu.as_ptr().add(at)).fma(dv, y);
                        }
                        if cx.z.is_some() {
                            let zz = V::load(tz.as_ptr().add(at));
                            y = y.mul(zz.mul(simd::sigmoid(zz)));
                        }
                        y.store(to.as_mut_ptr().add(at));
                    }
                }
            }
            unstage(cx, cx.out, bi, c0, w, t0, tn, &to);
        }
        for (blk, hb) in h.iter().enumerate() {
            let c = chan(blk);
            for (i, &hi) in hb.iter().enumerate() {
                W(hi).scatter(cx.state.0.add((bi * d + c) * N + i), N);
            }
        }
        let f = W(fin).to_array();
        f[..lanes].iter().all(|v| *v == 0.0)
    }
}

/// [`forward_fast`] for the common state sizes and finite `A`, else [`forward_task`].
#[inline(always)]
unsafe fn forward_vectors<V: Vf32>(cx: &Ctx<f32>, tk: &Task, c0: usize, nb: usize) -> bool {
    unsafe {
        if !cx.a_finite {
            return forward_task::<W<V>>(cx, tk, c0, nb);
        }
        match cx.dims.state {
            1 => forward_fast::<V, 1>(cx, tk, c0, nb),
            2 => forward_fast::<V, 2>(cx, tk, c0, nb),
            3 => forward_fast::<V, 3>(cx, tk, c0, nb),
            4 => forward_fast::<V, 4>(cx, tk, c0, nb),
            5 => forward_fast::<V, 5>(cx, tk, c0, nb),
            6 => forward_fast::<V, 6>(cx, tk, c0, nb),
            7 => forward_fast::<V, 7>(cx, tk, c0, nb),
            8 => forward_fast::<V, 8>(cx, tk, c0, nb),
            16 => forward_fast::<V, 16>(cx, tk, c0, nb),
            _ => forward_task::<W<V>>(cx, tk, c0, nb),
        }
    }
}

// ------------------------------------------------------------------------------ backward

/// The backward of one task; returns its dB and dC partial sums, `(l, n)` each.
#[inline(always)]
unsafe fn backward_task<L: Lanes>(
    cx: &Ctx<L::S>,
    bx: &BwdCtx<L::S>,
    tk: &Task,
    c0: usize,
    nb: usize,
) -> (Vec<L::S>, Vec<L::S>) {
    unsafe {
        let ScanDims { dim: d, len: l, state: n, .. } = cx.dims;
        let nch = l.div_ceil(CHUNK);
        let (bi, lanes) = (tk.bi, L::N);
        let s0 = L::S::zero();
        let zero = L::splat(s0);
        let one = L::splat(L::S::one());
        let chan = |blk: usize| c0 + blk * lanes;
        let mut a2: Vec<L> = Vec::with_capacity(nb * n);
        let mut an: Vec<L> = Vec::with_capacity(nb * n);
        let mut dh: Vec<L> = Vec::with_capacity(nb * n);
        let mut dvec = Vec::with_capacity(nb);
        let mut bvec = Vec::with_capacity(nb);
        for blk in 0..nb {
            let c = chan(blk);
            for i in 0..n {
                a2.push(L::gather(cx.a_prep.as_ptr().add(c * n + i), n));
                an.push(L::gather(cx.a.as_ptr().add(c * n + i), n));
                dh.push(match &bx.grad_last {
                    Some(g) => L::gather(g.at(bi, c, i, 0), g.st[1]),
                    None => zero,
                });
            }
            dvec.push(cx.dskip.as_ref().map_or(zero, |v| L::load(v.as_ptr().add(c))));
            bvec.push(cx.bias.as_ref().map_or(zero, |v| L::load(v.as_ptr().add(c))));
        }
        let mut da_acc: Vec<L> = vec![zero; nb * n];
        let mut dd_acc: Vec<L> = vec![zero; nb];
        let mut dbias_acc: Vec<L> = vec![zero; nb];
        let mut part_b = vec![s0; l * n];
        let mut part_c = vec![s0; l * n];
        let mut bt = vec![s0; CHUNK * n];
        let mut ct = vec![s0; CHUNK * n];
        // Per chunk and vector: states after each step, decays, and per-step values.
        let mut hh: Vec<L> = vec![zero; CHUNK * n];
        let mut dah: Vec<L> = vec![zero; CHUNK * n];
        let mut hstart: Vec<L> = vec![zero; n];
        let mut ys: Vec<L> = vec![zero; CHUNK];
        let mut dts: Vec<L> = vec![zero; CHUNK];
        let mut raws: Vec<L> = vec![zero; CHUNK];
        let mut dbt: Vec<L> = vec![zero; CHUNK * n];
        let mut dct: Vec<L> = vec![zero; CHUNK * n];
        let w = nb * lanes;
        let zt = if cx.z.is_some() { CHUNK * w } else { 0 };
        let (mut tu, mut tdl, mut tg) = (vec![s0; CHUNK * w], vec![s0; CHUNK * w], vec![s0; CHUNK * w]);
        let (mut tz, mut tdz) = (vec![s0; zt], vec![s0; zt]);
        let (mut tdu, mut tdd) = (vec![s0; CHUNK * w], vec![s0; CHUNK * w]);
        for k in (0..nch).rev() {
            let (t0, t1) = (k * CHUNK, ((k + 1) * CHUNK).min(l));
            let tn = t1 - t0;
            for t in t0..t1 {
                for i in 0..n {
                    bt[(t - t0) * n + i] = *cx.bm.at(bi, tk.grp, i, t);
                    ct[(t - t0) * n + i] = *cx.cm.at(bi, tk.grp, i, t);
                }
            }
            dbt[..tn * n].iter_mut().for_each(|v| *v = zero);
            dct[..tn * n].iter_mut().for_each(|v| *v = zero);
            stage(&cx.u, bi, c0, w, t0, tn, &mut tu);
            stage(&cx.delta, bi, c0, w, t0, tn, &mut tdl);
            stage(&bx.grad_out, bi, c0, w, t0, tn, &mut tg);
            if let Some(z) = &cx.z {
                stage(z, bi, c0, w, t0, tn, &mut tz);
            }
            for blk in 0..nb {
                let c = chan(blk);
                let ab = &a2[blk * n..(blk + 1) * n];
                let anb = &an[blk * n..(blk + 1) * n];
                // Recompute the chunk forward from its saved state.
                for (i, hs) in hstart.iter_mut().enumerate() {
                    *hs = L::gather(bx.saved.at(bi, k, i, c), bx.saved.st[3]);
                }
                for t in t0..t1 {
                    let tl = t - t0;
                    let at = tl * w + blk * lanes;
                    let raw = L::load(tdl.as_ptr().add(at)).add(bvec[blk]);
                    let dt = if cx.softplus { raw.softplus() } else { raw };
                    let uu = L::load(tu.as_ptr().add(at));
                    let dtu = dt.mul(uu);
                    let reset = is_reset(cx, bi, t);
                    let mut y = zero;
                    let btr = &bt[tl * n..(tl + 1) * n];
                    let ctr = &ct[tl * n..(tl + 1) * n];
                    let (prev, cur) = if tl == 0 {
                        (&hstart[..], &mut hh[..n])
                    } else {
                        let (a, b) = hh.split_at_mut(tl * n);
                        (&a[(tl - 1) * n..], &mut b[..n])
                    };
                    let dar = &mut dah[tl * n..(tl + 1) * n];
                    for i in 0..n {
                        let da = if reset { zero } else { L::decay(dt, ab[i]) };
                        let hn = da.fma(prev[i], dtu.mul(L::splat(btr[i])));
                        cur[i] = hn;
                        dar[i] = da;
                        y = hn.fma(L::splat(ctr[i]), y);
                    }
                    if cx.dskip.is_some() {
                        y = uu.fma(dvec[blk], y);
                    }
                    ys[tl] = y;
                    dts[tl] = dt;
                    raws[tl] = raw;
                }
                // The chunk backward.
                let dhb = &mut dh[blk * n..(blk + 1) * n];
                let dab = &mut da_acc[blk * n..(blk + 1) * n];
                for t in (t0..t1).rev() {
                    let tl = t - t0;
                    let at = tl * w + blk * lanes;
                    let g = L::load(tg.as_ptr().add(at));
                    let dy = match &cx.z {
                        Some(_) => {
                            let zz = L::load(tz.as_ptr().add(at));
                            let sg = zz.sigmoid();
                            // d silu(z) = s (1 + z (1 - s))
                            let dsilu = sg.mul(zz.fma(one.sub(sg), one));
                            g.mul(ys[tl]).mul(dsilu).store(tdz.as_mut_ptr().add(at));
                            g.mul(zz.mul(sg))
                        }
                        None => g,
                    };
                    let uu = L::load(tu.as_ptr().add(at));
                    let dt = dts[tl];
                    let dtu = dt.mul(uu);
                    let mut du = zero;
                    if cx.dskip.is_some() {
                        dd_acc[blk] = dy.fma(uu, dd_acc[blk]);
                        du = dy.mul(dvec[blk]);
                    }
                    let btr = &bt[tl * n..(tl + 1) * n];
                    let ctr = &ct[tl * n..(tl + 1) * n];
                    let hcur = &hh[tl * n..(tl + 1) * n];
                    let hprev = if tl == 0 { &hstart[..] } else { &hh[(tl - 1) * n..tl * n] };
                    let dar = &dah[tl * n..(tl + 1) * n];
                    let dbr = &mut dbt[tl * n..(tl + 1) * n];
                    let dcr = &mut dct[tl * n..(tl + 1) * n];
                    let mut ddt = zero;
                    let mut sb = zero;
                    for i in 0..n {
                        let dhi = dy.fma(L::splat(ctr[i]), dhb[i]);
                        dcr[i] = dy.fma(hcur[i], dcr[i]);
                        dbr[i] = dhi.fma(dtu, dbr[i]);
                        let q = dhi.mul(hprev[i]).mul(dar[i]);
                        ddt = q.fma(anb[i], ddt);
                        dab[i] = q.fma(dt, dab[i]);
                        sb = dhi.fma(L::splat(btr[i]), sb);
                        dhb[i] = dhi.mul(dar[i]);
                    }
                    ddt = sb.fma(uu, ddt);
                    du = sb.fma(dt, du);
                    let draw = if cx.softplus { ddt.mul(raws[tl].softplus_grad()) } else { ddt };
                    dbias_acc[blk] = dbias_acc[blk].add(draw);
                    du.store(tdu.as_mut_ptr().add(at));
                    draw.store(tdd.as_mut_ptr().add(at));
                }
            }
            unstage(cx, cx.out, bi, c0, w, t0, tn, &tdu);
            unstage(cx, bx.ddelta, bi, c0, w, t0, tn, &tdd);
            if cx.z.is_some() {
                unstage(cx, bx.dz, bi, c0, w, t0, tn, &tdz);
            }
            for tl in 0..tn {
                for i in 0..n {
                    part_b[(t0 + tl) * n + i] = dbt[tl * n + i].lane_sum();
                    part_c[(t0 + tl) * n + i] = dct[tl * n + i].lane_sum();
                }
            }
        }
        for blk in 0..nb {
            let c = chan(blk);
            for i in 0..n {
                dh[blk * n + i].scatter(cx.state.0.add((bi * d + c) * n + i), n);
                da_acc[blk * n + i].scatter(bx.da.0.add((bi * d + c) * n + i), n);
            }
            dd_acc[blk].store(bx.dd.0.add(bi * d + c));
            dbias_acc[blk].store(bx.dbias.0.add(bi * d + c));
        }
        (part_b, part_c)
    }
}

// ------------------------------------------------------------------------------ dispatch

struct FwdK<'a> {
    cx: &'a Ctx<f32>,
    tk: &'a Task,
}

impl Kernel for FwdK<'_> {
    type Output = bool;
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) -> bool {
        let (tk, w) = (self.tk, V::LANES);
        let full = (tk.c1 - tk.c0) / w;
        let rest = tk.c0 + full * w;
        unsafe {
            let a = full == 0 || forward_vectors::<V>(self.cx, tk, tk.c0, full);
            let b = rest == tk.c1 || forward_vectors::<f32>(self.cx, tk, rest, tk.c1 - rest);
            a && b
        }
    }
}

struct BwdK<'a> {
    cx: &'a Ctx<f32>,
    bx: &'a BwdCtx<f32>,
    tk: &'a Task,
}

impl Kernel for BwdK<'_> {
    type Output = (Vec<f32>, Vec<f32>);
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) -> (Vec<f32>, Vec<f32>) {
        let (tk, w) = (self.tk, V::LANES);
        let full = (tk.c1 - tk.c0) / w;
        let rest = tk.c0 + full * w;
        unsafe {
            if rest == tk.c1 {
                return backward_task::<W<V>>(self.cx, self.bx, tk, tk.c0, full);
            }
            let (mut pb, mut pc) = backward_task::<W<f32>>(self.cx, self.bx, tk, rest, tk.c1 - rest);
            if full > 0 {
                let (vb, vc) = backward_task::<W<V>>(self.cx, self.bx, tk, tk.c0, full);
                pb.iter_mut().zip(vb).for_each(|(o, v)| *o += v);
                pc.iter_mut().zip(vc).for_each(|(o, v)| *o += v);
            }
            (pb, pc)
        }
    }
}

struct LanesK;

impl Kernel for LanesK {
    type Output = usize;
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) -> usize {
        V::LANES
    }
}

impl ScanFloat for f32 {
    fn lanes() -> usize {
        // SAFETY: the kernel touches no memory.
        unsafe { simd::dispatch(LanesK) }
    }
    fn forward_task(cx: &Ctx<f32>, tk: &Task) -> bool {
        // SAFETY: the context's pointers cover every element the task touches (see `Ctx`).
        unsafe { simd::dispatch(FwdK { cx, tk }) }
    }
    fn backward_task(cx: &Ctx<f32>, bx: &BwdCtx<f32>, tk: &Task) -> (Vec<f32>, Vec<f32>) {
        // SAFETY: as in `forward_task`.
        unsafe { simd::dispatch(BwdK { cx, bx, tk }) }
    }
}

impl ScanFloat for f64 {
    fn lanes() -> usize {
        1
    }
    fn forward_task(cx: &Ctx<f64>, tk: &Task) -> bool {
        // SAFETY: as for f32.
        unsafe { forward_task::<f64>(cx, tk, tk.c0, tk.c1 - tk.c0) }
    }
    fn backward_task(cx: &Ctx<f64>, bx: &BwdCtx<f64>, tk: &Task) -> (Vec<f64>, Vec<f64>) {
        // SAFETY: as for f32.
        unsafe { backward_task::<f64>(cx, bx, tk, tk.c0, tk.c1 - tk.c0) }
    }
}

/// Runs `f` on every task, in parallel when the work is large; results in task order.
fn run_tasks<T: Send>(tasks: &[Task], work: usize, f: impl Fn(&Task) -> T + Sync + Send) -> Vec<T> {
    if super::par::use_threads(work) && tasks.len() > 1 {
        tasks.par_iter().with_max_len(1).map(f).collect()
    } else {
        tasks.iter().map(f).collect()
    }
}

// ------------------------------------------------------------------------------ entry points

/// Whether `u (b, d, l)` is channel-last in memory.
fn channel_last(u: &Tensor) -> bool {
    super::conv1d::is_channel_last(u)
}

fn reset_flags(seq_idx: Option<&Tensor>, b: usize, l: usize) -> Result<Option<Vec<bool>>> {
    let Some(s) = seq_idx else { return Ok(None) };
    let starts = super::conv1d::segment_starts(Some(s), b, l)?;
    Ok(Some(starts.iter().enumerate().map(|(i, &s)| i % l.max(1) > 0 && s == i % l).collect()))
}

/// Builds the shared context (outputs are written through `out`, `state`, `chunks`).
fn context<S: ScanFloat>(
    args: &SelectiveScanArgs,
    dims: ScanDims,
    keep: &mut Vec<Tensor>,
    out: *mut S,
    state: *mut S,
    chunks: *mut S,
) -> Result<Ctx<S>> {
    let a = vec_of::<S>(args.a)?;
    Ok(Ctx {
        dims,
        u: arr(args.u, keep)?,
        delta: arr(args.delta, keep)?,
        z: args.z.map(|t| arr(t, keep)).transpose()?,
        bm: arr(args.b, keep)?,
        cm: arr(args.c, keep)?,
        h0: args.initial_state.map(|t| arr(t, keep)).transpose()?,
        a_prep: a.iter().map(|&v| prep::<S>(v)).collect(),
        a_finite: a.iter().all(|v| v.is_finite()),
        a,
        dskip: args.d.map(vec_of::<S>).transpose()?,
        bias: args.delta_bias.map(vec_of::<S>).transpose()?,
        softplus: args.delta_softplus,
        reset: reset_flags(args.seq_idx, dims.batch, dims.len)?,
        channel_last: channel_last(args.u),
        out: OutPtr(out),
        state: OutPtr(state),
        chunks: OutPtr(chunks),
    })
}

/// `A` as [`Lanes::decay`] wants it: `A·log2e` for f32 (every path), `A` for f64.
fn prep<S: ScanFloat>(a: S) -> S {
    if S::DTYPE == DType::F64 {
        a
    } else {
        a * S::from_f64(std::f64::consts::LOG2_E)
    }
}

fn compute_f64(dt: DType) -> bool {
    dt == DType::F64
}

/// The output `(b, d, l)` tensor from a buffer in the context's layout.
fn bdl_tensor<S: WithDType>(v: Vec<S>, dims: &ScanDims, cl: bool, dtype: DType) -> Result<Tensor> {
    super::conv1d::output(v, (dims.batch, dims.dim, dims.len), cl, dtype)
}

fn forward_typed<S: ScanFloat>(args: &SelectiveScanArgs, dims: ScanDims) -> Result<SelectiveScanOutput> {
    let ScanDims { batch: b, dim: d, len: l, state: n, .. } = dims;
    let nch = l.div_ceil(CHUNK);
    let mut out = vec![S::zero(); b * d * l];
    let mut last = vec![S::zero(); b * d * n];
    let mut chunks = vec![S::zero(); b * nch * n * d];
    let mut keep = Vec::new();
    let cx = context::<S>(args, dims, &mut keep, out.as_mut_ptr(), last.as_mut_ptr(), chunks.as_mut_ptr())?;
    let tasks = tasks(&dims, S::lanes());
    let ok = run_tasks(&tasks, b * d * l * n.max(1) * 4, |tk| S::forward_task(&cx, tk));
    if ok.iter().any(|&v| !v) {
        return Err(Error::invalid(
            "selective_scan",
            "delta",
            "holds a non-finite value (NaN or infinity), after adding delta_bias",
        ));
    }
    let dt = args.u.dtype();
    let cl = cx.channel_last;
    drop(cx);
    Ok(SelectiveScanOutput {
        out: bdl_tensor(out, &dims, cl, dt)?,
        last_state: Tensor::from_vec(last, (b, d, n), &Device::Cpu)?.to_dtype(dt)?,
        chunk_states: Tensor::from_vec(chunks, (b, nch, n, d), &Device::Cpu)?,
    })
}

/// See [`crate::ops::selective_scan`].
pub fn selective_scan(args: &SelectiveScanArgs, dims: ScanDims) -> Result<SelectiveScanOutput> {
    if compute_f64(args.u.dtype()) {
        forward_typed::<f64>(args, dims)
    } else {
        forward_typed::<f32>(args, dims)
    }
}

fn backward_typed<S: ScanFloat>(
    args: &SelectiveScanArgs,
    dims: ScanDims,
    saved: &SelectiveScanOutput,
    grad_out: &Tensor,
    grad_last_state: Option<&Tensor>,
) -> Result<SelectiveScanGrads> {
    let ScanDims { batch: b, dim: d, len: l, state: n, groups: g } = dims;
    let mut du = vec![S::zero(); b * d * l];
    let mut ddelta = vec![S::zero(); b * d * l];
    let mut dz = vec![S::zero(); if args.z.is_some() { b * d * l } else { 0 }];
    let mut dh0 = vec![S::zero(); b * d * n];
    let mut da = vec![S::zero(); b * d * n];
    let mut dd = vec![S::zero(); b * d];
    let mut dbias = vec![S::zero(); b * d];
    let mut keep = Vec::new();
    let cx = context::<S>(args, dims, &mut keep, du.as_mut_ptr(), dh0.as_mut_ptr(), std::ptr::null_mut())?;
    let bx = BwdCtx {
        grad_out: arr(grad_out, &mut keep)?,
        grad_last: grad_last_state.map(|t| arr(t, &mut keep)).transpose()?,
        saved: arr(&saved.chunk_states, &mut keep)?,
        ddelta: OutPtr(ddelta.as_mut_ptr()),
        dz: OutPtr(dz.as_mut_ptr()),
        da: OutPtr(da.as_mut_ptr()),
        dd: OutPtr(dd.as_mut_ptr()),
        dbias: OutPtr(dbias.as_mut_ptr()),
    };
    let tasks = tasks(&dims, S::lanes());
    let parts = run_tasks(&tasks, b * d * l * n.max(1) * 8, |tk| S::backward_task(&cx, &bx, tk));
    let cl = cx.channel_last;
    drop(cx);
    // dB, dC: the tasks of each (batch, group), in order.
    let mut db = vec![S::zero(); b * g * n * l];
    let mut dc = vec![S::zero(); b * g * n * l];
    for (tk, (pb, pc)) in tasks.iter().zip(&parts) {
        let base = (tk.bi * g + tk.grp) * n * l;
        for t in 0..l {
            for i in 0..n {
                db[base + i * l + t] = db[base + i * l + t] + pb[t * n + i];
                dc[base + i * l + t] = dc[base + i * l + t] + pc[t * n + i];
            }
        }
    }
    // Per-channel sums over the batch, in order.
    let sum_b = |v: &[S], w: usize| -> Vec<S> {
        let mut s = vec![S::zero(); w];
        for bi in 0..b {
            for (o, &x) in s.iter_mut().zip(&v[bi * w..(bi + 1) * w]) {
                *o = *o + x;
            }
        }
        s
    };
    let dt = args.u.dtype();
    let cpu = &Device::Cpu;
    let small = |v: Vec<S>, shape: &[usize], like: &Tensor| -> Result<Tensor> {
        Tensor::from_vec(v, shape, cpu)?.to_dtype(like.dtype())
    };
    Ok(SelectiveScanGrads {
        u: bdl_tensor(du, &dims, cl, dt)?,
        delta: bdl_tensor(ddelta, &dims, cl, dt)?,
        a: small(sum_b(&da, d * n), &[d, n], args.a)?,
        b: small(db, &[b, g, n, l], args.b)?,
        c: small(dc, &[b, g, n, l], args.c)?,
        d: args.d.map(|t| small(sum_b(&dd, d), &[d], t)).transpose()?,
        z: args.z.map(|_| bdl_tensor(dz, &dims, cl, dt)).transpose()?,
        delta_bias: args.delta_bias.map(|t| small(sum_b(&dbias, d), &[d], t)).transpose()?,
        initial_state: args.initial_state.map(|t| small(dh0, &[b, d, n], t)).transpose()?,
    })
}

/// See [`crate::ops::selective_scan_backward`].
pub fn selective_scan_backward(
    args: &SelectiveScanArgs,
    dims: ScanDims,
    saved: &SelectiveScanOutput,
    grad_out: &Tensor,
    grad_last_state: Option<&Tensor>,
) -> Result<SelectiveScanGrads> {
    let want = if compute_f64(args.u.dtype()) { DType::F64 } else { DType::F32 };
    if saved.chunk_states.dtype() != want {
        return Err(Error::invalid(
            "selective_scan_backward",
            "saved",
            format!(
                "chunk_states is {} but inputs of {} need {want}",
                saved.chunk_states.dtype(),
                args.u.dtype()
            ),
        ));
    }
    if compute_f64(args.u.dtype()) {
        backward_typed::<f64>(args, dims, saved, grad_out, grad_last_state)
    } else {
        backward_typed::<f32>(args, dims, saved, grad_out, grad_last_state)
    }
}
