//! CPU RoPE and memory-efficient (tiled online-softmax) causal attention.
//!
//! # RoPE
//! A `(l, dim/2)` table of `cos`/`sin` (computed in f64, then rounded to the element type) and one
//! pass over the rows `(b, h, t)` in parallel; the inverse rotation (backward) negates `sin`.
//!
//! # Attention forward (FlashAttention-2 on the CPU)
//! One task per (batch, stack of q heads, tile of [`BR`] queries), run with rayon. A stack is the
//! q heads that share one kv head (GQA), up to two of them (`STACK_ROWS` = 128 rows): their
//! queries (times `scale`) are packed once as one `(hs · BR) × dk` block, so every K/V tile a
//! task loads serves all its heads (twice the rows per K/V byte at 2 q heads per kv head). The
//! task then walks the key tiles of [`BC`] keys that its rows can see (tiles fully hidden by the
//! causal mask or the window are skipped, not computed; only diagonal / window-edge tiles are
//! masked):
//! ```text
//! Kᵀ is packed once per kv head in (dk × BC) tiles, zero-padded; V is read in place
//! S = Q Kᵀ                       (rows × BC, the register-blocked micro-kernel below)
//! mask S on diagonal / window-edge tiles (-inf)
//! m' = max(m, rowmax S); P = e^(S - m'); l = l e^(m - m') + rowsum P; O = O e^(m - m') + P V
//! ```
//! and writes `O / l` and `lse = m + ln l`. The only buffers are per task (a few tiles, ~150 KB):
//! memory beyond the output and the packed Kᵀ is `O(threads · tile)`, never `O(lq · lk)`. The q
//! heads that share a kv head read the same K/V storage (no copies per head). Inputs whose
//! feature dim has unit stride (e.g. a transposed `(b, l, h, d)` view) are read in place; others
//! are copied once. Tasks run their query tiles longest first (the causal rows near the end see
//! the most keys), so the short ones even out the threads' finishing times.
//!
//! `P = e^(S - m')` uses `exp_softmax`: the shared vector exp's reduction and polynomial
//! with one `2^k` factor and a single clamp (arguments are `<= 0`; `-inf` gives exactly 0), about
//! 20 vector operations per vector instead of 32.
//!
//! Measured (`RAYON_NUM_THREADS=1 target/release/xtask bench attention --variant 0`, min of 5;
//! b=1, 8 q heads, 4 kv heads, d=64, causal, f32, AVX2+FMA path, Zen 3 shared with other builds;
//! before = the tiles one q head at a time, run back to back with this code): l = 512 / 1024 /
//! 2048 / 4096: 6.2 / 21.0 / 81.5 / 372 ms → 4.9 / 18.4 / 69.8 / 279 ms (1.27 / 1.14 / 1.17 /
//! 1.33x; 62% of one core's FMA peak at l=2048). Forward+backward at l = 1024 / 2048
//! (`examples/attn_bench --bwd`, min of 3, three alternating runs): 63 / 239 → 60 / 225 ms.
//! The two gemms run at ~85% of the FMA peak; the exponentials take ~14% of the forward. See
//! `benches/RESULTS.md` for the 2-thread figures against PyTorch's SDPA.
//!
//! # Attention backward
//! `Δ = rowsum(dO ∘ O)` first. Then one task per (batch, kv head, chunk of key tiles): for each
//! key tile it recomputes, for every q head of the group (in order) and every query tile that
//! sees the tile, `P = e^(S - lse)`, then `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - Δ)`,
//! `dK += dSᵀ Q`, `dQ += dS K`. dK/dV rows belong to one task; dQ goes to a per-chunk partial
//! that is summed in chunk order at the end (no atomics: deterministic for a given thread
//! count). There is one chunk per (batch, kv head) unless that leaves threads idle; then the key
//! tiles of a head are dealt round-robin to a few chunks (round-robin balances the causal
//! triangle). Memory: `O(chunks · lq · dk)` for the partials, never `O(lq · lk)`.
//!
//! # Micro-kernel and SIMD
//! Every product above is `C (+)= A · B` with `A` read through (row, column) strides (so `Pᵀ`,
//! `dSᵀ` cost nothing) and `B` a packed, padded row-major tile: a 6-row by two-vector register
//! block (12 accumulators), with a 5/4/3/2/1-row tail chosen so that no tail splits into several
//! load-bound single-row blocks (128 rows = 20 · 6 + 4 + 4), written once over [`Vf32`] and run
//! on the active SIMD path (AVX-512, AVX2+FMA, NEON or scalar; see [`super::simd`]). Row maxima
//! and `e^(S - m)` (forward and backward) use the same dispatch and `exp_softmax`. f64 runs the same tiled algorithm with plain loops (it exists for
//! gradient checks and references); bf16/f16 are computed in f32.

