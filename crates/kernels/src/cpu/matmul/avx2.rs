//! A BLIS-style f32 GEMM for x86-64 with AVX2 and FMA.
//!
//! `C (m×n, row-major, leading dim ldc) = A (m×k) · B (k×n)`, with A and B read through arbitrary
//! (row, column) strides: transposed and narrowed views are packed straight from their storage.
//!
//! Structure (the five loops of BLIS, Van Zee & van de Geijn 2015):
//! ```text
//! for jc in 0..n step NC                  B block: KC × NC, packed once, shared by all threads (L3)
//!   for pc in 0..k step KC
//!     pack B[pc.., jc..] into NR-column micro-panels (p-major: 16 floats per k step)
//!     for ic in 0..m step MC               ← the parallel loop (rayon), A block packed per task (L2)
//!       pack A[ic.., pc..] into MR-row micro-panels (p-major: 6 floats per k step)
//!       for jr in 0..nc step NR            B micro-panel: KC × 16 floats, stays in L1
//!         for ir in 0..mc step MR
//!           6×16 micro-kernel: 12 ymm accumulators, 2 ymm of B, 1 broadcast of A per row
//! ```
//! Blocking for AMD Zen 3 (32 KiB L1d, 512 KiB L2 per core, 32 MiB L3 shared):
//! - MR × NR = 6 × 16: 12 accumulators + 2 B vectors + 1 A broadcast = 15 of the 16 ymm registers;
//!   per k step 12 FMAs (6 cycles on two FMA pipes) against 2 loads + 6 broadcasts (3 load ports);
//! - KC = 384 (at most; k is split into equal blocks): a B micro-panel is 384 × 16 × 4 B =
//!   24 KiB of the 32 KiB L1d, the A micro-panel (9 KiB) streams through from L2. Measured at
//!   1024³ on 2 threads: KC 256 gave 69-80 % of the FMA peak, KC 384 and 512 gave 83-86 %
//!   (fewer read-modify-write passes over C, fewer packing rounds); MC mattered little (72-264);
//! - MC = 144 (at most; balanced so that threads get equal row counts): an A block is
//!   144 × 384 × 4 B = 216 KiB, inside the 512 KiB L2;
//! - NC = 4080 (a multiple of 16): a B block is at most 4 MiB, inside L3.
//!
//! Edge tiles (m or n not a multiple of 6 or 16) are zero-padded in the packed panels; the
//! micro-kernel computes a full 6×16 tile into a stack buffer and only the valid part is added
//! to C. Packed buffers start on 64-byte boundaries (no cache-line-split loads of B) and are
//! kept per thread between calls. Throughput measured on the 2-core Zen 3 VM this crate is
//! developed on: see the module docs of `cpu::matmul`.

#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of the micro-tile.
pub const MR: usize = 6;
/// Columns of the micro-tile (two ymm vectors).
pub const NR: usize = 16;

/// Cache-blocking parameters of the blocked GEMM (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// Rows of A per packed block (rounded up to a multiple of [`MR`]).
    pub mc: usize,
    /// Depth of one packed block (the k step).
    pub kc: usize,
    /// Columns of B per packed block (rounded up to a multiple of [`NR`]).
    pub nc: usize,
}

impl Blocking {
    /// The defaults tuned for Zen 3 (see the module docs).
    pub const DEFAULT: Blocking = Blocking { mc: 144, kc: 384, nc: 4080 };
}

/// A read-only strided matrix: element `(i, j)` is `data[off + i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    /// The storage.
    pub data: &'a [f32],
    /// Offset of element (0, 0).
    pub off: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

/// A raw pointer that may cross threads: the tasks that receive it write disjoint tiles.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint regions of one buffer from rayon tasks that end before
// the buffer's borrow does.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether this CPU can run [`sgemm`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// A `len`-float slice of `buf` starting on a 64-byte (cache-line) boundary, so that the
/// micro-kernel's 32-byte loads of packed B never straddle two cache lines. Its contents are
/// stale: the packing routines overwrite every element, padding included.
fn aligned_slice(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let off = buf.as_ptr().align_offset(64).min(16);
    &mut buf[off..off + len]
}

