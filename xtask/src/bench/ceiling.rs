//! The machine's ceilings, measured in the same run as the kernels they judge.
//!
//! - **FMA peak** (GFLOP/s, f32): a loop of independent fused multiply-adds that lives in
//!   registers, run on every rayon thread at once ([`rayon::broadcast`]; `RAYON_NUM_THREADS`
//!   sets how many). Deliberately not a GEMM, so that a GEMM can be judged against it. Each thread
//!   keeps enough independent accumulator chains to cover the FMA latency on every FMA pipe
//!   (Zen 3: 2 pipes × latency 4–5 ⇒ ≥ 10 chains; we use 12 ymm chains for AVX2, 16 zmm for
//!   AVX-512, 16 q-registers for NEON). The widest instruction set the CPU has is used: AVX-512F,
//!   else AVX2+FMA, else NEON on aarch64, else a portable loop of multiply-adds on 32 floats
//!   (which the compiler vectorises as it can).
//! - **Copy bandwidth** (GB/s): a parallel copy of a large buffer (256 MiB → 256 MiB in the full
//!   run), one contiguous piece per thread, counted as bytes read + bytes written; the best of
//!   several repetitions (at least 1 GiB of traffic in all).

use std::time::Instant;

use rayon::prelude::*;

use super::harness::Size;

/// Both ceilings and how they were measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceilings {
    /// Threads the measurements ran on (the rayon pool).
    pub threads: usize,
    /// FMA peak, f32 GFLOP/s, all threads together.
    pub fma_gflops: f64,
    /// The instruction set of the FMA loop (`avx512`, `avx2+fma`, `neon`, `portable`).
    pub fma_isa: &'static str,
    /// Copy bandwidth, GB/s (10⁹ bytes), read + write.
    pub copy_gbps: f64,
    /// Size of the copied buffer, bytes.
    pub copy_bytes: usize,
}

impl Ceilings {
    /// Measures both ceilings on the CPU, at the effort `size` asks for.
    pub fn measure(size: Size) -> Ceilings {
        let (iters, fma_reps, copy_bytes, copy_reps) = match size {
            Size::Full => (20_000_000, 7, 256 << 20, 6),
            Size::Quick => (2_000_000, 3, 32 << 20, 3),
            Size::Tiny => (100_000, 2, 1 << 20, 2),
        };
        let (fma_gflops, fma_isa) = fma_peak(iters, fma_reps);
        Ceilings {
            threads: rayon::current_num_threads(),
            fma_gflops,
            fma_isa,
            copy_gbps: copy_bandwidth(copy_bytes, copy_reps),
            copy_bytes,
        }
    }
}

/// One thread's FMA loop: `iters` iterations, returns a value depending on every chain (so the
/// loop cannot be removed) and the flops one call performs.
type FmaLoop = fn(usize, f32) -> (f32, f64);

/// The best FMA loop this CPU runs, and its name.
fn pick_fma_loop() -> (FmaLoop, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected.
            return (|n, s| (unsafe { x86::fma_avx512(n, s) }, x86::flops_avx512(n)), "avx512");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected.
            return (|n, s| (unsafe { x86::fma_avx2(n, s) }, x86::flops_avx2(n)), "avx2+fma");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            // SAFETY: NEON was detected.
            return (|n, s| (unsafe { arm::fma_neon(n, s) }, arm::flops_neon(n)), "neon");
        }
    }
    (|n, s| (fma_portable(n, s), flops_portable(n)), "portable")
}

/// The FMA peak in GFLOP/s (best of `reps` runs of `iters` iterations on every rayon thread) and
/// the instruction set used.
pub fn fma_peak(iters: usize, reps: usize) -> (f64, &'static str) {
    let (f, isa) = pick_fma_loop();
    let mut best = 0.0f64;
    for rep in 0..reps.max(1) + 1 {
        let t = Instant::now();
        let out = rayon::broadcast(|ctx| f(iters, 1.0 + ctx.index() as f32 * 1e-3));
        let dt = t.elapsed().as_secs_f64();
        let flops: f64 = out.iter().map(|r| r.1).sum();
        std::hint::black_box(out.iter().map(|r| r.0).sum::<f32>());
        // The first run wakes the threads and raises the clocks: not counted.
        if rep > 0 && dt > 0.0 {
            best = best.max(flops / dt / 1e9);
        }
    }
    (best, isa)
}

const PORTABLE_CHAINS: usize = 32;

/// Multiply-adds on 32 independent floats: the fallback where no FMA intrinsics are known.
fn fma_portable(iters: usize, seed: f32) -> f32 {
    let m = std::hint::black_box(0.999_999f32);
    let a = std::hint::black_box(1e-7f32);
    let mut c = [seed; PORTABLE_CHAINS];
    for _ in 0..iters {
        for r in c.iter_mut() {
            *r = *r * m + a;
        }
    }
    c.iter().sum()
}