use moeba_tensor::{DType, Error, Result, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use super::par;
use super::simd::{self, Kernel, Vf32};
use crate::ops::{
    attention_lse_dtype, AttentionDims, AttentionOptions, AttentionOutput, RopeOptions, RopeStyle,
};

/// Queries per tile.
pub const BR: usize = 64;
/// Keys per tile.
pub const BC: usize = 64;
/// Feature and key counts inside packed tiles are padded to a multiple of this (two AVX-512
/// vectors), so the micro-kernel never handles a column tail.
const PAD: usize = 32;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

// ------------------------------------------------------------------------------ element type

/// The tile operations the attention kernels need, natively in f32 (SIMD) and f64 (plain).
pub trait FlashElem: WithDType + Float + Send + Sync {
    /// `c[i·ldc + j] (+)= Σ_p a[i·ars + p·acs] · b[p·ldb + j]` for `i < m`, `j < n`, `p < k`;
    /// `n` is a multiple of 32; `overwrite` replaces `c` instead of adding to it.
    fn gemm(g: Gemm<'_, Self>);
    /// `out[i] = max_{j < n} s[i·ld + j]` for `i < m` (`n` a multiple of 32).
    fn rows_max(s: &[Self], m: usize, n: usize, ld: usize, out: &mut [Self]);
    /// `s[i·ld + j] = e^(s[i·ld + j] - shift[i])` and `sums[i] = Σ_j` of the results, for
    /// `i < m`, `j < n` (`n` a multiple of 32).
    fn rows_exp(s: &mut [Self], m: usize, n: usize, ld: usize, shift: &[Self], sums: &mut [Self]);
}

/// The operands of one [`FlashElem::gemm`] (see there).
pub struct Gemm<'a, T> {
    /// Rows of C.
    pub m: usize,
    /// Columns of C (a multiple of 32).
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A's storage.
    pub a: &'a [T],
    /// A's row stride.
    pub ars: usize,
    /// A's column stride.
    pub acs: usize,
    /// B's storage (row-major).
    pub b: &'a [T],
    /// B's row stride.
    pub ldb: usize,
    /// C's storage (row-major).
    pub c: &'a mut [T],
    /// C's row stride.
    pub ldc: usize,
    /// Replace C rather than accumulate into it.
    pub overwrite: bool,
}

impl<T> Gemm<'_, T> {
    /// Panics unless every operand holds the elements the product touches (a caller bug).
    fn check(&self) {
        assert!(self.n.is_multiple_of(PAD), "attention gemm: n = {} is not padded", self.n);
        if self.m == 0 || self.n == 0 {
            return;
        }
        assert!(self.ldc >= self.n && self.c.len() >= (self.m - 1) * self.ldc + self.n, "gemm: C too short");
        if self.k > 0 {
            let a_end = (self.m - 1) * self.ars + (self.k - 1) * self.acs;
            assert!(a_end < self.a.len(), "gemm: A too short");
            assert!(
                self.ldb >= self.n && self.b.len() >= (self.k - 1) * self.ldb + self.n,
                "gemm: B too short"
            );
        }
    }
}

impl FlashElem for f64 {
    fn gemm(g: Gemm<'_, f64>) {
        g.check();
        for i in 0..g.m {
            let c = &mut g.c[i * g.ldc..i * g.ldc + g.n];
            if g.overwrite {
                c.fill(0.0);
            }
            for p in 0..g.k {
                let av = g.a[i * g.ars + p * g.acs];
                let b = &g.b[p * g.ldb..p * g.ldb + g.n];
                for (cv, &bv) in c.iter_mut().zip(b) {
                    *cv += av * bv;
                }
            }
        }
    }
    fn rows_max(s: &[f64], m: usize, n: usize, ld: usize, out: &mut [f64]) {
        for i in 0..m {
            out[i] = s[i * ld..i * ld + n].iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        }
    }
    fn rows_exp(s: &mut [f64], m: usize, n: usize, ld: usize, shift: &[f64], sums: &mut [f64]) {
        for i in 0..m {
            let mut sum = 0.0;
            for v in &mut s[i * ld..i * ld + n] {
                *v = (*v - shift[i]).exp();
                sum += *v;
            }
            sums[i] = sum;
        }
    }
}

impl FlashElem for f32 {
    fn gemm(g: Gemm<'_, f32>) {
        g.check();
        // SAFETY: `check` verified every access the kernel makes.
        unsafe { simd::dispatch(GemmKernel(g)) }
    }
    fn rows_max(s: &[f32], m: usize, n: usize, ld: usize, out: &mut [f32]) {
        assert!(n.is_multiple_of(PAD) && out.len() >= m && (m == 0 || s.len() >= (m - 1) * ld + n));
        // SAFETY: bounds checked above.
        unsafe { simd::dispatch(RowsMax { s, m, n, ld, out }) }
    }
    fn rows_exp(s: &mut [f32], m: usize, n: usize, ld: usize, shift: &[f32], sums: &mut [f32]) {
        assert!(
            n.is_multiple_of(PAD)
                && shift.len() >= m
                && sums.len() >= m
                && (m == 0 || s.len() >= (m - 1) * ld + n)
        );
        // SAFETY: bounds checked above.
        unsafe { simd::dispatch(RowsExp { s, m, n, ld, shift, sums }) }
    }
}

/// [`FlashElem::gemm`] for f32 over [`Vf32`].
struct GemmKernel<'a>(Gemm<'a, f32>);

/// One `R`-row by two-vector block of C: `c (+)= a · b` over `k` inner steps.
///
/// # Safety
/// The pointers must cover `R` rows of A (strides `ars`, `acs`, `k` columns), `k` rows of B
/// (stride `ldb`, `2 · LANES` columns) and `R` rows of C (stride `ldc`, `2 · LANES` columns).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<V: Vf32, const R: usize>(
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    unsafe {
        let mut acc = [[V::splat(0.0); 2]; R];
        for p in 0..k {
            let bp = b.add(p * ldb);
            let b0 = V::load(bp);
            let b1 = V::load(bp.add(V::LANES));
            let ap = a.add(p * acs);
            for r in 0..R {
                let av = V::splat(*ap.add(r * ars));
                acc[r][0] = av.fma(b0, acc[r][0]);
                acc[r][1] = av.fma(b1, acc[r][1]);
            }
        }
        for r in 0..R {
            let cp = c.add(r * ldc);
            if overwrite {
                acc[r][0].store(cp);
                acc[r][1].store(cp.add(V::LANES));
            } else {
                V::load(cp).add(acc[r][0]).store(cp);
                V::load(cp.add(V::LANES)).add(acc[r][1]).store(cp.add(V::LANES));
            }
        }
    }
}

/// All the `R`-row blocks of rows `i..i + R` of C (every two-vector column strip).
///
/// # Safety
/// As [`block`], for rows `i..i + R <= m` and every strip of `n` (a multiple of `2 · LANES`).
#[inline(always)]
unsafe fn row_strip<V: Vf32, const R: usize>(g: &Gemm<'_, f32>, i: usize, c: *mut f32) {
    let w = 2 * V::LANES;
    let (a, b) = (g.a.as_ptr(), g.b.as_ptr());
    for j in (0..g.n).step_by(w) {
        // SAFETY: rows i..i+R < m, columns j..j+w <= n, as checked by `Gemm::check`.
        unsafe {
            block::<V, R>(
                g.k,
                a.add(i * g.ars),
                g.ars,
                g.acs,
                b.add(j),
                g.ldb,
                c.add(i * g.ldc + j),
                g.ldc,
                g.overwrite,
            );
        }
    }
}

