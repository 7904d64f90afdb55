//! CPU fused selective scan (S6): forward and chunk-recomputing backward.
//!
//! # Work split
//! Channels are processed `N` at a time (one SIMD vector: 8 on AVX2, 16 on AVX-512, 1 on the
//! scalar path and for f64), each lane one channel. A *task* is one batch row, one group, and up
//! to 64 channels of it (a run of whole vectors), or the channels of a group left over after its
//! whole vectors (run one lane at a time). Tasks depend on the shapes and the SIMD path only,
//! never on the thread count; rayon spreads them over the threads. B and C are copied once per
//! call to a step-major `(b, g, l, n)` layout (padded to whole state blocks), shared by every task.
//!
//! # The f32 fast kernels (finite A, any n): `forward_fast`, `backward_fast`
//! Time is walked in chunks of [`SELECTIVE_SCAN_CHUNK`](crate::ops::SELECTIVE_SCAN_CHUNK) steps (the forward saves the state at
//! the start of each) and, in the forward, in sub-chunks of `TS` steps. The states of a vector
//! are handled in blocks of `SB` (the last block padded with states whose A, B and C are 0).
//! Per sub-chunk:
//! - a pre-pass over the rows computes `dt = softplus(delta + bias)` and `dt·u` for every vector
//!   of the task, reading each channel-last row once (other layouts are staged per chunk);
//! - per vector and state block, the decays `exp(dt·A)` of the sub-chunk are computed in one
//!   pass of their own (`block_decays`: independent exps, which the core overlaps; inside the
//!   recurrence their long dependency chains stalled it), then the recurrence
//!   `h = decay·h + (dt·u)·B`, `y += h·C` runs with the block's states in registers;
//! - a post-pass adds the D skip, applies the silu(z) gate and writes the output rows in place.
//!
//! The decay is `2^(dt·A·log2e)`: `x = k + f`, `2^f` by a degree-5 polynomial (`EXP2_P`, 1.9e-7
//! relative in f32), `2^k` added to the exponent bits; the clamp of `x` to the normal range is
//! skipped for a sub-chunk when `max|dt| · max|A·log2e| <= 126`. The gates use `exp_fast`
//! (Cody-Waite, 1-2 ulp) and a division-free softplus. Channel-last rows are `d` floats apart,
//! which the hardware prefetchers do not follow: `Ahead` prefetches the next sub-chunk's input
//! rows a few lines per recurrence step.
//!
//! Measured (AMD EPYC Zen 3, 2 cores, AVX2+FMA path, f32, the benchmark's W1 inputs at
//! (1, 1536, 16, 2048), `target/release/examples/scan_bench`): forward 18.3 → 13.3 ms on two
//! threads (27 ms of CPU on one: about 14 cycles per 8-lane state update, of which the decay
//! pass is ~4.5, its floor on the two FMA ports being 3); backward 53 → 42 ms. See
//! `benches/RESULTS.md` for the quiet-machine figures.
//!
//! # Backward
//! The forward stores the state at the start of every chunk. The backward walks the chunks in
//! reverse; for each vector and state block it recomputes the chunk forward from the saved state
//! (decays in one pass, then the states of every step, kept in L2), then walks the chunk
//! backward four states at a time (their `dL/dh` and dA in registers), carrying `dL/dh` from
//! chunk to chunk. Per-channel sums (dA, dD, d delta_bias) accumulate in lanes and are added over
//! the batch in order; the cross-channel sums dB and dC accumulate per lane over a task's
//! vectors, are summed over lanes in order, then over the tasks of a group in order: the
//! gradients are bit-identical whatever the thread count.
//!
//! # Generic kernels: `forward_task`, `backward_task`
//! f64, non-finite A, and the plain recurrence the fast kernels are checked against (besides the
//! reference in `crate::reference::selective_scan`): one pass per chunk and vector, every state
//! vector in L1, `exp` per state update.

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
        // max(x, 0) + ln(1 + e) with e = e^-|x| in (0, 1], ln(1 + e) = e·q(e) with q a degree-8
        // fit of ln(1 + e)/e (relative error 3e-8, 1.9e-7 evaluated in f32; no division).
        unsafe {
            let x = self.0;
            let e = exp_fast(x.abs().neg());
            // Estrin's scheme, four FMAs deep (see `exp_fast`).
            let c = |i: usize| V::splat(LOG1P_Q[i]);
            let e2 = e.mul(e);
            let e4 = e2.mul(e2);
            let q01 = e.fma(c(1), c(0));
            let q23 = e.fma(c(3), c(2));
            let q45 = e.fma(c(5), c(4));
            let q67 = e.fma(c(7), c(6));
            let lo = e2.fma(q23, q01);
            let hi = e2.fma(q67, q45).add(e4.mul(c(8)));
            let q = e4.fma(hi, lo);
            W(x.max(V::splat(0.0)).add(e.mul(q)))
        }
    }
    #[inline(always)]
    unsafe fn softplus_grad(self) -> Self {
        // sigmoid(x); above 20 it rounds to 1 in f32, as torch's threshold gives.
        unsafe { self.sigmoid() }
    }
    #[inline(always)]
    unsafe fn sigmoid(self) -> Self {
        W(unsafe { V::splat(1.0).div(V::splat(1.0).add(exp_fast(self.0.neg()))) })
    }
}

/// `ln(1 + e)/e ≈ Σ LOG1P_Q[k]·e^k` on `e` in `[0, 1]` (a least-squares minimax fit).
const LOG1P_Q: [f32; 9] = [
    1.0,
    -0.499_994_96,
    0.333_191_8,
    -0.248_436_18,
    0.191_083_97,
    -0.136_681_66,
    0.078_282_39,
    -0.029_539_099,
    0.005_240_975_4,
];

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

/// `2^f ≈ 1 + f·(P0 + f·(P1 + ...))` on `|f| <= 1/2`: a degree-5 least-squares fit of the
/// relative error on Chebyshev nodes (1.0e-7 in exact arithmetic, 1.9e-7 evaluated in f32; the
/// degree-6 Taylor polynomial it replaces reached 2.4e-7 in f32).
const EXP2_P: [f32; 5] = [0.693_146_9, 0.240_222_38, 0.055_508_93, 0.009_671_71, 0.001_321_87];

