//! CPU chunked SSD (Mamba-2): the state-space dual form, forward and backward.
//!
//! The sequence is cut into chunks of `Q` tokens. Inside a chunk, with `cs_i` the cumulative
//! log-decay (`Σ_{j≤i} dt'_j A`), `S` the state entering the chunk, `G = C Bᵀ` (Q × Q, once per
//! group) and `M_ij = G_ij · exp(cs_i - cs_j) · dt'_j` for `j ≤ i` (same document), the outputs are
//! ```text
//! Y     = M X + diag(exp(cs)) C Sᵀ + D ∘ X                         (quadratic, attention-like)
//! S_end = exp(cs_last) S + Xᵀ diag(w) B,   w_j = exp(cs_last - cs_j) dt'_j    (chunk state)
//! ```
//! Three passes, as the GPU kernels do:
//! 1. chunk states, parallel over (batch, head), sequential over chunks (one `p×q×n` GEMM each);
//! 2. outputs, parallel over (batch, chunk), every group then head inside (`C Bᵀ` once per
//!    group); the Q × Q products are lower triangular and run as row blocks that skip the zero
//!    upper blocks.
//!
//! The backward keeps only the chunk states: a reverse pass over the chunks gives the gradient of
//! every chunk-end state, then each (batch, chunk) recomputes its `M` and forms every gradient
//! through GEMMs. Per-head sums (dA, dD, d dt_bias) are written per (batch, chunk) and added in
//! a fixed order afterwards, so the results are bit-identical whatever the thread count.
//!
//! GEMMs run on the `gemm` crate (single-threaded inside a task, on strided operands).

use std::borrow::Cow;

use moeba_tensor::{DType, Device, Result, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::par;
use crate::cpu::simd::{self, MapOp};
use crate::ops::{SsdArgs, SsdDims, SsdGrads, SsdOutput, SsdSaved, SsdStepArgs};

/// Rows per block of the lower-triangular Q × Q products.
const TRI_BLOCK: usize = crate::ops::SSD_TRI_BLOCK;

/// The compute types.
trait Float: num_traits::Float + WithDType + Default + Send + Sync + std::iter::Sum + 'static {
    /// `x = e^x` elementwise.
    fn exp_inplace(x: &mut [Self]);
}

impl Float for f32 {
    fn exp_inplace(x: &mut [f32]) {
        simd::map_inplace_f32(MapOp::Exp, x);
    }
}

impl Float for f64 {
    fn exp_inplace(x: &mut [f64]) {
        for v in x {
            *v = v.exp();
        }
    }
}

/// A read-only strided matrix view: element (i, j) is `d[off + i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    d: &'a [T],
    off: usize,
    rs: usize,
    cs: usize,
}

fn mat<T>(d: &[T], off: usize, rs: usize, cs: usize) -> Mat<'_, T> {
    Mat { d, off, rs, cs }
}

/// `dst (m × n at doff, row stride drs, unit columns) = [dst +] a (m × k) · b (k × n)`.
///
/// # Panics
/// If an operand reaches past its slice (the callers derive every offset from checked dims).
fn gemm<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    doff: usize,
    drs: usize,
    acc: bool,
    a: Mat<T>,
    b: Mat<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(doff + (m - 1) * drs + n <= dst.len(), "ssd gemm: dst out of bounds");
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[doff + i * drs..doff + i * drs + n].fill(T::zero());
            }
        }
        return;
    }
    let inb = |x: &Mat<T>, r: usize, c: usize| x.off + (r - 1) * x.rs + (c - 1) * x.cs < x.d.len();
    assert!(inb(&a, m, k) && inb(&b, k, n), "ssd gemm: operand out of bounds");
    // SAFETY: every element reached through the (non-negative) strides was bounds-checked above:
    // the extremes are the first and the last element of each operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(doff),
            1,
            drs as isize,
            acc,
            a.d.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.d.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `dst (q × n) [+]= L (q × q, lower triangular, row-major ld q) · b (q × n)`, skipping the zero
/// upper blocks.
fn gemm_lower<T: Float>(
    q: usize,
    n: usize,
    l: &[T],
    b: Mat<T>,
    dst: &mut [T],
    doff: usize,
    drs: usize,
    acc: bool,
) {
    for r0 in (0..q).step_by(TRI_BLOCK) {
        let r1 = (r0 + TRI_BLOCK).min(q);
        gemm(r1 - r0, n, r1, dst, doff + r0 * drs, drs, acc, mat(l, r0 * q, q, 1), b);
    }
}

/// `dst (q × n) [+]= Lᵀ (L q × q lower triangular, row-major ld q) · b (q × n)`, skipping zeros:
/// row j of `Lᵀ b` only reads rows `i ≥ j` of `b`.
fn gemm_lower_t<T: Float>(
    q: usize,
    n: usize,
    l: &[T],
    b: Mat<T>,
    dst: &mut [T],
    doff: usize,
    drs: usize,
    acc: bool,
) {
    for r0 in (0..q).step_by(TRI_BLOCK) {
        let r1 = (r0 + TRI_BLOCK).min(q);
        let bb = Mat { off: b.off + r0 * b.rs, ..b };
        gemm(r1 - r0, n, q - r0, dst, doff + r0 * drs, drs, acc, mat(l, r0 * q + r0, 1, q), bb);
    }
}