impl Kernel for GemmKernel<'_> {
    type Output = ();
    // Inlined into the `#[target_feature]` caller of `simd::dispatch` (else every vector op
    // would be an out-of-line call).
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) {
        let g = self.0;
        let c = g.c.as_mut_ptr();
        let mut i = 0;
        // Six-row blocks (12 accumulators), and a tail of 5, 4 (+4), 3, 2 or 1 rows, so that no
        // tail degenerates into several single-row (load-bound) blocks: 128 = 20·6 + 4 + 4.
        // SAFETY (all strips): rows i..i+R <= m, as `Gemm::check` verified.
        unsafe {
            while i < g.m {
                match g.m - i {
                    1 => row_strip::<V, 1>(&g, i, c),
                    2 => row_strip::<V, 2>(&g, i, c),
                    3 => row_strip::<V, 3>(&g, i, c),
                    4 | 7 | 8 => row_strip::<V, 4>(&g, i, c),
                    5 => row_strip::<V, 5>(&g, i, c),
                    _ => row_strip::<V, 6>(&g, i, c),
                }
                i += match g.m - i {
                    4 | 7 | 8 => 4,
                    r => r.min(6),
                };
            }
        }
    }
}

/// [`FlashElem::rows_max`] for f32.
struct RowsMax<'a> {
    s: &'a [f32],
    m: usize,
    n: usize,
    ld: usize,
    out: &'a mut [f32],
}

impl Kernel for RowsMax<'_> {
    type Output = ();
    // Inlined into the `#[target_feature]` caller of `simd::dispatch` (else every vector op
    // would be an out-of-line call).
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) {
        for i in 0..self.m {
            // SAFETY: the row holds n (a multiple of LANES) elements, checked by the caller.
            unsafe {
                let p = self.s.as_ptr().add(i * self.ld);
                let mut acc = V::splat(f32::NEG_INFINITY);
                for j in (0..self.n).step_by(V::LANES) {
                    acc = V::load(p.add(j)).max(acc);
                }
                self.out[i] = acc.hmax();
            }
        }
    }
}

/// `e^x` for the softmax's `x = s - shift <= 88` (in practice `<= 0`): the shared [`simd::exp`]'s
/// reduction and polynomial with a single `2^k` factor and a cheaper clamp. `x <= -88` (and
/// `-inf`, a masked score) gives exactly 0 (`k = -127` builds the zero float), results below
/// `2^-126` flush to 0, NaN stays NaN. About 20 vector operations instead of 32.
///
/// # Safety
/// As every [`Vf32`] method: only inside code running on a path that supports `V`.
#[inline(always)]
unsafe fn exp_softmax<V: Vf32>(x: V) -> V {
    unsafe {
        let x = x.max(V::splat(-88.0));
        let k = x.mul(V::splat(std::f32::consts::LOG2_E)).round();
        let r = k.fma(V::splat(-0.693_359_4), x);
        let r = k.fma(V::splat(2.121_944_4e-4), r);
        let mut p = V::splat(1.987_569_1e-4);
        p = p.fma(r, V::splat(1.398_2e-3));
        p = p.fma(r, V::splat(8.333_452e-3));
        p = p.fma(r, V::splat(4.166_579_6e-2));
        p = p.fma(r, V::splat(0.166_666_65));
        p = p.fma(r, V::splat(0.5));
        let y = p.fma(r.mul(r), r.add(V::splat(1.0)));
        y.mul(k.pow2i())
    }
}

/// [`FlashElem::rows_exp`] for f32.
struct RowsExp<'a> {
    s: &'a mut [f32],
    m: usize,
    n: usize,
    ld: usize,
    shift: &'a [f32],
    sums: &'a mut [f32],
}

impl Kernel for RowsExp<'_> {
    type Output = ();
    // Inlined into the `#[target_feature]` caller of `simd::dispatch` (else every vector op
    // would be an out-of-line call).
    #[inline(always)]
    unsafe fn run<V: Vf32>(self) {
        for i in 0..self.m {
            // SAFETY: the row holds n (a multiple of LANES) elements, checked by the caller.
            unsafe {
                let p = self.s.as_mut_ptr().add(i * self.ld);
                let sh = V::splat(self.shift[i]);
                let mut acc = V::splat(0.0);
                for j in (0..self.n).step_by(V::LANES) {
                    let e = exp_softmax(V::load(p.add(j)).sub(sh));
                    e.store(p.add(j));
                    acc = acc.add(e);
                }
                self.sums[i] = acc.hsum();
            }
        }
    }
}

// ------------------------------------------------------------------------------ inputs

/// Rows of a rank-4 tensor `(b, h, l, d)` whose last dim has unit stride, read in place.
struct Rows<'a, T> {
    data: &'a [T],
    off: usize,
    st: [usize; 3],
    d: usize,
}

impl<'a, T: WithDType> Rows<'a, T> {
    fn new(x: &'a Tensor) -> Result<Self> {
        let data = x
            .storage()
            .as_cpu()
            .and_then(|s| s.as_slice::<T>())
            .ok_or_else(|| Error::Msg(format!("attention: expected a CPU {} tensor", T::DTYPE)))?;
        let l = x.layout();
        let s = l.strides();
        Ok(Rows { data, off: l.offset(), st: [s[0], s[1], s[2]], d: x.dims()[3] })
    }

    #[inline]
    fn row(&self, b: usize, h: usize, t: usize) -> &'a [T] {
        let o = self.off + b * self.st[0] + h * self.st[1] + t * self.st[2];
        &self.data[o..o + self.d]
    }
}