/// `2^f` for `|f| <= 1/2` by [`EXP2_P`] (five FMAs).
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn exp2_poly<V: Vf32>(f: V) -> V {
    unsafe {
        // Horner (Estrin's shorter chains measured 20% slower here: the passes are bound by
        // the FMA ports, not by latency).
        let mut p = V::splat(EXP2_P[4]);
        p = p.fma(f, V::splat(EXP2_P[3]));
        p = p.fma(f, V::splat(EXP2_P[2]));
        p = p.fma(f, V::splat(EXP2_P[1]));
        p = p.fma(f, V::splat(EXP2_P[0]));
        p.fma(f, V::splat(1.0))
    }
}

/// `e^x` for the scan's gates (softplus, sigmoid): `x` clamped to `[-87, 88]` (2^k stays
/// normal), `k = round(x·log2e)`, `r = x - k·ln2` in two parts (Cody-Waite), `e^r` by its
/// degree-6 Taylor polynomial (`|r| <= 0.35`: truncation 1.3e-7), and 2^k added to the exponent
/// bits on AVX2. About 1-2 ulp, half the operations of [`simd::exp`] (which also handles the
/// subnormal range). A NaN gives an unspecified value (the callers multiply by `x` or check
/// finiteness).
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn exp_fast<V: Vf32>(x: V) -> V {
    unsafe {
        let x = clamp_v(x, -87.0, 88.0);
        let magic = V::splat(12_582_912.0);
        let t = x.fma(V::splat(std::f32::consts::LOG2_E), magic);
        let k = t.sub(magic);
        let r = k.fma(V::splat(-0.693_359_4), x);
        let r = k.fma(V::splat(2.121_944_4e-4), r);
        // Estrin's scheme (three FMAs deep instead of six): the gates' passes are bound by
        // latency, one long chain per step, unlike the decay pass.
        let c = |v: f32| V::splat(v);
        let r2 = r.mul(r);
        let p01 = r.fma(c(1.0), c(1.0));
        let p23 = r.fma(c(1.0 / 6.0), c(0.5));
        let p45 = r.fma(c(1.0 / 120.0), c(1.0 / 24.0));
        let p = r2.fma(r2.fma(r2.mul(c(1.0 / 720.0)).add(p45), p23), p01);
        #[cfg(target_arch = "x86_64")]
        if V::LANES == 8 && std::mem::size_of::<V>() == 32 {
            use std::arch::x86_64::*;
            // SAFETY: as in `clamp_v`; t's low mantissa bits hold k (see `decay_fast`).
            let (t, p): (__m256, __m256) = (std::mem::transmute_copy(&t), std::mem::transmute_copy(&p));
            let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(t));
            let r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
            return std::mem::transmute_copy(&r);
        }
        p.mul(k.pow2i())
    }
}

/// `x·σ(x) = x / (1 + e^-x)` with [`exp_fast`].
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn silu_fast<V: Vf32>(x: V) -> V {
    unsafe { x.div(V::splat(1.0).add(exp_fast(x.neg()))) }
}

/// `exp(dt · A)` from `dt` and `A·log2e` (see [`Lanes::decay`]).
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn decay_v<V: Vf32>(dt: V, a_prep: V) -> V {
    // 2^x with x = dt·A·log2e clamped to the normal range, x = k + f, |f| <= 1/2.
    unsafe {
        let x = clamp_v(dt.mul(a_prep), -126.0, 126.0);
        let k = x.round();
        exp2_poly(x.sub(k)).mul(k.pow2i())
    }
}