/// `dst (q × q, ld q) = lower-triangular blocks of a (q × k) · b (k × q)`; the strictly-upper
/// blocks are left as they were (callers only read `j ≤ i`).
fn gemm_to_lower<T: Float>(q: usize, k: usize, a: Mat<T>, b: Mat<T>, dst: &mut [T]) {
    for r0 in (0..q).step_by(TRI_BLOCK) {
        let r1 = (r0 + TRI_BLOCK).min(q);
        let aa = Mat { off: a.off + r0 * a.rs, ..a };
        gemm(r1 - r0, r1, k, dst, r0 * q, q, false, aa, b);
    }
}

fn load<T: Float>(t: &Tensor) -> Result<Cow<'_, [T]>> {
    if t.dtype() == T::DTYPE {
        t.cpu_data::<T>()
    } else {
        Ok(Cow::Owned(t.to_dtype(T::DTYPE)?.to_vec::<T>()?))
    }
}

fn to_tensor<T: Float>(v: Vec<T>, dims: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// Splits `buf` into consecutive pieces of the given lengths (zero lengths allowed).
fn split_sizes<T>(mut buf: &mut [T], sizes: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for s in sizes {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(s);
        out.push(a);
        buf = b;
    }
    out
}

/// Runs `f` on every task, on the thread pool when `work` is large. Each task owns its output.
fn run_tasks<X: Send>(tasks: Vec<X>, work: usize, f: impl Fn(X) + Sync + Send) {
    if par::use_threads(work) && tasks.len() > 1 {
        tasks.into_par_iter().with_max_len(1).for_each(f);
    } else {
        tasks.into_iter().for_each(f);
    }
}

/// Σ x with eight independent partial sums (vectorizable; a fixed order, so deterministic).
fn sum8<T: Float>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] = acc[k] + c[k];
        }
    }
    let mut s = it.remainder().iter().fold(T::zero(), |a, &v| a + v);
    for a in acc {
        s = s + a;
    }
    s
}

fn softplus<T: Float>(v: T) -> (T, T) {
    let twenty = T::from(20.0).unwrap_or(T::max_value());
    if v > twenty {
        (v, T::one())
    } else {
        ((T::one() + v.exp()).ln(), T::one() / (T::one() + (-v).exp()))
    }
}

/// Everything both passes read, in the compute type.
struct Prep<'a, T: Clone> {
    x: Cow<'a, [T]>,
    /// dt' (b, l, h).
    dtp: Vec<T>,
    /// d dt' / d dt (b, l, h).
    dtp_grad: Vec<T>,
    a: Vec<T>,
    bm: Cow<'a, [T]>,
    cm: Cow<'a, [T]>,
    /// D expanded to (h, p).
    d: Option<Vec<T>>,
    /// Segment id per token (b, l): the count of document changes so far.
    seg: Option<Vec<u32>>,
    /// Cumulative log-decay within each chunk, (b, h, l).
    cs: Vec<T>,
    q: usize,
    nc: usize,
}

fn prepare<'a, T: Float>(args: &'a SsdArgs, dm: SsdDims) -> Result<Prep<'a, T>> {
    let SsdDims { b, l, h, p, .. } = dm;
    let q = args.chunk_size;
    let nc = l.div_ceil(q);
    let dt = load::<T>(args.dt)?;
    let bias = match args.dt_bias {
        Some(t) => load::<T>(t)?.into_owned(),
        None => vec![T::zero(); h],
    };
    let mut dtp = vec![T::zero(); dt.len()];
    let mut dtp_grad = vec![T::one(); dt.len()];
    for (i, &v) in dt.iter().enumerate() {
        let v = v + bias[i % h];
        if args.dt_softplus {
            (dtp[i], dtp_grad[i]) = softplus(v);
        } else {
            dtp[i] = v;
        }
    }
    let a = load::<T>(args.a)?.into_owned();
    let d = match args.d {
        Some(t) => {
            let v = load::<T>(t)?.into_owned();
            Some(if t.rank() == 1 { (0..h * p).map(|i| v[i / p]).collect() } else { v })
        }
        None => None,
    };
    let seg = match args.seq_idx {
        Some(s) => {
            let v = s.to_vec_f64()?;
            let mut seg = vec![0u32; b * l];
            for bi in 0..b {
                for t in 1..l {
                    let changed = v[bi * l + t] != v[bi * l + t - 1];
                    seg[bi * l + t] = seg[bi * l + t - 1] + changed as u32;
                }
            }
            Some(seg)
        }
        None => None,
    };
    let mut cs = vec![T::zero(); b * h * l];
    for bi in 0..b {
        for hi in 0..h {
            let row = &mut cs[(bi * h + hi) * l..(bi * h + hi + 1) * l];
            let mut acc = T::zero();
            for t in 0..l {
                if t.is_multiple_of(q) {
                    acc = T::zero();
                }
                acc = acc + dtp[(bi * l + t) * h + hi] * a[hi];
                row[t] = acc;
            }
        }
    }
    Ok(Prep {
        x: load::<T>(args.x)?,
        dtp,
        dtp_grad,
        a,
        bm: load::<T>(args.b)?,
        cm: load::<T>(args.c)?,
        d,
        seg,
        cs,
        q,
        nc,
    })
}