/// `x` as a `T` tensor whose last dim has unit stride: itself when it already is one, else a
/// contiguous (converted) copy.
fn readable<T: WithDType>(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != T::DTYPE {
        return x.to_dtype(T::DTYPE)?.contiguous();
    }
    let unit = x.dims()[3] <= 1 || x.layout().strides()[3] == 1;
    if unit && x.elem_count() > 0 {
        Ok(x.clone())
    } else {
        super::copy::contiguous(x)
    }
}

/// A pointer that rayon tasks write disjoint regions through.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: tasks only write disjoint ranges, and the buffer outlives the parallel loop.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// `len` elements from `off`.
    ///
    /// # Safety
    /// The range must lie in the buffer, and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }
}

/// Runs `f(i)` for `i < n`, in parallel when `work` is large enough.
fn for_each_task(n: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    if par::use_threads(work) && n > 1 {
        (0..n).into_par_iter().for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

// ------------------------------------------------------------------------------ rope

/// See [`crate::ops::rope`] (`inverse`: [`crate::ops::rope_backward`]).
pub fn rope(x: &Tensor, opts: &RopeOptions, inverse: bool) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 => rope_t::<f64>(x, opts, inverse),
        DType::F32 => rope_t::<f32>(x, opts, inverse),
        DType::BF16 | DType::F16 => rope_t::<f32>(x, opts, inverse)?.to_dtype(x.dtype()),
        d => Err(Error::dtype(if inverse { "rope_backward" } else { "rope" }, d)),
    }
}

fn rope_t<T: WithDType + Float>(x: &Tensor, opts: &RopeOptions, inverse: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (h, l, dim) = (dims[1], dims[2], dims[3]);
    let half = dim / 2;
    let n = x.elem_count();
    if n == 0 {
        return Tensor::zeros(dims, T::DTYPE, x.device());
    }
    // cos/sin per (position, pair), in f64 then rounded once.
    let (cos, sin) = opts.cos_sin_table(l, dim);
    let cos: Vec<T> = cos.into_iter().map(T::from_f64).collect();
    let sin: Vec<T> = sin.into_iter().map(|s| T::from_f64(if inverse { -s } else { s })).collect();
    let xr = readable::<T>(x)?;
    let rows = Rows::<T>::new(&xr)?;
    let mut out = vec![T::zero(); n];
    par::for_each_rows_mut(&mut out, dim, dim * 4, |first, chunk| {
        for (r, o) in chunk.chunks_exact_mut(dim).enumerate() {
            let row = first + r;
            let (t, bh) = (row % l, row / l);
            let xs = rows.row(bh / h, bh % h, t);
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            match opts.style {
                RopeStyle::RotateHalf => {
                    let (x0, x1) = xs.split_at(half);
                    let (o0, o1) = o.split_at_mut(half);
                    for i in 0..half {
                        o0[i] = x0[i] * c[i] - x1[i] * s[i];
                        o1[i] = x1[i] * c[i] + x0[i] * s[i];
                    }
                }
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (xs[2 * i], xs[2 * i + 1]);
                        o[2 * i] = a * c[i] - b * s[i];
                        o[2 * i + 1] = b * c[i] + a * s[i];
                    }
                }
            }
        }
    });
    Tensor::from_vec(out, dims, x.device())
}

// ------------------------------------------------------------------------------ masks

/// Which keys the queries of one call see (positions as signed numbers: with `lq > lk` the
/// first queries sit before the first key).
#[derive(Clone, Copy)]
struct Mask {
    /// `lk - lq`: query `i` sits at absolute position `i + shift`.
    shift: i64,
    causal: bool,
    window: Option<i64>,
}

impl Mask {
    fn new(d: &AttentionDims, opts: &AttentionOptions) -> Self {
        Mask { shift: d.lk as i64 - d.lq as i64, causal: opts.causal, window: opts.window.map(|w| w as i64) }
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        let p = i as i64 + self.shift;
        let j = j as i64;
        !(self.causal && j > p) && self.window.is_none_or(|w| j > p - w)
    }

    /// The keys `[lo, hi)` that some query of `[i0, i1)` sees (`i1 > i0`), within `0..lk`.
    fn key_range(&self, i0: usize, i1: usize, lk: usize) -> (usize, usize) {
        let (p0, p1) = (i0 as i64 + self.shift, i1 as i64 - 1 + self.shift);
        let lo = self.window.map_or(0, |w| (p0 - w + 1).max(0));
        let hi = if self.causal { (p1 + 1).clamp(0, lk as i64) } else { lk as i64 };
        (lo.min(lk as i64) as usize, hi.max(0) as usize)
    }

    /// The queries `[lo, hi)` that see some key of `[j0, j1)` (`j1 > j0`), within `0..lq`.
    fn query_range(&self, j0: usize, j1: usize, lq: usize) -> (usize, usize) {
        // causal: p >= j0 ⇔ i >= j0 - shift; window: p - w < j1 - 1 ⇔ i < j1 - 1 + w - shift.
        let lo = if self.causal { (j0 as i64 - self.shift).max(0) } else { 0 };
        let hi = self.window.map_or(lq as i64, |w| (j1 as i64 - 1 + w - self.shift).min(lq as i64));
        (lo.min(lq as i64) as usize, hi.max(0) as usize)
    }

    /// Whether every query of `[i0, i1)` sees every key of `[j0, j1)`.
    fn full(&self, i0: usize, i1: usize, j0: usize, j1: usize) -> bool {
        let (p0, p1) = (i0 as i64 + self.shift, i1 as i64 - 1 + self.shift);
        !(self.causal && j1 as i64 - 1 > p0) && self.window.is_none_or(|w| j0 as i64 > p1 - w)
    }