/// [`decay_v`] for finite `dt · A` (a NaN does not propagate): on AVX2 the scaling by 2^k is an
/// integer add to the exponent bits (the same value unless it is below 2^-126). Without `CLAMP`
/// the caller guarantees `|dt · A·log2e| <= 126` (then the clamp would change nothing).
///
/// # Safety
/// As every [`Vf32`] method.
#[inline(always)]
unsafe fn decay_fast<V: Vf32, const CLAMP: bool>(dt: V, a_prep: V) -> V {
    #[cfg(target_arch = "x86_64")]
    if V::LANES == 8 && std::mem::size_of::<V>() == 32 {
        use std::arch::x86_64::*;
        // SAFETY: as in `clamp_v`. k = round(x) (nearest even) by adding 1.5·2^23, whose low
        // mantissa bits are then k, shifted into the exponent field and added to the bits of 2^f
        // (the product with 2^k, exact unless it is below 2^-126).
        unsafe {
            let magic = _mm256_set1_ps(12_582_912.0);
            let x = dt.mul(a_prep);
            let x: __m256 = std::mem::transmute_copy(&if CLAMP { clamp_v(x, -126.0, 126.0) } else { x });
            let t = _mm256_add_ps(x, magic);
            let f: V = std::mem::transmute_copy(&_mm256_sub_ps(x, _mm256_sub_ps(t, magic)));
            let p: __m256 = std::mem::transmute_copy(&exp2_poly(f));
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
    /// B and C as `(b, g, l, np)`, `np` = `n` rounded up to [`SB`] (the padding 0): the fast
    /// kernels read a step's states contiguously.
    bt: Vec<S>,
    ct: Vec<S>,
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

fn tasks(dims: &ScanDims, lanes: usize, channels: usize) -> Vec<Task> {
    let dg = dims.dim / dims.groups;
    let per = (channels / lanes).max(1);
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

/// States per block of the fast kernels: the states of one block of one vector of channels stay
/// in registers for a whole chunk (8 on AVX2: 8 states, two partial sums, `dt`, `dt·u` and the
/// exp's temporaries fill the 16 ymm registers; `A` is read from L1).
const SB: usize = 8;

/// Per-step vectors of an input: step `t`'s lanes start at `p + t * step`.
#[derive(Clone, Copy)]
struct Stream {
    p: *const f32,
    step: usize,
}

impl Stream {
    /// The first lane of step `t`.
    #[inline(always)]
    unsafe fn row(self, t: usize) -> *const f32 {
        unsafe { self.p.add(t * self.step) }
    }
}

/// Whether `a`'s channels are contiguous (channel-last): then the fast kernels read it in place.
#[inline(always)]
fn in_place<S>(a: &Arr<S>) -> bool {
    a.st[1] == 1
}

/// Channels `c..` of `a` from step `t0`: in place when [`in_place`], else from `tile` (the chunk
/// staged by [`stage`], row width `w`, channel offset `off`).
#[inline(always)]
unsafe fn stream(a: &Arr<f32>, bi: usize, c: usize, t0: usize, tile: &[f32], off: usize, w: usize) -> Stream {
    unsafe {
        if in_place(a) {
            Stream { p: a.at(bi, c, t0, 0), step: a.st[2] }
        } else {
            Stream { p: tile.as_ptr().add(off), step: w }
        }
    }
}

/// Prefetches, a few cache lines at a time, the rows of the next sub-chunk that the fast forward
/// reads or writes in place. Channel-last rows are `d` floats apart, which the hardware
/// prefetchers do not follow: without this the passes over the rows wait on memory (measured: a
/// quarter of the forward at d = 1536). Spread over the recurrence, the lines arrive in time
/// without overflowing the core's miss buffers.
struct Ahead {
    /// Per stream: the first float of row 0 of the next sub-chunk, and the row step.
    streams: [(*const f32, usize); 4],
    ns: usize,
    /// Rows to fetch, floats per row.
    rows: usize,
    w: usize,
    /// The cursor: row, stream, float offset in the row.
    row: usize,
    s: usize,
    off: usize,
    /// Lines per [`Ahead::step`].
    per_step: usize,
}

impl Ahead {
    /// Rows `t..t + rows` of the in-place streams `ins` (pointers at channel `c0`, row 0, and
    /// row steps), `w` floats each, over `steps` calls of [`Ahead::step`].
    fn new(ins: &[(*const f32, usize)], t: usize, rows: usize, w: usize, steps: usize) -> Self {
        let mut a =
            Ahead { streams: [(std::ptr::null(), 0); 4], ns: 0, rows, w, row: 0, s: 0, off: 0, per_step: 0 };
        for &(p, st) in ins.iter().take(4) {
            a.streams[a.ns] = (p.wrapping_add(t * st), st);
            a.ns += 1;
        }
        if a.ns > 0 && rows > 0 && w > 0 {
            a.per_step = (rows * a.ns * (w + 15).div_ceil(16)).div_ceil(steps.max(1));
        }
        a
    }

    /// Prefetches the next few lines (into L2).
    #[inline(always)]
    fn step(&mut self) {
        for _ in 0..self.per_step {
            if self.row >= self.rows {
                return;
            }
            let (p, st) = self.streams[self.s];
            // The last offset is clamped to the row's last float (a row may span one more line).
            let q = p.wrapping_add(self.row * st + self.off.min(self.w - 1));
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                _mm_prefetch::<_MM_HINT_T1>(q as *const i8)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = q;
            self.off += 16;
            if self.off >= self.w + 15 {
                self.off = 0;
                self.s += 1;
                if self.s == self.ns {
                    (self.s, self.row) = (0, self.row + 1);
                }
            }
        }
    }
}

/// Steps per sub-chunk of the fast kernels: the decays of a sub-chunk and a state block
/// (`TS · SB` vectors, 8 KiB on AVX2) are computed in one pass and stay in L1.
const TS: usize = 32;

/// The decays `exp(dt_t · A_j)` of one state block for `dt.len()` steps, into `out[t * SB + j]`
/// (`CLAMP`: see [`decay_fast`]).
///
/// A pass of its own: every exp is independent of the others, so the core overlaps them (inside
/// the recurrence, each exp's long dependency chain would stall the scheduler).
#[inline(always)]
unsafe fn block_decays<V: Vf32, const CLAMP: bool>(a: &[V; SB], dt: &[V], out: &mut [V; TS * SB]) {
    unsafe {
        for (t, &d) in dt.iter().enumerate() {
            for (j, &aj) in a.iter().enumerate() {
                *out.get_unchecked_mut(t * SB + j) = decay_fast::<V, CLAMP>(d, aj);
            }
        }
    }
}

/// Advances one block of [`SB`] states by one step, `h_j = decay_j·h_j + (dt·u)·B_j`, and returns
/// `Σ_j h_j·C_j` (two interleaved partial sums, then their sum). `da` holds the step's
/// decays; `b` and `c` point at the block's `SB` values of B and C for this step.
#[inline(always)]
unsafe fn step_block<V: Vf32>(h: &mut [V; SB], da: &[V], dtu: V, b: *const f32, c: *const f32) -> V {
    unsafe {
        let (mut y0, mut y1) = (V::splat(0.0), V::splat(0.0));
        // Written out (not a loop) so that the states are registers, not an indexed array.
        macro_rules! state {
            ($i:literal, $y:ident) => {{
                let hn = da.get_unchecked($i).fma(h[$i], dtu.mul(V::splat(*b.add($i))));
                h[$i] = hn;
                $y = hn.fma(V::splat(*c.add($i)), $y);
            }};
        }
        state!(0, y0);
        state!(1, y1);
        state!(2, y0);
        state!(3, y1);
        state!(4, y0);
        state!(5, y1);
        state!(6, y0);
        state!(7, y1);
        y0.add(y1)
    }
}

/// The forward of `nb` whole vectors of channels from `c0` (f32, finite `A`, any `n`).
///
/// Time is walked in chunks (whose starting states are saved for the backward) and, inside a
/// chunk, in sub-chunks of [`TS`] steps. Per sub-chunk:
/// 1. a pre-pass over the steps' rows computes `dt = softplus(delta + bias)` and `dt·u` for
///    every vector (reading each row of `delta` and `u` once, contiguously);
/// 2. per vector and block of [`SB`] states (the last block padded with states whose A, B and C
///    are 0, which stay 0 and add 0): the decays of the sub-chunk in one pass
///    ([`block_decays`]), then the recurrence with the block's states in registers, its
///    `Σ h·C` added into the step's `y`;
/// 3. a post-pass over the rows adds the D skip, applies the silu(z) gate and writes the output.
///
/// Channel-last inputs and outputs are read and written in place; other layouts go through a
/// per-chunk tile. Returns whether every delta was finite.
#[inline(always)]
unsafe fn forward_fast<V: Vf32>(cx: &Ctx<f32>, tk: &Task, c0: usize, nb: usize) -> bool {
    unsafe {
        let ScanDims { dim: d, len: l, state: n, .. } = cx.dims;
        let nch = l.div_ceil(CHUNK);
        let (bi, lanes) = (tk.bi, V::LANES);
        let nblk = n.div_ceil(SB);
        let np = nblk * SB;
        let zero = V::splat(0.0);
        let chan = |blk: usize| c0 + blk * lanes;
        // Per (vector, state block): A·log2e, its largest magnitude, and the state.
        let mut a2: Vec<[V; SB]> = Vec::with_capacity(nb * nblk);
        let mut amax: Vec<f32> = Vec::with_capacity(nb * nblk);
        let mut h: Vec<[V; SB]> = Vec::with_capacity(nb * nblk);
        let mut dvec = Vec::with_capacity(nb);
        let mut bvec = Vec::with_capacity(nb);
        for blk in 0..nb {
            let c = chan(blk);
            for sb in 0..nblk {
                let (mut av, mut hv) = ([zero; SB], [zero; SB]);
                for j in 0..SB.min(n - sb * SB) {
                    let i = sb * SB + j;
                    av[j] = W::<V>::gather(cx.a_prep.as_ptr().add(c * n + i), n).0;
                    if let Some(h0) = &cx.h0 {
                        hv[j] = W::<V>::gather(h0.at(bi, c, i, 0), h0.st[1]).0;
                    }
                }
                amax.push(av.iter().map(|v| v.abs().hmax()).fold(0.0, f32::max));
                a2.push(av);
                h.push(hv);
            }
            dvec.push(cx.dskip.as_ref().map_or(zero, |v| V::load(v.as_ptr().add(c))));
            bvec.push(cx.bias.as_ref().map_or(zero, |v| V::load(v.as_ptr().add(c))));
        }
        let mut fin = zero;
        let w = nb * lanes;
        let tile = |a: &Arr<f32>| vec![0f32; if in_place(a) { 0 } else { CHUNK * w }];
        let (mut tu, mut tdl) = (tile(&cx.u), tile(&cx.delta));
        let mut tz = cx.z.as_ref().map_or(Vec::new(), tile);
        let mut to = vec![0f32; if cx.channel_last { 0 } else { CHUNK * w }];
        // Per vector and step of a sub-chunk: dt, dt·u, y.
        let mut dts = vec![zero; nb * TS];
        let mut dtus = vec![zero; nb * TS];
        let mut ys = vec![zero; nb * TS];
        let mut das = [zero; TS * SB];
        // The inputs read in place (channel-last), at channel c0 and row 0.
        let mut inplace = Vec::with_capacity(4);
        for a in [Some(&cx.u), Some(&cx.delta), cx.z.as_ref()].into_iter().flatten() {
            if in_place(a) {
                inplace.push((a.at(bi, c0, 0, 0), a.st[2]));
            }
        }
        // (The output rows are not prefetched: that measured slower, the prefetches of the
        // inputs then wait for free miss buffers.)
        for k in 0..nch {
            let (t0, t1) = (k * CHUNK, ((k + 1) * CHUNK).min(l));
            let tn = t1 - t0;
            // B and C of the chunk, `(T, np)`.
            let bc0 = ((bi * cx.dims.groups + tk.grp) * l + t0) * np;
            let (bt, ct) = (cx.bt.as_ptr().add(bc0), cx.ct.as_ptr().add(bc0));
            for (a, t) in [(&cx.u, &mut tu), (&cx.delta, &mut tdl)] {
                if !in_place(a) {
                    stage(a, bi, c0, w, t0, tn, t);
                }
            }
            if let Some(z) = cx.z.as_ref().filter(|z| !in_place(z)) {
                stage(z, bi, c0, w, t0, tn, &mut tz);
            }
            for (q, hb) in h.iter().enumerate() {
                let (blk, sb) = (q / nblk, q % nblk);
                for (j, hj) in hb.iter().enumerate().take(SB.min(n - sb * SB)) {
                    hj.store(cx.chunks.0.add(((bi * nch + k) * n + sb * SB + j) * d + chan(blk)));
                }
            }
            let su = stream(&cx.u, bi, c0, t0, &tu, 0, w);
            let sdl = stream(&cx.delta, bi, c0, t0, &tdl, 0, w);
            let sz = cx.z.as_ref().map(|z| stream(z, bi, c0, t0, &tz, 0, w));
            let (op, ostep) = if cx.channel_last {
                (cx.out.0.add((bi * l + t0) * d + c0), d)
            } else {
                (to.as_mut_ptr(), w)
            };
            for s0 in (0..tn).step_by(TS) {
                let sn = (tn - s0).min(TS);
                // Pre-pass: dt and dt·u, row by row.
                for ts in 0..sn {
                    let (dr, ur) = (sdl.row(s0 + ts), su.row(s0 + ts));
                    for blk in 0..nb {
                        let raw = V::load(dr.add(blk * lanes)).add(bvec[blk]);
                        fin = fin.add(raw.sub(raw));
                        let dt = if cx.softplus { W(raw).softplus().0 } else { raw };
                        let at = blk * TS + ts;
                        *dts.get_unchecked_mut(at) = dt;
                        *dtus.get_unchecked_mut(at) = dt.mul(V::load(ur.add(blk * lanes)));
                        *ys.get_unchecked_mut(at) = zero;
                    }
                }
                // The recurrence, per vector and block of states, prefetching the next rows.
                let next = t0 + s0 + sn;
                let mut ahead = Ahead::new(&inplace, next, (l - next).min(TS), w, nb * nblk * sn);
                for blk in 0..nb {
                    // NaN-propagating: a NaN dt sends the sub-chunk down the clamped path.
                    let dtmax = dts[blk * TS..blk * TS + sn].iter().fold(zero, |m, v| m.max(v.abs())).hmax();
                    let (dtb, dtub) = (&dts[blk * TS..blk * TS + sn], &dtus[blk * TS..]);
                    let yb = &mut ys[blk * TS..];
                    for sb in 0..nblk {
                        let q = blk * nblk + sb;
                        // |dt·A·log2e| <= 126 for the whole sub-chunk: no clamp needed.
                        if dtmax * amax[q] <= 126.0 {
                            block_decays::<V, false>(&a2[q], dtb, &mut das);
                        } else {
                            block_decays::<V, true>(&a2[q], dtb, &mut das);
                        }
                        let mut hv = h[q];
                        let (bp, cp) = (bt.add((s0 * np) + sb * SB), ct.add((s0 * np) + sb * SB));
                        for ts in 0..sn {
                            if cx.reset.is_some() && is_reset(cx, bi, t0 + s0 + ts) {
                                hv = [zero; SB];
                            }
                            ahead.step();
                            let da = das.get_unchecked(ts * SB..);
                            let dtu = *dtub.get_unchecked(ts);
                            let y = step_block(&mut hv, da, dtu, bp.add(ts * np), cp.add(ts * np));
                            let ya = yb.get_unchecked_mut(ts);
                            *ya = ya.add(y);
                        }
                        h[q] = hv;
                    }
                }
                // Post-pass: D skip, the silu(z) gate, the output, row by row.
                for ts in 0..sn {
                    let ur = su.row(s0 + ts);
                    let zr = sz.map(|s| s.row(s0 + ts));
                    let orow = op.add((s0 + ts) * ostep);
                    for blk in 0..nb {
                        let mut y = *ys.get_unchecked(blk * TS + ts);
                        if cx.dskip.is_some() {
                            y = V::load(ur.add(blk * lanes)).fma(dvec[blk], y);
                        }
                        if let Some(zr) = zr {
                            y = y.mul(silu_fast(V::load(zr.add(blk * lanes))));
                        }
                        y.store(orow.add(blk * lanes));
                    }
                }
            }
            if !cx.channel_last {
                unstage(cx, cx.out, bi, c0, w, t0, tn, &to);
            }
        }
        for (q, hb) in h.iter().enumerate() {
            let (blk, sb) = (q / nblk, q % nblk);
            for (j, &hj) in hb.iter().enumerate().take(SB.min(n - sb * SB)) {
                W(hj).scatter(cx.state.0.add((bi * d + chan(blk)) * n + sb * SB + j), n);
            }
        }
        let f = W(fin).to_array();
        f[..lanes].iter().all(|v| *v == 0.0)
    }
}

/// [`forward_fast`] for finite `A`, else [`forward_task`].
#[inline(always)]
unsafe fn forward_vectors<V: Vf32>(cx: &Ctx<f32>, tk: &Task, c0: usize, nb: usize) -> bool {
    unsafe {
        if cx.a_finite {
            forward_fast::<V>(cx, tk, c0, nb)
        } else {
            forward_task::<W<V>>(cx, tk, c0, nb)
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

/// The sums of the lanes of each of `v`'s [`SB`] vectors (each in lane order, pairwise: the same
/// whatever the thread count). On AVX2 an add tree over the eight vectors at once.
#[inline(always)]
unsafe fn lane_sums<V: Vf32>(v: &[V]) -> [f32; SB] {
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if V::LANES == 8 && std::mem::size_of::<V>() == 32 {
            use std::arch::x86_64::*;
            // SAFETY: as in `clamp_v`; `v` holds SB = 8 vectors.
            let x: [__m256; 8] = std::array::from_fn(|i| std::mem::transmute_copy(&v[i]));
            let (t0, t1) = (_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
            let (t2, t3) = (_mm256_hadd_ps(x[4], x[5]), _mm256_hadd_ps(x[6], x[7]));
            let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
            let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
            let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
            let mut out = [0f32; SB];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi));
            return out;
        }
        std::array::from_fn(|i| W(v[i]).lane_sum())
    }
}

/// Where [`reverse_quad`] reads and writes a block's four states: `hs` is `(T + 1, SB)` (the
/// chunk's starting states, then the states after each step), `das` `(T, SB)` (the decays),
/// `b`, `c` (read) and `db`, `dc` (accumulated) are `(T, np)`; every pointer is at the quad's
/// first state.
struct Quad<V> {
    hs: *const V,
    das: *const V,
    b: *const f32,
    c: *const f32,
    db: *mut V,
    dc: *mut V,
    np: usize,
}

/// Per chunk step: the inputs `dy`, `dt`, `dt·u`, and the sums over states `Σ q·A` (towards
/// `d dt`), `Σ dL/dh·B` (towards `du` and `d dt`) and `Σ h·C` (the pre-gate output, for `dz`).
struct PerStep<'a, V> {
    dy: &'a [V; CHUNK],
    dt: &'a [V; CHUNK],
    dtu: &'a [V; CHUNK],
    ddt: &'a mut [V; CHUNK],
    sb: &'a mut [V; CHUNK],
    y: &'a mut [V; CHUNK],
}

/// The reverse walk over a chunk's `tn` steps for four states of one vector of channels: with
/// `g = dy·C + dL/dh`, accumulates `dC += dy·h`, `dB += g·dt·u` (`FIRST`: starts them),
/// `dA += g·h_prev·decay·dt`, the per-step sums of [`PerStep`] (`Y`: also `Σ h·C`), and carries
/// `dL/dh ← g·decay` back.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn reverse_quad<V: Vf32, const Y: bool, const FIRST: bool>(
    r: &Quad<V>,
    tn: usize,
    st: PerStep<'_, V>,
    a: &[V; 4],
    dh: &mut [V; 4],
    da: &mut [V; 4],
    ahead: &mut Ahead,
) {
    unsafe {
        let zero = V::splat(0.0);
        for tl in (0..tn).rev() {
            if tl % 4 == 0 {
                ahead.step();
            }
            let (dy, dt, dtu) = (st.dy[tl], st.dt[tl], st.dtu[tl]);
            let (hp, hc) = (r.hs.add(tl * SB), r.hs.add((tl + 1) * SB));
            let dc = r.das.add(tl * SB);
            let (bp, cp) = (r.b.add(tl * r.np), r.c.add(tl * r.np));
            let (dbr, dcr) = (r.db.add(tl * r.np), r.dc.add(tl * r.np));
            let (mut ddt, mut sbv, mut y) = (zero, zero, zero);
            macro_rules! state {
                ($j:literal) => {{
                    let cj = V::splat(*cp.add($j));
                    let h = *hc.add($j);
                    let dhi = dy.fma(cj, dh[$j]);
                    // The first vector of a task starts the chunk's dB, dC sums.
                    if FIRST {
                        *dcr.add($j) = dy.mul(h);
                        *dbr.add($j) = dhi.mul(dtu);
                    } else {
                        *dcr.add($j) = dy.fma(h, *dcr.add($j));
                        *dbr.add($j) = dhi.fma(dtu, *dbr.add($j));
                    }
                    let decay = *dc.add($j);
                    let qv = dhi.mul(*hp.add($j)).mul(decay);
                    ddt = qv.fma(a[$j], ddt);
                    da[$j] = qv.fma(dt, da[$j]);
                    sbv = dhi.fma(V::splat(*bp.add($j)), sbv);
                    dh[$j] = dhi.mul(decay);
                    if Y {
                        y = h.fma(cj, y);
                    }
                }};
            }
            state!(0);
            state!(1);
            state!(2);
            state!(3);
            st.ddt[tl] = st.ddt[tl].add(ddt);
            st.sb[tl] = st.sb[tl].add(sbv);
            if Y {
                st.y[tl] = st.y[tl].add(y);
            }
        }
    }
}

/// The backward of `nb` whole vectors of channels from `c0` (f32, finite `A`, any `n`); returns
/// the task's dB and dC partial sums, `(l, n)` each.
///
/// Chunks are walked in reverse. Per chunk and vector: a pre-pass computes `dt`, `dt·u`, the
/// gated output gradient `dy` per step; then per block of [`SB`] states the chunk forward is
/// recomputed from the saved chunk state (the decays in one pass, [`block_decays`], then the
/// states of every step, kept in L2), and walked backward with the block's `dL/dh` in registers,
/// accumulating dA per lane, dB and dC per step and state (in lanes, summed over the lanes at
/// the end of the chunk), and per step the sums over states that `d dt` and `du` need; a
/// post-pass finishes `du`, `d delta` (through the softplus), `dz`, dD and d delta_bias.
/// Every sum runs in an order fixed by the shapes: the result is bit-identical whatever the
/// thread count.
#[inline(always)]
unsafe fn backward_fast<V: Vf32>(
    cx: &Ctx<f32>,
    bx: &BwdCtx<f32>,
    tk: &Task,
    c0: usize,
    nb: usize,
) -> (Vec<f32>, Vec<f32>) {
    unsafe {
        let ScanDims { dim: d, len: l, state: n, .. } = cx.dims;
        let nch = l.div_ceil(CHUNK);
        let (bi, lanes) = (tk.bi, V::LANES);
        let nblk = n.div_ceil(SB);
        let np = nblk * SB;
        let zero = V::splat(0.0);
        let one = V::splat(1.0);
        let chan = |blk: usize| c0 + blk * lanes;
        // Per (vector, state block): A·log2e, A, max |A·log2e|, dL/dh, dA.
        let mut a2: Vec<[V; SB]> = Vec::with_capacity(nb * nblk);
        let mut an: Vec<[V; SB]> = Vec::with_capacity(nb * nblk);
        let mut amax: Vec<f32> = Vec::with_capacity(nb * nblk);
        let mut dh: Vec<[V; SB]> = Vec::with_capacity(nb * nblk);
        let mut da_acc: Vec<[V; SB]> = vec![[zero; SB]; nb * nblk];
        let mut dvec = Vec::with_capacity(nb);
        let mut bvec = Vec::with_capacity(nb);
        for blk in 0..nb {
            let c = chan(blk);
            for sb in 0..nblk {
                let (mut av, mut anv, mut dhv) = ([zero; SB], [zero; SB], [zero; SB]);
                for j in 0..SB.min(n - sb * SB) {
                    let i = sb * SB + j;
                    av[j] = W::<V>::gather(cx.a_prep.as_ptr().add(c * n + i), n).0;
                    anv[j] = W::<V>::gather(cx.a.as_ptr().add(c * n + i), n).0;
                    if let Some(g) = &bx.grad_last {
                        dhv[j] = W::<V>::gather(g.at(bi, c, i, 0), g.st[1]).0;
                    }
                }
                amax.push(av.iter().map(|v| v.abs().hmax()).fold(0.0, f32::max));
                a2.push(av);
                an.push(anv);
                dh.push(dhv);
            }
            dvec.push(cx.dskip.as_ref().map_or(zero, |v| V::load(v.as_ptr().add(c))));
            bvec.push(cx.bias.as_ref().map_or(zero, |v| V::load(v.as_ptr().add(c))));
        }
        let mut dd_acc = vec![zero; nb];
        let mut dbias_acc = vec![zero; nb];
        let mut part_b = vec![0f32; l * n];
        let mut part_c = vec![0f32; l * n];
        // Per chunk: dB, dC in lanes, `(T, np)`.
        let mut dbt = vec![zero; CHUNK * np];
        let mut dct = vec![zero; CHUNK * np];
        // Per vector and chunk step.
        let (mut raws, mut dts, mut dtus, mut dys) =
            ([zero; CHUNK], [zero; CHUNK], [zero; CHUNK], [zero; CHUNK]);
        let (mut ddts, mut sbs, mut ys) = ([zero; CHUNK], [zero; CHUNK], [zero; CHUNK]);
        // Per (vector, state block) and chunk step: the decays and the states after the step.
        let mut das = [zero; CHUNK * SB];
        let mut hs = [zero; (CHUNK + 1) * SB];
        let w = nb * lanes;
        let tile = |a: &Arr<f32>| vec![0f32; if in_place(a) { 0 } else { CHUNK * w }];
        let (mut tu, mut tdl, mut tg) = (tile(&cx.u), tile(&cx.delta), tile(&bx.grad_out));
        let mut tz = cx.z.as_ref().map_or(Vec::new(), tile);
        let ot = if cx.channel_last { 0 } else { CHUNK * w };
        let (mut tdu, mut tdd) = (vec![0f32; ot], vec![0f32; ot]);
        let mut tdz = vec![0f32; if cx.z.is_some() { ot } else { 0 }];
        // The inputs read in place (channel-last), at channel c0 and row 0.
        let mut inplace = Vec::with_capacity(4);
        for a in [Some(&cx.u), Some(&cx.delta), Some(&bx.grad_out), cx.z.as_ref()].into_iter().flatten() {
            if in_place(a) {
                inplace.push((a.at(bi, c0, 0, 0), a.st[2]));
            }
        }
        for k in (0..nch).rev() {
            let (t0, t1) = (k * CHUNK, ((k + 1) * CHUNK).min(l));
            let tn = t1 - t0;
            let bc0 = ((bi * cx.dims.groups + tk.grp) * l + t0) * np;
            let (bt, ct) = (cx.bt.as_ptr().add(bc0), cx.ct.as_ptr().add(bc0));
            for (a, t) in [(&cx.u, &mut tu), (&cx.delta, &mut tdl), (&bx.grad_out, &mut tg)] {
                if !in_place(a) {
                    stage(a, bi, c0, w, t0, tn, t);
                }
            }
            if let Some(z) = cx.z.as_ref().filter(|z| !in_place(z)) {
                stage(z, bi, c0, w, t0, tn, &mut tz);
            }
            let su = stream(&cx.u, bi, c0, t0, &tu, 0, w);
            let sdl = stream(&cx.delta, bi, c0, t0, &tdl, 0, w);
            let sg = stream(&bx.grad_out, bi, c0, t0, &tg, 0, w);
            let sz = cx.z.as_ref().map(|z| stream(z, bi, c0, t0, &tz, 0, w));
            // Where du, d delta, dz of the chunk go: in place (channel-last) or tiles.
            let outs = |o: OutPtr<f32>, tile: &mut Vec<f32>| -> (*mut f32, usize) {
                if cx.channel_last {
                    (o.0.add((bi * l + t0) * d + c0), d)
                } else {
                    (tile.as_mut_ptr(), w)
                }
            };
            let (pdu, ostep) = outs(cx.out, &mut tdu);
            let (pdd, _) = outs(bx.ddelta, &mut tdd);
            let (pdz, _) = outs(bx.dz, &mut tdz);
            // Prefetch the previous chunk's input rows over this chunk's backward passes.
            let mut ahead =
                Ahead::new(&inplace, t0.saturating_sub(CHUNK), t0.min(CHUNK), w, nb * nblk * tn / 4);
            for blk in 0..nb {
                let (c, off) = (chan(blk), blk * lanes);
                // Pre-pass: dt, dt·u, dy (the gradient before the silu(z) gate).
                let bias = bvec[blk];
                for tl in 0..tn {
                    let raw = V::load(sdl.row(tl).add(off)).add(bias);
                    let dt = if cx.softplus { W(raw).softplus().0 } else { raw };
                    raws[tl] = raw;
                    dts[tl] = dt;
                    dtus[tl] = dt.mul(V::load(su.row(tl).add(off)));
                    let g = V::load(sg.row(tl).add(off));
                    dys[tl] = match sz {
                        Some(sz) => g.mul(silu_fast(V::load(sz.row(tl).add(off)))),
                        None => g,
                    };
                    (ddts[tl], sbs[tl], ys[tl]) = (zero, zero, zero);
                }
                // NaN-propagating: a NaN dt sends the chunk down the clamped path.
                let dtmax = dts[..tn].iter().fold(zero, |m, v| m.max(v.abs())).hmax();
                for sb in 0..nblk {
                    let q = blk * nblk + sb;
                    let nj = SB.min(n - sb * SB);
                    // Recompute the chunk forward from its saved state.
                    let mut hstart = [zero; SB];
                    for (j, hj) in hstart.iter_mut().enumerate().take(nj) {
                        *hj = W::<V>::gather(bx.saved.at(bi, k, sb * SB + j, c), bx.saved.st[3]).0;
                    }
                    hs[..SB].copy_from_slice(&hstart);
                    for s0 in (0..tn).step_by(TS) {
                        let dtb = &dts[s0..(s0 + TS).min(tn)];
                        let out = &mut *(das.as_mut_ptr().add(s0 * SB) as *mut [V; TS * SB]);
                        if dtmax * amax[q] <= 126.0 {
                            block_decays::<V, false>(&a2[q], dtb, out);
                        } else {
                            block_decays::<V, true>(&a2[q], dtb, out);
                        }
                    }
                    let mut hv = hstart;
                    for tl in 0..tn {
                        if cx.reset.is_some() && is_reset(cx, bi, t0 + tl) {
                            das[tl * SB..(tl + 1) * SB].iter_mut().for_each(|v| *v = zero);
                        }
                        let (da, bp) = (&das[tl * SB..], bt.add(tl * np + sb * SB));
                        let dtu = dtus[tl];
                        for j in 0..SB {
                            hv[j] = da.get_unchecked(j).fma(hv[j], dtu.mul(V::splat(*bp.add(j))));
                        }
                        hs[(tl + 1) * SB..(tl + 2) * SB].copy_from_slice(&hv);
                    }
                    // The chunk backward, four states at a time (their dL/dh and dA stay in
                    // registers).
                    let mut dhv = dh[q];
                    let mut dav = da_acc[q];
                    for j0 in (0..SB).step_by(4) {
                        let rq = Quad {
                            hs: hs.as_ptr().add(j0),
                            das: das.as_ptr().add(j0),
                            b: bt.add(sb * SB + j0),
                            c: ct.add(sb * SB + j0),
                            db: dbt.as_mut_ptr().add(sb * SB + j0),
                            dc: dct.as_mut_ptr().add(sb * SB + j0),
                            np,
                        };
                        let a4 = [an[q][j0], an[q][j0 + 1], an[q][j0 + 2], an[q][j0 + 3]];
                        let mut dh4 = [dhv[j0], dhv[j0 + 1], dhv[j0 + 2], dhv[j0 + 3]];
                        let mut da4 = [dav[j0], dav[j0 + 1], dav[j0 + 2], dav[j0 + 3]];
                        let steps = PerStep {
                            dy: &dys,
                            dt: &dts,
                            dtu: &dtus,
                            ddt: &mut ddts,
                            sb: &mut sbs,
                            y: &mut ys,
                        };
                        let (h4, d4, pf) = (&mut dh4, &mut da4, &mut ahead);
                        match (cx.z.is_some(), blk == 0) {
                            (true, true) => reverse_quad::<V, true, true>(&rq, tn, steps, &a4, h4, d4, pf),
                            (true, false) => reverse_quad::<V, true, false>(&rq, tn, steps, &a4, h4, d4, pf),
                            (false, true) => reverse_quad::<V, false, true>(&rq, tn, steps, &a4, h4, d4, pf),
                            (false, false) => {
                                reverse_quad::<V, false, false>(&rq, tn, steps, &a4, h4, d4, pf)
                            }
                        }
                        dhv[j0..j0 + 4].copy_from_slice(&dh4);
                        dav[j0..j0 + 4].copy_from_slice(&da4);
                    }
                    dh[q] = dhv;
                    da_acc[q] = dav;
                }
                // Post-pass: du, d delta, dz, dD, d delta_bias (steps in reverse, as the
                // per-channel sums always ran).
                let dv = dvec[blk];
                for tl in (0..tn).rev() {
                    let uu = V::load(su.row(tl).add(off));
                    let (dy, dt) = (dys[tl], dts[tl]);
                    let mut du = zero;
                    if cx.dskip.is_some() {
                        dd_acc[blk] = dy.fma(uu, dd_acc[blk]);
                        du = dy.mul(dv);
                    }
                    let ddt = sbs[tl].fma(uu, ddts[tl]);
                    du = sbs[tl].fma(dt, du);
                    let draw = if cx.softplus { ddt.mul(W(raws[tl]).softplus_grad().0) } else { ddt };
                    dbias_acc[blk] = dbias_acc[blk].add(draw);
                    let o = tl * ostep + off;
                    du.store(pdu.add(o));
                    draw.store(pdd.add(o));
                    if let Some(sz) = sz {
                        let zz = V::load(sz.row(tl).add(off));
                        let g = V::load(sg.row(tl).add(off));
                        let s = W(zz).sigmoid().0;
                        // d silu(z) = s (1 + z (1 - s)); the pre-gate output is Σ h·C + D·u.
                        let dsilu = s.mul(zz.fma(one.sub(s), one));
                        let ypre = if cx.dskip.is_some() { uu.fma(dv, ys[tl]) } else { ys[tl] };
                        g.mul(ypre).mul(dsilu).store(pdz.add(o));
                    }
                }
            }
            if !cx.channel_last {
                unstage(cx, cx.out, bi, c0, w, t0, tn, &tdu);
                unstage(cx, bx.ddelta, bi, c0, w, t0, tn, &tdd);
                if cx.z.is_some() {
                    unstage(cx, bx.dz, bi, c0, w, t0, tn, &tdz);
                }
            }
            for tl in 0..tn {
                for i0 in (0..n).step_by(SB) {
                    let m = SB.min(n - i0);
                    let (o, at) = ((t0 + tl) * n + i0, tl * np + i0);
                    part_b[o..o + m].copy_from_slice(&lane_sums(&dbt[at..at + SB])[..m]);
                    part_c[o..o + m].copy_from_slice(&lane_sums(&dct[at..at + SB])[..m]);
                }
            }
        }
        for blk in 0..nb {
            let c = chan(blk);
            for sb in 0..nblk {
                let q = blk * nblk + sb;
                for j in 0..SB.min(n - sb * SB) {
                    let i = sb * SB + j;
                    W(dh[q][j]).scatter(cx.state.0.add((bi * d + c) * n + i), n);
                    W(da_acc[q][j]).scatter(bx.da.0.add((bi * d + c) * n + i), n);
                }
            }
            dd_acc[blk].store(bx.dd.0.add(bi * d + c));
            dbias_acc[blk].store(bx.dbias.0.add(bi * d + c));
        }
        (part_b, part_c)
    }
}

/// [`backward_fast`] for finite `A`, else [`backward_task`].
#[inline(always)]
unsafe fn backward_vectors<V: Vf32>(
    cx: &Ctx<f32>,
    bx: &BwdCtx<f32>,
    tk: &Task,
    c0: usize,
    nb: usize,
) -> (Vec<f32>, Vec<f32>) {
    unsafe {
        if cx.a_finite {
            backward_fast::<V>(cx, bx, tk, c0, nb)
        } else {
            backward_task::<W<V>>(cx, bx, tk, c0, nb)
        }
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
                return backward_vectors::<V>(self.cx, self.bx, tk, tk.c0, full);
            }
            let (mut pb, mut pc) = backward_vectors::<f32>(self.cx, self.bx, tk, rest, tk.c1 - rest);
            if full > 0 {
                let (vb, vc) = backward_vectors::<V>(self.cx, self.bx, tk, tk.c0, full);
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
    let (bm, cm) = (arr::<S>(args.b, keep)?, arr::<S>(args.c, keep)?);
    Ok(Ctx {
        dims,
        u: arr(args.u, keep)?,
        delta: arr(args.delta, keep)?,
        z: args.z.map(|t| arr(t, keep)).transpose()?,
        // SAFETY: `bm`/`cm` view tensors kept alive in `keep` with the checked shapes.
        bt: unsafe { step_major(&bm, &dims) },
        ct: unsafe { step_major(&cm, &dims) },
        bm,
        cm,
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

/// `n` zeros in a fresh buffer advised for 2 MiB pages (see [`super::par::advise_huge_pages`]):
/// the scan's multi-MB outputs would otherwise take a page fault per 4 KiB when first written.
fn zeros_huge<S: Zero + Clone>(n: usize) -> Vec<S> {
    let mut v = vec![S::zero(); n];
    // SAFETY: `MaybeUninit<S>` has the layout of `S`; the slice covers exactly `v`'s `n`
    // initialised elements, and the advice writes nothing.
    let s = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut std::mem::MaybeUninit<S>, n) };
    super::par::advise_huge_pages(s);
    v
}

/// A `(b, g, n, l)` view copied to `(b, g, l, np)` (see [`Ctx::bt`]).
///
/// # Safety
/// `x` must view a live tensor of the shape `dims` describes.
unsafe fn step_major<S: ScanFloat>(x: &Arr<S>, dims: &ScanDims) -> Vec<S> {
    let ScanDims { batch: b, groups: g, len: l, state: n, .. } = *dims;
    let np = n.div_ceil(SB) * SB;
    let mut v = vec![S::zero(); b * g * l * np];
    for bg in 0..b * g {
        let (bi, gi) = (bg / g, bg % g);
        for i in 0..n {
            // SAFETY: every index is inside the view's shape.
            let p = unsafe { x.at(bi, gi, i, 0) };
            for t in 0..l {
                v[(bg * l + t) * np + i] = unsafe { *p.add(t * x.st[3]) };
            }
        }
    }
    v
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
    let mut out = zeros_huge::<S>(b * d * l);
    let mut last = vec![S::zero(); b * d * n];
    let mut chunks = zeros_huge::<S>(b * nch * n * d);
    let mut keep = Vec::new();
    let cx = context::<S>(args, dims, &mut keep, out.as_mut_ptr(), last.as_mut_ptr(), chunks.as_mut_ptr())?;
    let tasks = tasks(&dims, S::lanes(), TASK_CHANNELS);
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
    let mut du = zeros_huge::<S>(b * d * l);
    let mut ddelta = zeros_huge::<S>(b * d * l);
    let mut dz = zeros_huge::<S>(if args.z.is_some() { b * d * l } else { 0 });
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
    let tasks = tasks(&dims, S::lanes(), TASK_CHANNELS);
    let parts = run_tasks(&tasks, b * d * l * n.max(1) * 8, |tk| S::backward_task(&cx, &bx, tk));
    let cl = cx.channel_last;
    drop(cx);
    // dB, dC: the `(l, n)` partial sums of the tasks of each (batch, group), added in task order,
    // then transposed to `(n, l)`.
    let mut db = vec![S::zero(); b * g * n * l];
    let mut dc = vec![S::zero(); b * g * n * l];
    let (mut sb, mut sc) = (vec![S::zero(); l * n], vec![S::zero(); l * n]);
    for bg in 0..b * g {
        sb.iter_mut().chain(sc.iter_mut()).for_each(|v| *v = S::zero());
        for (tk, (pb, pc)) in tasks.iter().zip(&parts) {
            if tk.bi * g + tk.grp == bg {
                sb.iter_mut().zip(pb).for_each(|(o, &v)| *o = *o + v);
                sc.iter_mut().zip(pc).for_each(|(o, &v)| *o = *o + v);
            }
        }
        let base = bg * n * l;
        for t in 0..l {
            for i in 0..n {
                db[base + i * l + t] = sb[t * n + i];
                dc[base + i * l + t] = sc[t * n + i];
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