thread_local! {
    /// Per-thread packing buffers, reused across calls (taken out while in use, so a nested
    /// call on the same thread just allocates its own).
    static PACK_A: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static PACK_B: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// `c[i * ldc + j] = Σ_p a(i, p) · b(p, j)` for `i < m`, `j < n` (overwrites, never reads, `c`).
///
/// `parallel` spreads the work over the rayon pool. Panics if `c` is too short or the strided
/// operands reach past their slices (callers derive them from validated layouts), or if the CPU
/// lacks AVX2/FMA (check [`available`] first).
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    blocking: Blocking,
    parallel: bool,
) {
    assert!(available(), "sgemm: AVX2+FMA required");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "sgemm: output too short");
    if k == 0 {
        for i in 0..m {
            c[i * ldc..i * ldc + n].fill(0.0);
        }
        return;
    }
    let check = |x: MatRef<'_>, r: usize, cc: usize| x.off + (r - 1) * x.rs + (cc - 1) * x.cs < x.data.len();
    assert!(check(a, m, k) && check(b, k, n), "sgemm: operand out of bounds");

    // Balanced k blocks: 1024 = 3 × 342 rather than 384 + 384 + 256.
    let kc_max = k.div_ceil(k.div_ceil(blocking.kc.max(1)));
    let nc_max = round_up(blocking.nc.max(1), NR);
    let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
    // Balanced row blocks: as many as MC allows, rounded up to a multiple of the thread count.
    let mut n_ic = m.div_ceil(round_up(blocking.mc.max(1), MR));
    if threads > 1 {
        n_ic = round_up(n_ic, threads);
    }
    let mc = round_up(m.div_ceil(n_ic), MR);
    let n_ic = m.div_ceil(mc);

    let mut bpack: Vec<f32> = PACK_B.take();
    let cptr = SendPtr(c.as_mut_ptr());
    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        let n_panels = nc.div_ceil(NR);
        // With few row blocks, also split the columns so every thread has work.
        let n_jr_groups = if n_ic >= threads { 1 } else { (2 * threads).div_ceil(n_ic).min(n_panels) };
        let panels_per_group = n_panels.div_ceil(n_jr_groups);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let bp = aligned_slice(&mut bpack, n_panels * NR * kc);
            let pack_one = |(jp, dst): (usize, &mut [f32])| {
                let j0 = jc + jp * NR;
                pack_b(b, pc, kc, j0, NR.min(n - j0), dst);
            };
            if threads > 1 && n_panels > 1 {
                bp.par_chunks_mut(NR * kc).enumerate().for_each(pack_one);
            } else {
                bp.chunks_mut(NR * kc).enumerate().for_each(pack_one);
            }
            let accumulate = pc > 0;
            let bp: &[f32] = bp;
            let task = |t: usize| {
                let (ib, g) = (t / n_jr_groups, t % n_jr_groups);
                let ic = ib * mc;
                let mcb = mc.min(m - ic);
                let jp0 = g * panels_per_group;
                let jp1 = (jp0 + panels_per_group).min(n_panels);
                if jp0 >= jp1 {
                    return;
                }
                let m_panels = mcb.div_ceil(MR);
                let mut abuf = PACK_A.take();
                let apack = aligned_slice(&mut abuf, m_panels * MR * kc);
                pack_a(a, ic, mcb, pc, kc, apack);
                for jp in jp0..jp1 {
                    let j0 = jc + jp * NR;
                    let nr = NR.min(n - j0);
                    let bpanel = &bp[jp * NR * kc..(jp + 1) * NR * kc];
                    for ip in 0..m_panels {
                        let i0 = ic + ip * MR;
                        let mr = MR.min(m - i0);
                        let apanel = &apack[ip * MR * kc..(ip + 1) * MR * kc];
                        // SAFETY: AVX2/FMA checked above; the packed panels hold kc steps; the tile
                        // (i0..i0+mr, j0..j0+nr) lies inside c (checked length) and no other task
                        // writes it (tasks own disjoint row blocks × column groups).
                        unsafe {
                            let ct = cptr.get().add(i0 * ldc + j0);
                            if mr == MR && nr == NR {
                                kernel_6x16(kc, apanel.as_ptr(), bpanel.as_ptr(), ct, ldc, accumulate);
                            } else {
                                let mut tile = [0f32; MR * NR];
                                kernel_6x16(
                                    kc,
                                    apanel.as_ptr(),
                                    bpanel.as_ptr(),
                                    tile.as_mut_ptr(),
                                    NR,
                                    false,
                                );
                                for i in 0..mr {
                                    for j in 0..nr {
                                        let dst = ct.add(i * ldc + j);
                                        let v = tile[i * NR + j];
                                        *dst = if accumulate { *dst + v } else { v };
                                    }
                                }
                            }
                        }
                    }
                }
                PACK_A.set(abuf);
            };
            let n_tasks = n_ic * n_jr_groups;
            if threads > 1 && n_tasks > 1 {
                (0..n_tasks).into_par_iter().for_each(task);
            } else {
                (0..n_tasks).for_each(task);
            }
        }
    }
    PACK_B.set(bpack);
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of `a` into MR-row micro-panels: panel `ip` holds,
/// for each `p`, the MR values `a(i0 + ip*MR + i, p0 + p)`, zero past row `mc`.
fn pack_a(a: MatRef<'_>, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
    for (ip, panel) in dst.chunks_mut(MR * kc).enumerate() {
        let r0 = ip * MR;
        let mr = MR.min(mc - r0);
        let base = a.off + (i0 + r0) * a.rs + p0 * a.cs;
        if a.cs == 1 && mr == MR {
            // Row-major A: read each row contiguously, six at once.
            let rows: [&[f32]; MR] = std::array::from_fn(|i| &a.data[base + i * a.rs..base + i * a.rs + kc]);
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                for i in 0..MR {
                    out[i] = rows[i][p];
                }
            }
        } else if a.rs == 1 && mr == MR {
            // Column-major A (a transposed view, e.g. `xᵀ` in a weight gradient): the MR values
            // of each step are contiguous.
            let col = &a.data[base..base + (kc - 1) * a.cs + MR];
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                out.copy_from_slice(&col[p * a.cs..p * a.cs + MR]);
            }
        } else {
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                let src = base + p * a.cs;
                for i in 0..mr {
                    out[i] = a.data[src + i * a.rs];
                }
                out[mr..].fill(0.0);
            }
        }
    }
}