    /// Sets `s[i·ld + j]` to `-inf` where query `i0 + i` does not see key `j0 + j`, and for every
    /// padding column `j >= nk`.
    fn apply<T: Float>(
        &self,
        s: &mut [T],
        rows: usize,
        i0: usize,
        j0: usize,
        nk: usize,
        ncols: usize,
        ld: usize,
    ) {
        for i in 0..rows {
            let row = &mut s[i * ld..i * ld + ncols];
            for (j, v) in row.iter_mut().enumerate() {
                if j >= nk || !self.visible(i0 + i, j0 + j) {
                    *v = T::neg_infinity();
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ forward

/// See [`crate::ops::attention`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: &AttentionDims,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    let lse_dims = [d.b, d.hq, d.lq];
    let out_dims = [d.b, d.hq, d.lq, d.dv];
    match q.dtype() {
        DType::F64 => {
            let (o, l) = forward::<f64>(q, k, v, d, opts)?;
            Ok(AttentionOutput {
                out: Tensor::from_vec(o, out_dims.as_slice(), q.device())?,
                lse: Tensor::from_vec(l, lse_dims.as_slice(), q.device())?,
            })
        }
        DType::F32 | DType::BF16 | DType::F16 => {
            let (o, l) = forward::<f32>(q, k, v, d, opts)?;
            Ok(AttentionOutput {
                out: Tensor::from_vec(o, out_dims.as_slice(), q.device())?.to_dtype(q.dtype())?,
                lse: Tensor::from_vec(l, lse_dims.as_slice(), q.device())?
                    .to_dtype(attention_lse_dtype(q.dtype()))?,
            })
        }
        dt => Err(Error::dtype("attention", dt)),
    }
}

/// Per-task scratch of the forward.
struct FwdBufs<T> {
    q: Vec<T>,
    v: Vec<T>,
    s: Vec<T>,
    o: Vec<T>,
    m: Vec<T>,
    l: Vec<T>,
    mx: Vec<T>,
    shift: Vec<T>,
    sums: Vec<T>,
}

/// Kᵀ of every (batch, kv head), packed once in key tiles: `(b · hkv, tiles, dk, BC)`, zeros
/// past `lk`, so that key tile `t` is one contiguous `(dk × BC)` block (the micro-kernel then
/// streams it from L1/L2 instead of striding over the whole sequence).
fn pack_kt<T: FlashElem>(kr: &Rows<'_, T>, d: &AttentionDims) -> Vec<T> {
    let per = d.lk.div_ceil(BC) * d.dk * BC;
    let mut kt = vec![T::zero(); d.b * d.hkv * per];
    if per == 0 {
        return kt;
    }
    par::for_each_rows_mut(&mut kt, per, per, |first, chunk| {
        for (r, dst) in chunk.chunks_exact_mut(per).enumerate() {
            let grp = first + r;
            let (bi, g) = (grp / d.hkv, grp % d.hkv);
            for (tile, block) in dst.chunks_exact_mut(d.dk * BC).enumerate() {
                for j in 0..BC.min(d.lk - tile * BC) {
                    for (t, &x) in kr.row(bi, g, tile * BC + j).iter().enumerate() {
                        block[t * BC + j] = x;
                    }
                }
            }
        }
    });
    kt
}

/// The tiled forward: `(out (b, hq, lq, dv), lse (b, hq, lq))`, contiguous.
fn forward<T: FlashElem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d: &AttentionDims,
    opts: &AttentionOptions,
) -> Result<(Vec<T>, Vec<T>)> {
    let mut out = vec![T::zero(); d.b * d.hq * d.lq * d.dv];
    let mut lse = vec![T::neg_infinity(); d.b * d.hq * d.lq];
    if d.b * d.hq * d.lq == 0 {
        return Ok((out, lse));
    }
    let (qt, kt, vt) = (readable::<T>(q)?, readable::<T>(k)?, readable::<T>(v)?);
    let (qr, kr, vr) = (Rows::<T>::new(&qt)?, Rows::<T>::new(&kt)?, Rows::<T>::new(&vt)?);
    let ktp = pack_kt(&kr, d);
    let kt_per = d.lk.div_ceil(BC) * d.dk * BC;
    let mask = Mask::new(d, opts);
    let scale = T::from_f64(opts.scale);
    let rep = d.hq / d.hkv;
    let (dkp, dvp) = (round_up(d.dk.max(1), PAD), round_up(d.dv.max(1), PAD));
    // V is read in place when its rows are already padded-width (dv a multiple of PAD).
    let v_in_place = d.dv.is_multiple_of(PAD) && d.dv > 0 && vr.st[2] >= d.dv;
    let q_tiles = d.lq.div_ceil(BR);
    // q heads per task: the heads that share a kv head are stacked (`hs · BR` rows against each
    // K/V tile, so every tile loaded serves them all), up to STACK_ROWS rows.
    let hs = heads_per_task(rep);
    let stacks = d.hq / hs;
    let n_tasks = d.b * stacks * q_tiles;
    let (out_p, lse_p) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let work = d.b * d.hq * d.lq * d.lk.max(1) * (d.dk + d.dv + 4);
    for_each_task(n_tasks, work, |task| {
        // Long (late) query tiles first: tasks run in index order per thread, and the short
        // ones at the end even out the threads' finishing times.
        let (st, qtile) = (task / q_tiles, q_tiles - 1 - task % q_tiles);
        let (bi, h0) = (st / stacks, (st % stacks) * hs);
        let g = h0 / rep;
        let i0 = qtile * BR;
        let m = BR.min(d.lq - i0);
        let rows = hs * m;
        let mut bufs = FwdBufs {
            q: vec![T::zero(); rows * dkp],
            v: if v_in_place { Vec::new() } else { vec![T::zero(); BC * dvp] },
            s: vec![T::zero(); rows * BC],
            o: vec![T::zero(); rows * dvp],
            m: vec![T::neg_infinity(); rows],
            l: vec![T::zero(); rows],
            mx: vec![T::zero(); rows],
            shift: vec![T::zero(); rows],
            sums: vec![T::zero(); rows],
        };
        // Stacked row hh·m + i is query i0 + i of head h0 + hh.
        for hh in 0..hs {
            for i in 0..m {
                let r = hh * m + i;
                let dst = &mut bufs.q[r * dkp..r * dkp + d.dk];
                for (dst, &x) in dst.iter_mut().zip(qr.row(bi, h0 + hh, i0 + i)) {
                    *dst = x * scale;
                }
            }
        }
        let kt_head = &ktp[(bi * d.hkv + g) * kt_per..(bi * d.hkv + g + 1) * kt_per];
        let (jlo, jhi) = mask.key_range(i0, i0 + m, d.lk);
        // Tiles start at multiples of BC (the packed Kᵀ blocks); keys before `jlo` in the first
        // one are hidden by the window mask, keys from `jhi` on by the padding mask.
        let mut j0 = jlo / BC * BC;
        while j0 < jhi {
            let nk = BC.min(jhi - j0);
            let ncols = round_up(nk, PAD);
            let tile = KeyTile { j0, nk, ncols, kt: &kt_head[j0 * d.dk..], ldk: BC };
            let q_rows = QRows { i0, m, hs };
            fwd_tile(&mut bufs, &tile, &vr, v_in_place, bi, g, &q_rows, d, &mask, dvp);
            j0 += BC;
        }
        for hh in 0..hs {
            let bh = bi * d.hq + h0 + hh;
            // SAFETY: task (bi, stack, qtile) owns rows i0..i0+m of its heads in both outputs.
            let (o_out, l_out) =
                unsafe { (out_p.slice((bh * d.lq + i0) * d.dv, m * d.dv), lse_p.slice(bh * d.lq + i0, m)) };
            for i in 0..m {
                let r = hh * m + i;
                let l = bufs.l[r];
                if l > T::zero() {
                    let inv = T::one() / l;
                    let src = &bufs.o[r * dvp..];
                    for (dst, &o) in o_out[i * d.dv..(i + 1) * d.dv].iter_mut().zip(src) {
                        *dst = o * inv;
                    }
                    l_out[i] = bufs.m[r] + l.ln();
                }
            }
        }
    });
    Ok((out, lse))
}

/// Rows of C the forward stacks per task (the q heads of one kv head, `BR` queries each).
const STACK_ROWS: usize = 2 * BR;

/// How many q heads of a kv group one forward task stacks: the largest divisor of `rep` with
/// `heads · BR <= STACK_ROWS`.
fn heads_per_task(rep: usize) -> usize {
    (1..=(STACK_ROWS / BR).min(rep)).rev().find(|h| rep.is_multiple_of(*h)).unwrap_or(1)
}

/// One key tile of the forward: keys `[j0, j0 + nk)`, `ncols` padded columns, and its Kᵀ block
/// (`dk` rows of stride `ldk`, starting at key `j0`).
struct KeyTile<'a, T> {
    j0: usize,
    nk: usize,
    ncols: usize,
    kt: &'a [T],
    ldk: usize,
}

/// The query rows of a forward task: queries `[i0, i0 + m)` of `hs` stacked heads.
struct QRows {
    i0: usize,
    m: usize,
    hs: usize,
}

/// One key tile of one query tile (see the module docs).
#[allow(clippy::too_many_arguments)]
fn fwd_tile<T: FlashElem>(
    b: &mut FwdBufs<T>,
    t: &KeyTile<'_, T>,
    vr: &Rows<'_, T>,
    v_in_place: bool,
    bi: usize,
    g: usize,
    qr: &QRows,
    d: &AttentionDims,
    mask: &Mask,
    dvp: usize,
) {
    let (j0, nk, ncols) = (t.j0, t.nk, t.ncols);
    let (i0, m) = (qr.i0, qr.m);
    let rows = qr.hs * m;
    let dkp = b.q.len() / rows;
    T::gemm(Gemm {
        m: rows,
        n: ncols,
        k: d.dk,
        a: &b.q,
        ars: dkp,
        acs: 1,
        b: t.kt,
        ldb: t.ldk,
        c: &mut b.s,
        ldc: BC,
        overwrite: true,
    });
    if nk < ncols || !mask.full(i0, i0 + m, j0, j0 + nk) {
        for hh in 0..qr.hs {
            mask.apply(&mut b.s[hh * m * BC..], m, i0, j0, nk, ncols, BC);
        }
    }
    T::rows_max(&b.s, rows, ncols, BC, &mut b.mx);
    for r in 0..rows {
        let (old, new) = (b.m[r], b.m[r].max(b.mx[r]));
        b.shift[r] = if new == T::neg_infinity() { T::zero() } else { new };
        let alpha = if old == T::neg_infinity() { T::zero() } else { (old - new).exp() };
        b.m[r] = new;
        b.mx[r] = alpha;
    }
    T::rows_exp(&mut b.s, rows, ncols, BC, &b.shift, &mut b.sums);
    for r in 0..rows {
        let alpha = b.mx[r];
        b.l[r] = b.l[r] * alpha + b.sums[r];
        if alpha != T::one() {
            b.o[r * dvp..(r + 1) * dvp].iter_mut().for_each(|o| *o = *o * alpha);
        }
    }
    let (vb, ldv): (&[T], usize) = if v_in_place {
        let first = vr.off + bi * vr.st[0] + g * vr.st[1] + j0 * vr.st[2];
        (&vr.data[first..], vr.st[2])
    } else {
        for j in 0..nk {
            b.v[j * dvp..j * dvp + d.dv].copy_from_slice(vr.row(bi, g, j0 + j));
        }
        (&b.v, dvp)
    };
    T::gemm(Gemm {
        m: rows,
        n: dvp,
        k: nk,
        a: &b.s,
        ars: BC,
        acs: 1,
        b: vb,
        ldb: ldv,
        c: &mut b.o,
        ldc: dvp,
        overwrite: false,
    });
}

// ------------------------------------------------------------------------------ backward

/// See [`crate::ops::attention_backward`].
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttentionOutput,
    grad_out: &Tensor,
    d: &AttentionDims,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (qd, kd, vd) = ([d.b, d.hq, d.lq, d.dk], [d.b, d.hkv, d.lk, d.dk], [d.b, d.hkv, d.lk, d.dv]);
    match q.dtype() {
        DType::F64 => {
            let (dq, dk, dv) = backward::<f64>(q, k, v, fwd, grad_out, d, opts)?;
            Ok((
                Tensor::from_vec(dq, qd.as_slice(), q.device())?,
                Tensor::from_vec(dk, kd.as_slice(), q.device())?,
                Tensor::from_vec(dv, vd.as_slice(), q.device())?,
            ))
        }
        DType::F32 | DType::BF16 | DType::F16 => {
            let (dq, dk, dv) = backward::<f32>(q, k, v, fwd, grad_out, d, opts)?;
            let dt = q.dtype();
            Ok((
                Tensor::from_vec(dq, qd.as_slice(), q.device())?.to_dtype(dt)?,
                Tensor::from_vec(dk, kd.as_slice(), q.device())?.to_dtype(dt)?,
                Tensor::from_vec(dv, vd.as_slice(), q.device())?.to_dtype(dt)?,
            ))
        }
        dt => Err(Error::dtype("attention_backward", dt)),
    }
}

/// Per-task scratch of the backward.
struct BwdBufs<T> {
    kt: Vec<T>,
    k: Vec<T>,
    vt: Vec<T>,
    q: Vec<T>,
    go: Vec<T>,
    s: Vec<T>,
    dp: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    shift: Vec<T>,
    sums: Vec<T>,
}

/// The tiled backward: `(dq, dk, dv)`, contiguous.
#[allow(clippy::type_complexity)]
fn backward<T: FlashElem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &AttentionOutput,
    grad_out: &Tensor,
    d: &AttentionDims,
    opts: &AttentionOptions,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let mut dq = vec![T::zero(); d.b * d.hq * d.lq * d.dk];
    let mut dk = vec![T::zero(); d.b * d.hkv * d.lk * d.dk];
    let mut dv = vec![T::zero(); d.b * d.hkv * d.lk * d.dv];
    if d.b * d.hq * d.lq == 0 || d.lk == 0 {
        return Ok((dq, dk, dv));
    }
    let (qt, kt, vt) = (readable::<T>(q)?, readable::<T>(k)?, readable::<T>(v)?);
    let (got, ot) = (readable::<T>(grad_out)?, readable::<T>(&fwd.out)?);
    let (qr, kr, vr) = (Rows::<T>::new(&qt)?, Rows::<T>::new(&kt)?, Rows::<T>::new(&vt)?);
    let (gr, or) = (Rows::<T>::new(&got)?, Rows::<T>::new(&ot)?);
    let lse: Vec<T> = fwd.lse.to_dtype(T::DTYPE)?.to_vec::<T>()?;
    // Δ = rowsum(dO ∘ O), per (b, hq, lq).
    let mut delta = vec![T::zero(); d.b * d.hq * d.lq];
    par::for_each_rows_mut(&mut delta, 1, d.dv.max(1), |first, chunk| {
        for (r, x) in chunk.iter_mut().enumerate() {
            let row = first + r;
            let (i, bh) = (row % d.lq, row / d.lq);
            let (gg, oo) = (gr.row(bh / d.hq, bh % d.hq, i), or.row(bh / d.hq, bh % d.hq, i));
            *x = gg.iter().zip(oo).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
        }
    });