/// Where each token's document starts inside one chunk, and whether the chunk's first token
/// continues the state that enters the chunk.
struct ChunkInfo {
    t0: usize,
    q: usize,
    /// lo[i]: index (in the chunk) of the first token of token i's document, clipped to 0.
    lo: Vec<usize>,
    /// Whether the state entering the chunk reaches the chunk's first token.
    conn: bool,
}

impl ChunkInfo {
    fn new<T: Clone>(pr: &Prep<T>, l: usize, bi: usize, k: usize) -> ChunkInfo {
        let t0 = k * pr.q;
        let q = pr.q.min(l - t0);
        match &pr.seg {
            None => ChunkInfo { t0, q, lo: vec![0; q], conn: true },
            Some(seg) => {
                let s = &seg[bi * l + t0..bi * l + t0 + q];
                let mut lo = vec![0; q];
                for i in 1..q {
                    lo[i] = if s[i] == s[i - 1] { lo[i - 1] } else { i };
                }
                let conn = t0 == 0 || seg[bi * l + t0] == seg[bi * l + t0 - 1];
                ChunkInfo { t0, q, lo, conn }
            }
        }
    }

    /// Whether token i sees the state entering the chunk.
    fn conn_at(&self, i: usize) -> bool {
        self.conn && self.lo[i] == 0
    }
}

/// Per-head chunk quantities: e_i = exp(cs_i) (0 when cut off), w_j = exp(cs_last - cs_j) dt'_j
/// and ew_j = exp(cs_last - cs_j) (0 outside the last document), the end decay.
struct HeadChunk<T> {
    cs: Vec<T>,
    dtp: Vec<T>,
    e: Vec<T>,
    w: Vec<T>,
    ew: Vec<T>,
    decay_end: T,
}

fn head_chunk<T: Float>(pr: &Prep<T>, dm: SsdDims, bi: usize, hi: usize, ci: &ChunkInfo) -> HeadChunk<T> {
    let SsdDims { l, h, .. } = dm;
    let q = ci.q;
    let cs = pr.cs[(bi * h + hi) * l + ci.t0..][..q].to_vec();
    let dtp: Vec<T> = (0..q).map(|j| pr.dtp[(bi * l + ci.t0 + j) * h + hi]).collect();
    let last = cs[q - 1];
    let e = (0..q).map(|i| if ci.conn_at(i) { cs[i].exp() } else { T::zero() }).collect();
    let lo_last = ci.lo[q - 1];
    let ew: Vec<T> = (0..q).map(|j| if j >= lo_last { (last - cs[j]).exp() } else { T::zero() }).collect();
    let w = ew.iter().zip(&dtp).map(|(&a, &b)| a * b).collect();
    let decay_end = if ci.conn_at(q - 1) { last.exp() } else { T::zero() };
    HeadChunk { cs, dtp, e, w, ew, decay_end }
}

/// Fills `emat` (q × q) with exp(cs_i - cs_j) on the valid lower triangle (zero elsewhere) and
/// `mmat` with `G ∘ emat ∘ dt'_j`.
fn build_m<T: Float>(ci: &ChunkInfo, hc: &HeadChunk<T>, gmat: &[T], emat: &mut [T], mmat: &mut [T]) {
    let q = ci.q;
    for i in 0..q {
        let lo = ci.lo[i];
        let er = &mut emat[i * q..(i + 1) * q];
        er[..lo].fill(T::zero());
        for j in lo..=i {
            er[j] = hc.cs[i] - hc.cs[j];
        }
        T::exp_inplace(&mut er[lo..=i]);
        er[i + 1..].fill(T::zero());
        let mr = &mut mmat[i * q..(i + 1) * q];
        mr[..lo].fill(T::zero());
        mr[i + 1..].fill(T::zero());
        let gr = &gmat[i * q + lo..=i * q + i];
        for (((m, &g), &e), &d) in mr[lo..=i].iter_mut().zip(gr).zip(&er[lo..=i]).zip(&hc.dtp[lo..=i]) {
            *m = g * e * d;
        }
    }
}