fn flops_portable(iters: usize) -> f64 {
    (iters * PORTABLE_CHAINS * 2) as f64
}

// The AVX-512 intrinsics are stable since Rust 1.89, above the workspace's declared
// rust-version; the toolchain the project builds with (1.95) has them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::incompatible_msrv)]
mod x86 {
    use std::arch::x86_64::*;

    const AVX2_CHAINS: usize = 12;
    const AVX512_CHAINS: usize = 16;

    /// Flops of one [`fma_avx2`] call: chains × 8 lanes × 2.
    pub fn flops_avx2(iters: usize) -> f64 {
        (iters * AVX2_CHAINS * 8 * 2) as f64
    }

    /// Flops of one [`fma_avx512`] call: chains × 16 lanes × 2.
    pub fn flops_avx512(iters: usize) -> f64 {
        (iters * AVX512_CHAINS * 16 * 2) as f64
    }

    /// 12 independent ymm FMA chains that never touch memory.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(iters: usize, seed: f32) -> f32 {
        let m = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let a = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut c = [_mm256_set1_ps(seed); AVX2_CHAINS];
        for _ in 0..iters {
            for r in c.iter_mut() {
                *r = _mm256_fmadd_ps(*r, m, a);
            }
        }
        let mut s = _mm256_setzero_ps();
        for r in c {
            s = _mm256_add_ps(s, r);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    /// 16 independent zmm FMA chains that never touch memory.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(iters: usize, seed: f32) -> f32 {
        let m = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let a = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut c = [_mm512_set1_ps(seed); AVX512_CHAINS];
        for _ in 0..iters {
            for r in c.iter_mut() {
                *r = _mm512_fmadd_ps(*r, m, a);
            }
        }
        let mut s = _mm512_setzero_ps();
        for r in c {
            s = _mm512_add_ps(s, r);
        }
        _mm512_reduce_add_ps(s)
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    const NEON_CHAINS: usize = 16;

    /// Flops of one [`fma_neon`] call: chains × 4 lanes × 2.
    pub fn flops_neon(iters: usize) -> f64 {
        (iters * NEON_CHAINS * 4 * 2) as f64
    }

    /// 16 independent q-register FMA chains that never touch memory.
    #[target_feature(enable = "neon")]
    pub unsafe fn fma_neon(iters: usize, seed: f32) -> f32 {
        let m = vdupq_n_f32(std::hint::black_box(0.999_999));
        let a = vdupq_n_f32(std::hint::black_box(1e-7));
        let mut c = [vdupq_n_f32(seed); NEON_CHAINS];
        for _ in 0..iters {
            for r in c.iter_mut() {
                // a + r * m
                *r = vfmaq_f32(a, *r, m);
            }
        }
        let mut s = vdupq_n_f32(0.0);
        for r in c {
            s = vaddq_f32(s, r);
        }
        vaddvq_f32(s)
    }
}

/// Copy bandwidth in GB/s (read + write bytes per second): the best of `reps` parallel copies of
/// a `bytes`-byte buffer, one contiguous piece per rayon thread.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1);
    let threads = rayon::current_num_threads().max(1);
    let piece = n.div_ceil(threads);
    // Written in parallel so every page is touched (and, on NUMA machines, placed) before timing.
    let src: Vec<u64> = (0..n as u64).into_par_iter().collect();
    let mut dst = vec![0u64; n];
    dst.par_chunks_mut(piece).for_each(|c| c.fill(1));
    let mut best = f64::INFINITY;
    for rep in 0..reps.max(1) + 1 {
        let t = Instant::now();
        dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| d.copy_from_slice(s));
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(&dst);
        if rep > 0 {
            best = best.min(dt);
        }
    }
    if dst[n - 1] != src[n - 1] {
        // Cannot happen; keeps the copy observable.
        return 0.0;
    }
    (2 * n * 8) as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_positive_and_finite() {
        let c = Ceilings::measure(Size::Tiny);
        assert!(c.fma_gflops.is_finite() && c.fma_gflops > 0.0, "{c:?}");
        assert!(c.copy_gbps.is_finite() && c.copy_gbps > 0.0, "{c:?}");
        assert_eq!(c.threads, rayon::current_num_threads());
    }

    #[test]
    fn portable_loop_computes_the_recurrence() {
        // c ← c·m + a from c = 1 converges towards a / (1 - m) = 0.1; after a few steps it is
        // still close to 1 and equal on every chain.
        let s = fma_portable(3, 1.0);
        let one = ((1.0f32 * 0.999_999 + 1e-7) * 0.999_999 + 1e-7) * 0.999_999 + 1e-7;
        assert!((s - PORTABLE_CHAINS as f32 * one).abs() < 1e-4, "{s}");
    }
}