    let mask = Mask::new(d, opts);
    let scale = T::from_f64(opts.scale);
    let rep = d.hq / d.hkv;
    let (dkp, dvp) = (round_up(d.dk.max(1), PAD), round_up(d.dv.max(1), PAD));
    let k_tiles = d.lk.div_ceil(BC);
    let groups = d.b * d.hkv;
    let threads = rayon::current_num_threads().max(1);
    // Chunks of key tiles per (batch, kv head): enough tasks to keep every thread busy.
    let chunks =
        if groups >= 2 * threads { 1 } else { (2 * threads).div_ceil(groups).min(k_tiles).clamp(1, 8) };
    let per_part = d.b * d.hq * d.lq * d.dk;
    let mut parts = if chunks == 1 { Vec::new() } else { vec![T::zero(); chunks * per_part] };
    let dq_p = SendPtr(if chunks == 1 { dq.as_mut_ptr() } else { parts.as_mut_ptr() });
    let (dk_p, dv_p) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let work = d.b * d.hq * d.lq * d.lk * (d.dk + d.dv + 4);
    for_each_task(groups * chunks, work, |task| {
        let (grp, c) = (task / chunks, task % chunks);
        let (bi, g) = (grp / d.hkv, grp % d.hkv);
        let mut b = BwdBufs {
            kt: vec![T::zero(); d.dk * BC],
            k: vec![T::zero(); BC * dkp],
            vt: vec![T::zero(); d.dv * BC],
            q: vec![T::zero(); BR * dkp],
            go: vec![T::zero(); BR * dvp],
            s: vec![T::zero(); BR * BC],
            dp: vec![T::zero(); BR * BC],
            dq: vec![T::zero(); BR * dkp],
            dk: vec![T::zero(); BC * dkp],
            dv: vec![T::zero(); BC * dvp],
            shift: vec![T::zero(); BR],
            sums: vec![T::zero(); BR],
        };
        // This task's dQ rows: q heads g·rep .. (g+1)·rep of batch bi, in partial c.
        let dq_off = c * per_part + (bi * d.hq + g * rep) * d.lq * d.dk;
        // SAFETY: (bi, g, c) owns these rows of its partial (or of dq when there is one chunk).
        let dq_rows = unsafe { dq_p.slice(dq_off, rep * d.lq * d.dk) };
        for kt_i in (c..k_tiles).step_by(chunks) {
            let j0 = kt_i * BC;
            let nk = BC.min(d.lk - j0);
            let ncols = round_up(nk, PAD);
            for j in 0..nk {
                let kj = kr.row(bi, g, j0 + j);
                for (t, &x) in kj.iter().enumerate() {
                    b.kt[t * BC + j] = x;
                }
                b.k[j * dkp..j * dkp + d.dk].copy_from_slice(kj);
                for (t, &x) in vr.row(bi, g, j0 + j).iter().enumerate() {
                    b.vt[t * BC + j] = x;
                }
            }
            for j in nk..ncols {
                for t in 0..d.dk {
                    b.kt[t * BC + j] = T::zero();
                }
                for t in 0..d.dv {
                    b.vt[t * BC + j] = T::zero();
                }
            }
            b.dk.fill(T::zero());
            b.dv.fill(T::zero());
            let (ilo, ihi) = mask.query_range(j0, j0 + nk, d.lq);
            for hh in 0..rep {
                let h = g * rep + hh;
                let bh = bi * d.hq + h;
                let mut i0 = ilo;
                while i0 < ihi {
                    let m = BR.min(ihi - i0);
                    bwd_tile(
                        &mut b,
                        &TileCtx { qr: &qr, gr: &gr, lse: &lse, delta: &delta, scale, mask: &mask, d },
                        (bi, h, bh),
                        (i0, m, j0, nk, ncols),
                    );
                    // dQ rows += dS K (unscaled; scaled once at the end).
                    let rows = &mut dq_rows[(hh * d.lq + i0) * d.dk..(hh * d.lq + i0 + m) * d.dk];
                    for i in 0..m {
                        for (dst, &x) in rows[i * d.dk..(i + 1) * d.dk].iter_mut().zip(&b.dq[i * dkp..]) {
                            *dst = *dst + x;
                        }
                    }
                    i0 += m;
                }
            }
            let kv_row = (bi * d.hkv + g) * d.lk + j0;
            // SAFETY: key tile kt_i of (bi, g) belongs to this task alone.
            let (dk_out, dv_out) =
                unsafe { (dk_p.slice(kv_row * d.dk, nk * d.dk), dv_p.slice(kv_row * d.dv, nk * d.dv)) };
            for j in 0..nk {
                dk_out[j * d.dk..(j + 1) * d.dk].copy_from_slice(&b.dk[j * dkp..j * dkp + d.dk]);
                dv_out[j * d.dv..(j + 1) * d.dv].copy_from_slice(&b.dv[j * dvp..j * dvp + d.dv]);
            }
        }
    });
    if chunks > 1 {
        // Sum the partials in chunk order (deterministic), then scale.
        par::for_each_chunk_mut(&mut dq, |start, out| {
            for (i, o) in out.iter_mut().enumerate() {
                let mut acc = T::zero();
                for c in 0..chunks {
                    acc = acc + parts[c * per_part + start + i];
                }
                *o = acc * scale;
            }
        });
    } else {
        par::for_each_chunk_mut(&mut dq, |_, out| out.iter_mut().for_each(|o| *o = *o * scale));
    }
    Ok((dq, dk, dv))
}