/// `out[j, (h, pp)] = s[h][j] · src[j, h0 + h, pp]` for the `hpg` heads from `h0`: rows of one
/// group's heads (row stride `h·p` in `src`, starting at `off`) scaled per head and token.
fn scale_heads<T: Float>(src: &[T], off: usize, hp: usize, p: usize, scales: &[Vec<T>], out: &mut [T]) {
    let w = scales.len() * p;
    let q = out.len() / w.max(1);
    for j in 0..q {
        for (hl, s) in scales.iter().enumerate() {
            let sr = &src[off + j * hp + hl * p..][..p];
            for (o, &v) in out[j * w + hl * p..][..p].iter_mut().zip(sr) {
                *o = s[j] * v;
            }
        }
    }
}

/// The per-head chunk quantities of every head of group `gi`.
fn group_heads<T: Float>(
    pr: &Prep<T>,
    dm: SsdDims,
    bi: usize,
    gi: usize,
    ci: &ChunkInfo,
) -> Vec<HeadChunk<T>> {
    let hpg = dm.h / dm.g;
    (gi * hpg..(gi + 1) * hpg).map(|hi| head_chunk(pr, dm, bi, hi, ci)).collect()
}

/// The end-of-chunk decay of every (batch, chunk, head), (b, nc, h).
fn end_decays<T: Float>(pr: &Prep<T>, dm: SsdDims) -> Vec<T> {
    let SsdDims { b, l, h, .. } = dm;
    let mut out = vec![T::zero(); b * pr.nc * h];
    for bi in 0..b {
        for k in 0..pr.nc {
            let ci = ChunkInfo::new(pr, l, bi, k);
            let conn = ci.conn_at(ci.q - 1);
            for hi in 0..h {
                let last = pr.cs[(bi * h + hi) * l + ci.t0 + ci.q - 1];
                out[(bi * pr.nc + k) * h + hi] = if conn { last.exp() } else { T::zero() };
            }
        }
    }
    out
}