/// Packs rows `p0..p0+kc`, columns `j0..j0+nr` (nr <= NR) of `b` into one NR-column micro-panel:
/// for each `p`, the NR values `b(p0 + p, j0 + j)`, zero past column `nr`.
fn pack_b(b: MatRef<'_>, p0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]) {
    let base = b.off + p0 * b.rs + j0 * b.cs;
    if b.cs == 1 && nr == NR {
        for (p, out) in dst.chunks_exact_mut(NR).enumerate() {
            let s = base + p * b.rs;
            out.copy_from_slice(&b.data[s..s + NR]);
        }
    } else if b.rs == 1 {
        // Column-major B (a transposed view): each column is contiguous over p.
        for j in 0..nr {
            let s = base + j * b.cs;
            let col = &b.data[s..s + kc];
            for (p, &v) in col.iter().enumerate() {
                dst[p * NR + j] = v;
            }
        }
        if nr < NR {
            for out in dst.chunks_exact_mut(NR) {
                out[nr..].fill(0.0);
            }
        }
    } else {
        for (p, out) in dst.chunks_exact_mut(NR).enumerate() {
            let s = base + p * b.rs;
            for j in 0..nr {
                out[j] = b.data[s + j * b.cs];
            }
            out[nr..].fill(0.0);
        }
    }
}