/// What every backward tile reads.
struct TileCtx<'a, 'r, T> {
    qr: &'a Rows<'r, T>,
    gr: &'a Rows<'r, T>,
    lse: &'a [T],
    delta: &'a [T],
    scale: T,
    mask: &'a Mask,
    d: &'a AttentionDims,
}

/// One (query tile, key tile) pair of the backward: accumulates dK and dV into `b.dk`, `b.dv`
/// and leaves `dS K` for the query rows in `b.dq` (see the module docs).
fn bwd_tile<T: FlashElem>(
    b: &mut BwdBufs<T>,
    cx: &TileCtx<'_, '_, T>,
    (bi, h, bh): (usize, usize, usize),
    (i0, m, j0, nk, ncols): (usize, usize, usize, usize, usize),
) {
    let d = cx.d;
    let (dkp, dvp) = (b.k.len() / BC, b.dv.len() / BC);
    for i in 0..m {
        for (dst, &x) in b.q[i * dkp..i * dkp + d.dk].iter_mut().zip(cx.qr.row(bi, h, i0 + i)) {
            *dst = x * cx.scale;
        }
        b.go[i * dvp..i * dvp + d.dv].copy_from_slice(cx.gr.row(bi, h, i0 + i));
        let l = cx.lse[bh * d.lq + i0 + i];
        b.shift[i] = if l == T::neg_infinity() { T::zero() } else { l };
    }
    // S = (scale Q) Kᵀ, exactly as in the forward; P = e^(S - lse).
    T::gemm(Gemm {
        m,
        n: ncols,
        k: d.dk,
        a: &b.q,
        ars: dkp,
        acs: 1,
        b: &b.kt,
        ldb: BC,
        c: &mut b.s,
        ldc: BC,
        overwrite: true,
    });
    if nk < ncols || !cx.mask.full(i0, i0 + m, j0, j0 + nk) {
        cx.mask.apply(&mut b.s, m, i0, j0, nk, ncols, BC);
    }
    T::rows_exp(&mut b.s, m, ncols, BC, &b.shift, &mut b.sums);
    // dV += Pᵀ dO.
    T::gemm(Gemm {
        m: nk,
        n: dvp,
        k: m,
        a: &b.s,
        ars: 1,
        acs: BC,
        b: &b.go,
        ldb: dvp,
        c: &mut b.dv,
        ldc: dvp,
        overwrite: false,
    });
    // dP = dO Vᵀ, then dS = P ∘ (dP - Δ) in place.
    T::gemm(Gemm {
        m,
        n: ncols,
        k: d.dv,
        a: &b.go,
        ars: dvp,
        acs: 1,
        b: &b.vt,
        ldb: BC,
        c: &mut b.dp,
        ldc: BC,
        overwrite: true,
    });
    for i in 0..m {
        let delta = cx.delta[bh * d.lq + i0 + i];
        let (p, dp) = (&b.s[i * BC..i * BC + ncols], &mut b.dp[i * BC..i * BC + ncols]);
        for (x, &pv) in dp.iter_mut().zip(p) {
            *x = pv * (*x - delta);
        }
    }
    // dK += dSᵀ (scale Q); dQ rows = dS K.
    T::gemm(Gemm {
        m: nk,
        n: dkp,
        k: m,
        a: &b.dp,
        ars: 1,
        acs: BC,
        b: &b.q,
        ldb: dkp,
        c: &mut b.dk,
        ldc: dkp,
        overwrite: false,
    });
    T::gemm(Gemm {
        m,
        n: dkp,
        k: nk,
        a: &b.dp,
        ars: BC,
        acs: 1,
        b: &b.k,
        ldb: dkp,
        c: &mut b.dq,
        ldc: dkp,
        overwrite: true,
    });
}