/// Runs `f(bi, k, ci, out)` for every (batch, chunk), `out` being that chunk's `(h, p, n)` slab
/// of a fresh (b, nc, h, p, n) buffer, in parallel when large; returns the buffer.
fn per_chunk_slabs<T: Float>(
    pr: &Prep<T>,
    dm: SsdDims,
    f: impl Fn(usize, usize, &ChunkInfo, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let SsdDims { b, l, h, p, n, .. } = dm;
    let slab = h * p * n;
    let mut buf = vec![T::zero(); b * pr.nc * slab];
    let tasks: Vec<_> =
        split_sizes(&mut buf, std::iter::repeat_n(slab, b * pr.nc)).into_iter().enumerate().collect();
    run_tasks(tasks, l * h * p * n, |(task, out)| {
        let (bi, k) = (task / pr.nc, task % pr.nc);
        let ci = ChunkInfo::new(pr, l, bi, k);
        f(bi, k, &ci, out);
    });
    buf
}

/// Pass 1: the state entering every chunk (b, nc, h, p, n) and the final state (b, h, p, n).
/// Each chunk's own contribution `Xᵀ diag(w) B` is one GEMM per group (all its heads at once);
/// then the states are chained chunk by chunk.
fn chunk_states<T: Float>(pr: &Prep<T>, dm: SsdDims, init: Option<&[T]>) -> (Vec<T>, Vec<T>) {
    let SsdDims { b, h, p, g, n, l } = dm;
    let (hpg, pn, hpn, nc) = (h / g, p * n, h * p * n, pr.nc);
    let mut states = per_chunk_slabs(pr, dm, |bi, _k, ci, out| {
        let mut xw = vec![T::zero(); ci.q * hpg * p];
        for gi in 0..g {
            let hcs = group_heads(pr, dm, bi, gi, ci);
            let ws: Vec<Vec<T>> = hcs.into_iter().map(|hc| hc.w).collect();
            let xoff = ((bi * l + ci.t0) * h + gi * hpg) * p;
            scale_heads(&pr.x, xoff, h * p, p, &ws, &mut xw);
            let boff = ((bi * l + ci.t0) * g + gi) * n;
            let m = hpg * p;
            gemm(m, n, ci.q, out, gi * hpg * pn, n, false, mat(&xw, 0, 1, m), mat(&pr.bm, boff, g * n, 1));
        }
    });
    // Chain: S_{k+1} = decay_k S_k + local_k; the buffer then holds the entering states.
    let decays = end_decays(pr, dm);
    let mut fin = match init {
        Some(s) => s.to_vec(),
        None => vec![T::zero(); b * hpn],
    };
    for bi in 0..b {
        let s = &mut fin[bi * hpn..(bi + 1) * hpn];
        for k in 0..nc {
            let slab = &mut states[(bi * nc + k) * hpn..][..hpn];
            for hi in 0..h {
                let dec = decays[(bi * nc + k) * h + hi];
                for (sv, lv) in
                    s[hi * pn..(hi + 1) * pn].iter_mut().zip(slab[hi * pn..(hi + 1) * pn].iter_mut())
                {
                    let next = dec * *sv + *lv;
                    *lv = *sv;
                    *sv = next;
                }
            }
        }
    }
    (states, fin)
}

/// The chunked forward for compute type `T`.
fn forward_t<T: Float>(args: &SsdArgs, dm: SsdDims) -> Result<SsdOutput> {
    let SsdDims { b, l, h, p, g, n } = dm;
    let pr = prepare::<T>(args, dm)?;
    let init = args.initial_state.map(load::<T>).transpose()?;
    let (states, fin) = chunk_states(&pr, dm, init.as_deref());
    let (q, nc, hpg, pn) = (pr.q, pr.nc, h / g, p * n);

    let mut y = vec![T::zero(); b * l * h * p];
    let sizes = (0..b).flat_map(|_| (0..nc).map(|k| q.min(l - k * q) * h * p));
    let tasks: Vec<_> = split_sizes(&mut y, sizes).into_iter().enumerate().collect();
    let work = l * h * (q * p + pn);
    run_tasks(tasks, b * work, |(task, yk)| {
        let (bi, k) = (task / nc, task % nc);
        let ci = ChunkInfo::new(&pr, l, bi, k);
        let qq = ci.q;
        let mut gmat = vec![T::zero(); qq * qq];
        let mut emat = vec![T::zero(); qq * qq];
        let mut mmat = vec![T::zero(); qq * qq];
        for gi in 0..g {
            let boff = ((bi * l + ci.t0) * g + gi) * n;
            gemm_to_lower(qq, n, mat(&pr.cm, boff, g * n, 1), mat(&pr.bm, boff, 1, g * n), &mut gmat);
            // Y[:, group heads] = C [S_hᵀ ...] (one GEMM for the group), scaled by e per head.
            let soff = ((bi * nc + k) * h + gi * hpg) * pn;
            let m = hpg * p;
            gemm(qq, m, n, yk, gi * m, h * p, false, mat(&pr.cm, boff, g * n, 1), mat(&states, soff, 1, n));
            for hi in gi * hpg..(gi + 1) * hpg {
                let hc = head_chunk(&pr, dm, bi, hi, &ci);
                for i in 0..qq {
                    for v in &mut yk[i * h * p + hi * p..][..p] {
                        *v = *v * hc.e[i];
                    }
                }
                build_m(&ci, &hc, &gmat, &mut emat, &mut mmat);
                let xoff = ((bi * l + ci.t0) * h + hi) * p;
                gemm_lower(qq, p, &mmat, mat(&pr.x, xoff, h * p, 1), yk, hi * p, h * p, true);
                if let Some(d) = &pr.d {
                    for i in 0..qq {
                        let xr = &pr.x[xoff + i * h * p..][..p];
                        for ((o, &xv), &dv) in
                            yk[i * h * p + hi * p..][..p].iter_mut().zip(xr).zip(&d[hi * p..])
                        {
                            *o = *o + dv * xv;
                        }
                    }
                }
            }
        }
    });
    let dt = args.x.dtype();
    Ok(SsdOutput {
        y: to_tensor(y, &[b, l, h, p], dt)?,
        final_state: to_tensor(fin, &[b, h, p, n], dt)?,
        saved: SsdSaved {
            chunk_states: Tensor::from_vec(states, vec![b, nc, h, p, n], &Device::Cpu)?,
            chunk_size: q,
        },
    })
}

/// See [`crate::ops::ssd`] (arguments already checked).
pub fn forward(args: &SsdArgs, dm: SsdDims) -> Result<SsdOutput> {
    match args.x.dtype() {
        DType::F64 => forward_t::<f64>(args, dm),
        _ => forward_t::<f32>(args, dm),
    }
}

/// Per-(batch, chunk) partial sums of the per-head gradients.
struct Partials<T> {
    a: Vec<T>,
    d: Vec<T>,
    bias: Vec<T>,
}

fn backward_t<T: Float>(
    args: &SsdArgs,
    dm: SsdDims,
    saved: &SsdSaved,
    grad_y: &Tensor,
    grad_fin: Option<&Tensor>,
) -> Result<SsdGrads> {
    let SsdDims { b, l, h, p, g, n } = dm;
    let pr = prepare::<T>(args, dm)?;
    let (q, nc, hpg, pn, hpn) = (pr.q, pr.nc, h / g, p * n, h * p * n);
    let states = load::<T>(&saved.chunk_states)?;
    let gy = load::<T>(grad_y)?;
    let gfin = grad_fin.map(load::<T>).transpose()?;

    // Pass R: the gradient of the state at the end of every chunk, (b, nc, h, p, n), and of the
    // initial state. Each chunk's own part, Σ_i e_i dY_i C_iᵀ, is one GEMM per group.
    let mut dsend = per_chunk_slabs(&pr, dm, |bi, _k, ci, out| {
        let mut edy = vec![T::zero(); ci.q * hpg * p];
        for gi in 0..g {
            let es: Vec<Vec<T>> = group_heads(&pr, dm, bi, gi, ci).into_iter().map(|hc| hc.e).collect();
            let yoff = ((bi * l + ci.t0) * h + gi * hpg) * p;
            scale_heads(&gy, yoff, h * p, p, &es, &mut edy);
            let coff = ((bi * l + ci.t0) * g + gi) * n;
            let m = hpg * p;
            gemm(m, n, ci.q, out, gi * hpg * pn, n, false, mat(&edy, 0, 1, m), mat(&pr.cm, coff, g * n, 1));
        }
    });
    let decays = end_decays(&pr, dm);
    let mut dinit = match &gfin {
        Some(v) => v.to_vec(),
        None => vec![T::zero(); b * hpn],
    };
    for bi in 0..b {
        let ds = &mut dinit[bi * hpn..(bi + 1) * hpn];
        for k in (0..nc).rev() {
            let slab = &mut dsend[(bi * nc + k) * hpn..][..hpn];
            for hi in 0..h {
                let dec = decays[(bi * nc + k) * h + hi];
                for (dv, lv) in
                    ds[hi * pn..(hi + 1) * pn].iter_mut().zip(slab[hi * pn..(hi + 1) * pn].iter_mut())
                {
                    let prev = dec * *dv + *lv;
                    *lv = *dv;
                    *dv = prev;
                }
            }
        }
    }

    // Pass G: every gradient, per (batch, chunk).
    let mut dx = vec![T::zero(); b * l * h * p];
    let mut ddt = vec![T::zero(); b * l * h];
    let mut db = vec![T::zero(); b * l * g * n];
    let mut dc = vec![T::zero(); b * l * g * n];
    let qs = || (0..b).flat_map(|_| (0..nc).map(|k| q.min(l - k * q)));
    let tasks: Vec<_> = split_sizes(&mut dx, qs().map(|s| s * h * p))
        .into_iter()
        .zip(split_sizes(&mut ddt, qs().map(|s| s * h)))
        .zip(split_sizes(&mut db, qs().map(|s| s * g * n)))
        .zip(split_sizes(&mut dc, qs().map(|s| s * g * n)))
        .enumerate()
        .collect();
    let n_tasks = tasks.len();
    let mut partials: Vec<Option<Partials<T>>> = (0..n_tasks).map(|_| None).collect();
    let slots = split_sizes(&mut partials, std::iter::repeat_n(1, n_tasks));
    let tasks: Vec<_> = tasks.into_iter().zip(slots).collect();
    let work = l * h * (2 * q * p + 5 * pn);
    let (pr, states, gy, dsend) = (&pr, &states, &gy, &dsend);
    run_tasks(tasks, b * work, |((task, (((dxk, ddtk), dbk), dck)), slot)| {
        let (bi, k) = (task / nc, task % nc);
        let ci = ChunkInfo::new(pr, l, bi, k);
        let qq = ci.q;
        let m = hpg * p;
        let z = || vec![T::zero(); qq * qq];
        let (mut gmat, mut emat, mut mmat, mut dmmat, mut dgsum) = (z(), z(), z(), z(), z());
        let zq = || vec![T::zero(); qq * m];
        let (mut v, mut bds, mut xw, mut edy) = (zq(), zq(), zq(), zq());
        let mut part =
            Partials { a: vec![T::zero(); h], d: vec![T::zero(); h * p], bias: vec![T::zero(); h] };
        for gi in 0..g {
            let boff = ((bi * l + ci.t0) * g + gi) * n;
            let soff = ((bi * nc + k) * h + gi * hpg) * pn;
            let goff = ((bi * l + ci.t0) * h + gi * hpg) * p;
            let hcs = group_heads(pr, dm, bi, gi, &ci);
            gemm_to_lower(qq, n, mat(&pr.cm, boff, g * n, 1), mat(&pr.bm, boff, 1, g * n), &mut gmat);
            dgsum.fill(T::zero());
            // Group-wide GEMMs: V = C [S_hᵀ], BdS = B [dSe_hᵀ], dB += (w∘X) [dSe_h], dC += (e∘dY) [S_h].
            gemm(qq, m, n, &mut v, 0, m, false, mat(&pr.cm, boff, g * n, 1), mat(states, soff, 1, n));
            gemm(qq, m, n, &mut bds, 0, m, false, mat(&pr.bm, boff, g * n, 1), mat(dsend, soff, 1, n));
            let ws: Vec<Vec<T>> = hcs.iter().map(|hc| hc.w.clone()).collect();
            scale_heads(&pr.x, goff, h * p, p, &ws, &mut xw);
            gemm(qq, n, m, dbk, gi * n, g * n, true, mat(&xw, 0, m, 1), mat(dsend, soff, n, 1));
            let es: Vec<Vec<T>> = hcs.iter().map(|hc| hc.e.clone()).collect();
            scale_heads(gy, goff, h * p, p, &es, &mut edy);
            gemm(qq, n, m, dck, gi * n, g * n, true, mat(&edy, 0, m, 1), mat(states, soff, n, 1));

            for (hl, hc) in hcs.iter().enumerate() {
                let hi = gi * hpg + hl;
                build_m(&ci, hc, &gmat, &mut emat, &mut mmat);
                let hsoff = soff + hl * pn;
                let xoff = ((bi * l + ci.t0) * h + hi) * p;
                let dym = mat(gy, xoff, h * p, 1);
                let mut dcs = vec![T::zero(); qq];
                let mut ddtp = vec![T::zero(); qq];
                let mut colsum = vec![T::zero(); qq];
                let mut prow = vec![T::zero(); qq];

                // Intra-chunk: Y += M X, M = G ∘ exp(segsum) ∘ dt'.
                gemm_to_lower(qq, p, dym, mat(&pr.x, xoff, 1, h * p), &mut dmmat);
                // P_ij = dM_ij M_ij: d cs_i += Σ_j P_ij, d cs_j -= Σ_i P_ij; d dt'_j += Σ_i P_ij / dt'_j.
                for i in 0..qq {
                    let (lo, r) = (ci.lo[i], i * qq);
                    let rng = r + lo..=r + i;
                    let it = dmmat[rng.clone()]
                        .iter()
                        .zip(&emat[rng.clone()])
                        .zip(&gmat[rng.clone()])
                        .zip(dgsum[rng].iter_mut())
                        .zip(&hc.dtp[lo..=i])
                        .zip(colsum[lo..=i].iter_mut())
                        .zip(ddtp[lo..=i].iter_mut())
                        .zip(prow[lo..=i].iter_mut());
                    for (((((((&dmv, &ev), &gv), dg), &dtv), cs), dd), pr) in it {
                        let de = dmv * ev;
                        let qv = de * gv;
                        *dg = *dg + de * dtv;
                        let pv = qv * dtv;
                        *cs = *cs + pv;
                        *dd = *dd + qv;
                        *pr = pv;
                    }
                    dcs[i] = dcs[i] + sum8(&prow[lo..=i]);
                }
                for (d, &c) in dcs.iter_mut().zip(&colsum) {
                    *d = *d - c;
                }
                let dxo = hi * p;
                gemm_lower_t(qq, p, &mmat, dym, dxk, dxo, h * p, false);

                // Chunk end state S_end = decay_end S + Xᵀ diag(w) B: dX += w ∘ (B dSeᵀ),
                // dw_j = x_j · (B dSeᵀ)_j.
                let last = qq - 1;
                for j in 0..qq {
                    let br = &bds[j * m + hl * p..][..p];
                    let xr = &pr.x[xoff + j * h * p..][..p];
                    let dxr = &mut dxk[j * h * p + dxo..][..p];
                    let mut dw = T::zero();
                    for ((o, &bv), &xv) in dxr.iter_mut().zip(br).zip(xr) {
                        *o = *o + hc.w[j] * bv;
                        dw = dw + xv * bv;
                    }
                    let t = dw * hc.w[j];
                    dcs[last] = dcs[last] + t;
                    dcs[j] = dcs[j] - t;
                    ddtp[j] = ddtp[j] + dw * hc.ew[j];
                }
                if hc.decay_end != T::zero() {
                    let s = &states[hsoff..hsoff + pn];
                    let ds = &dsend[hsoff..hsoff + pn];
                    let dot: T = s.iter().zip(ds).map(|(&a, &b)| a * b).sum();
                    dcs[last] = dcs[last] + dot * hc.decay_end;
                }

                // Inter-chunk output: Y += diag(e) C Sᵀ.
                for i in 0..qq {
                    let dyr = &gy[xoff + i * h * p..][..p];
                    let de: T = dyr.iter().zip(&v[i * m + hl * p..][..p]).map(|(&a, &b)| a * b).sum();
                    dcs[i] = dcs[i] + de * hc.e[i];
                }

                // Skip: Y += D ∘ X.
                if let Some(d) = &pr.d {
                    for i in 0..qq {
                        let dyr = &gy[xoff + i * h * p..][..p];
                        let xr = &pr.x[xoff + i * h * p..][..p];
                        let dxr = &mut dxk[i * h * p + dxo..][..p];
                        for pp in 0..p {
                            dxr[pp] = dxr[pp] + d[hi * p + pp] * dyr[pp];
                            part.d[hi * p + pp] = part.d[hi * p + pp] + dyr[pp] * xr[pp];
                        }
                    }
                }

                // cs -> a -> dt' -> dt.
                let mut acc = T::zero();
                for j in (0..qq).rev() {
                    acc = acc + dcs[j];
                    ddtp[j] = ddtp[j] + acc * pr.a[hi];
                    part.a[hi] = part.a[hi] + acc * hc.dtp[j];
                    let gd = ddtp[j] * pr.dtp_grad[(bi * l + ci.t0 + j) * h + hi];
                    ddtk[j * h + hi] = gd;
                    part.bias[hi] = part.bias[hi] + gd;
                }
            }
            // dC += dG B, dB += dGᵀ C (dG summed over the group's heads).
            gemm_lower(qq, n, &dgsum, mat(&pr.bm, boff, g * n, 1), dck, gi * n, g * n, true);
            gemm_lower_t(qq, n, &dgsum, mat(&pr.cm, boff, g * n, 1), dbk, gi * n, g * n, true);
        }
        slot[0] = Some(part);
    });

    // Per-head sums in task order (deterministic).
    let mut da = vec![T::zero(); h];
    let mut dd = vec![T::zero(); h * p];
    let mut dbias = vec![T::zero(); h];
    for part in partials.into_iter().flatten() {
        for i in 0..h {
            da[i] = da[i] + part.a[i];
            dbias[i] = dbias[i] + part.bias[i];
        }
        for (o, &v) in dd.iter_mut().zip(&part.d) {
            *o = *o + v;
        }
    }
    let dt = args.x.dtype();
    let d = match args.d {
        Some(t) if t.rank() == 1 => {
            let v: Vec<T> = (0..h).map(|hi| dd[hi * p..(hi + 1) * p].iter().copied().sum()).collect();
            Some(to_tensor(v, &[h], dt)?)
        }
        Some(_) => Some(to_tensor(dd, &[h, p], dt)?),
        None => None,
    };
    Ok(SsdGrads {
        x: to_tensor(dx, &[b, l, h, p], dt)?,
        dt: to_tensor(ddt, &[b, l, h], dt)?,
        a: to_tensor(da, &[h], dt)?,
        b: to_tensor(db, &[b, l, g, n], dt)?,
        c: to_tensor(dc, &[b, l, g, n], dt)?,
        d,
        dt_bias: if args.dt_bias.is_some() { Some(to_tensor(dbias, &[h], dt)?) } else { None },
        initial_state: if args.initial_state.is_some() {
            Some(to_tensor(dinit, &[b, h, p, n], dt)?)
        } else {
            None
        },
    })
}

/// See [`crate::ops::ssd_backward`] (arguments already checked).
pub fn backward(
    args: &SsdArgs,
    dm: SsdDims,
    saved: &SsdSaved,
    grad_y: &Tensor,
    grad_final_state: Option<&Tensor>,
) -> Result<SsdGrads> {
    match args.x.dtype() {
        DType::F64 => backward_t::<f64>(args, dm, saved, grad_y, grad_final_state),
        _ => backward_t::<f32>(args, dm, saved, grad_y, grad_final_state),
    }
}

fn state_update_t<T: Float>(args: &SsdStepArgs, dm: SsdDims) -> Result<(Tensor, Tensor)> {
    let SsdDims { b, h, p, g, n, .. } = dm;
    let hpg = h / g;
    let x = load::<T>(args.x)?;
    let dt = load::<T>(args.dt)?;
    let a = load::<T>(args.a)?;
    let bm = load::<T>(args.b)?;
    let cm = load::<T>(args.c)?;
    let bias = args.dt_bias.map(load::<T>).transpose()?;
    let d = match args.d {
        Some(t) => {
            let v = load::<T>(t)?.into_owned();
            Some(if t.rank() == 1 { (0..h * p).map(|i| v[i / p]).collect::<Vec<_>>() } else { v })
        }
        None => None,
    };
    let mut s = load::<T>(args.state)?.into_owned();
    let mut y = vec![T::zero(); b * h * p];
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / hpg;
            let raw = dt[bi * h + hi] + bias.as_ref().map_or(T::zero(), |v| v[hi]);
            let dtp = if args.dt_softplus { softplus(raw).0 } else { raw };
            let decay = (dtp * a[hi]).exp();
            let brow = &bm[(bi * g + gi) * n..][..n];
            let crow = &cm[(bi * g + gi) * n..][..n];
            for pi in 0..p {
                let xv = x[(bi * h + hi) * p + pi];
                let sr = &mut s[((bi * h + hi) * p + pi) * n..][..n];
                let mut acc = T::zero();
                for ((sv, &bv), &cv) in sr.iter_mut().zip(brow).zip(crow) {
                    *sv = decay * *sv + dtp * xv * bv;
                    acc = acc + *sv * cv;
                }
                if let Some(d) = &d {
                    acc = acc + d[hi * p + pi] * xv;
                }
                y[(bi * h + hi) * p + pi] = acc;
            }
        }
    }
    let dt = args.x.dtype();
    Ok((to_tensor(y, &[b, h, p], dt)?, to_tensor(s, &[b, h, p, n], dt)?))
}

/// See [`crate::ops::ssd_state_update`] (arguments already checked).
pub fn state_update(args: &SsdStepArgs, dm: SsdDims) -> Result<(Tensor, Tensor)> {
    match args.x.dtype() {
        DType::F64 => state_update_t::<f64>(args, dm),
        _ => state_update_t::<f32>(args, dm),
    }
}