/// The 6×16 micro-kernel: `C[0..6, 0..16] (+)= Σ_p A[p, 0..6]ᵀ B[p, 0..16]` over `kc` packed steps.
///
/// # Safety
/// AVX2 and FMA must be available; `a` must hold `6 * kc` and `b` `16 * kc` floats; `c` must be
/// valid for 6 rows of 16 floats `ldc` apart.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    // Warm the C tile while the loop runs.
    for i in 0..MR {
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 15) as *const i8);
    }
    let mut c00 = _mm256_setzero_ps();
    let mut c01 = _mm256_setzero_ps();
    let mut c10 = _mm256_setzero_ps();
    let mut c11 = _mm256_setzero_ps();
    let mut c20 = _mm256_setzero_ps();
    let mut c21 = _mm256_setzero_ps();
    let mut c30 = _mm256_setzero_ps();
    let mut c31 = _mm256_setzero_ps();
    let mut c40 = _mm256_setzero_ps();
    let mut c41 = _mm256_setzero_ps();
    let mut c50 = _mm256_setzero_ps();
    let mut c51 = _mm256_setzero_ps();
    let mut ap = a;
    let mut bp = b;
    macro_rules! step {
        () => {{
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            let a0 = _mm256_broadcast_ss(&*ap);
            c00 = _mm256_fmadd_ps(a0, b0, c00);
            c01 = _mm256_fmadd_ps(a0, b1, c01);
            let a1 = _mm256_broadcast_ss(&*ap.add(1));
            c10 = _mm256_fmadd_ps(a1, b0, c10);
            c11 = _mm256_fmadd_ps(a1, b1, c11);
            let a2 = _mm256_broadcast_ss(&*ap.add(2));
            c20 = _mm256_fmadd_ps(a2, b0, c20);
            c21 = _mm256_fmadd_ps(a2, b1, c21);
            let a3 = _mm256_broadcast_ss(&*ap.add(3));
            c30 = _mm256_fmadd_ps(a3, b0, c30);
            c31 = _mm256_fmadd_ps(a3, b1, c31);
            let a4 = _mm256_broadcast_ss(&*ap.add(4));
            c40 = _mm256_fmadd_ps(a4, b0, c40);
            c41 = _mm256_fmadd_ps(a4, b1, c41);
            let a5 = _mm256_broadcast_ss(&*ap.add(5));
            c50 = _mm256_fmadd_ps(a5, b0, c50);
            c51 = _mm256_fmadd_ps(a5, b1, c51);
            ap = ap.add(MR);
            bp = bp.add(NR);
        }};
    }
    let mut p = 0;
    while p + 4 <= kc {
        step!();
        step!();
        step!();
        step!();
        p += 4;
    }
    while p < kc {
        step!();
        p += 1;
    }
    macro_rules! store_row {
        ($i:expr, $x0:expr, $x1:expr) => {{
            let r = c.add($i * ldc);
            if accumulate {
                _mm256_storeu_ps(r, _mm256_add_ps(_mm256_loadu_ps(r), $x0));
                _mm256_storeu_ps(r.add(8), _mm256_add_ps(_mm256_loadu_ps(r.add(8)), $x1));
            } else {
                _mm256_storeu_ps(r, $x0);
                _mm256_storeu_ps(r.add(8), $x1);
            }
        }};
    }
    store_row!(0, c00, c01);
    store_row!(1, c10, c11);
    store_row!(2, c20, c21);
    store_row!(3, c30, c31);
    store_row!(4, c40, c41);
    store_row!(5, c50, c51);
}
