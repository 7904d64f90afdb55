//! Measures f32 GEMM throughput at 1024³ against the machine's FMA peak, in one run.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p moeba-kernels --example matmul_peak [size]
//! ```
//!
//! Prints, each as the best of several runs:
//! - the FMA peak: a register-only loop of independent 256-bit FMAs (AVX2+FMA) on every rayon
//!   thread, the ceiling any f32 GEMM can reach here;
//! - the `gemm` crate alone (`Parallelism::Rayon(threads)`), and the `gemm` crate run
//!   single-threaded on a two-way split of the output's rows;
//! - `moeba_kernels::ops::matmul` (what the rest of moeba uses), and its fraction of the peak;
//! - five paired rounds (peak, then ops::matmul, back to back) and the best paired ratio, which
//!   is robust to other processes loading the machine for part of the run.

use std::time::Instant;

use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Tensor};
use rayon::prelude::*;

/// FLOP/s of a register-only FMA loop on every rayon thread (0 if the CPU lacks AVX2+FMA).
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return 0.0;
        }
        const ITERS: usize = 20_000_000;
        let threads = rayon::current_num_threads();
        let mut best = 0.0f64;
        for _ in 0..5 {
            let t = Instant::now();
            let sink: f32 = (0..threads)
                .into_par_iter()
                // SAFETY: the features were detected above.
                .map(|i| unsafe { fma_loop(ITERS, i as f32) })
                .sum();
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(sink);
            // 12 chains × 8 lanes × 2 flops per iteration.
            let flops = (threads * ITERS * 12 * 8 * 2) as f64;
            best = best.max(flops / dt);
        }
        best
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0.0
    }
}

/// 12 independent FMA chains (enough to cover latency 4 × 2 pipes) that never touch memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(0.999_999);
    let a = _mm256_set1_ps(1e-7);
    let mut c = [_mm256_set1_ps(seed); 12];
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
    // SAFETY: `out` holds 8 f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let threads = rayon::current_num_threads();
    let flops = 2.0 * (n * n * n) as f64;
    println!("f32 {n}x{n}x{n}, {threads} rayon threads");
    let path = moeba_kernels::cpu::matmul::f32_path();
    println!("ops::matmul f32 path: {path}");

    let peak = fma_peak();
    println!("FMA peak (register-only loop):          {:7.1} GFLOP/s", peak / 1e9);

    let a = Tensor::randn(1, (n, n), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let b = Tensor::randn(2, (n, n), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let av = a.to_vec::<f32>()?;
    let bv = b.to_vec::<f32>()?;
    let mut c = vec![0f32; n * n];

    let gemm_call = |c: &mut [f32], rows: std::ops::Range<usize>, par: gemm::Parallelism| {
        let m = rows.len();
        // SAFETY: row-major n×n buffers; the row range lies inside them.
        unsafe {
            gemm::gemm(
                m,
                n,
                n,
                c.as_mut_ptr().add(rows.start * n),
                1,
                n as isize,
                false,
                av.as_ptr().add(rows.start * n),
                1,
                n as isize,
                bv.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    let t = best_of(5, || gemm_call(&mut c, 0..n, gemm::Parallelism::Rayon(threads)));
    let report = |name: &str, t: f64| {
        let g = flops / t;
        let frac = if peak > 0.0 { format!("{:5.1}% of peak", 100.0 * g / peak) } else { String::new() };
        println!("{name:40}{:7.1} GFLOP/s  {:8.3} ms  {frac}", g / 1e9, t * 1e3);
    };
    report("gemm crate, Parallelism::Rayon:", t);

    let t = best_of(5, || {
        let half = n / 2;
        let (top, bottom) = c.split_at_mut(half * n);
        rayon::join(
            || gemm_call(top, 0..half, gemm::Parallelism::None),
            || {
                // `bottom` starts at row `half`: shift the pointer back so row indices line up.
                let m = n - half;
                // SAFETY: as above.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        n,
                        bottom.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        av.as_ptr().add(half * n),
                        1,
                        n as isize,
                        bv.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            },
        );
    });
    report("gemm crate, 2-way row split:", t);

    #[cfg(target_arch = "x86_64")]
    if moeba_kernels::cpu::matmul::avx2::available() {
        use moeba_kernels::cpu::matmul::avx2::{sgemm, Blocking, MatRef};
        let am = MatRef { data: &av, off: 0, rs: n, cs: 1 };
        let bm = MatRef { data: &bv, off: 0, rs: n, cs: 1 };
        let t = best_of(7, || sgemm(n, n, n, am, bm, &mut c, n, Blocking::DEFAULT, threads > 1));
        report("moeba avx2::sgemm, preallocated C:", t);
    }
    let t = best_of(7, || {
        std::hint::black_box(ops::matmul(&a, &b).expect("matmul"));
    });
    report("moeba ops::matmul:", t);
    let bt = b.t()?;
    let t = best_of(5, || {
        std::hint::black_box(ops::matmul(&a, &bt).expect("matmul"));
    });
    report("moeba ops::matmul, b transposed view:", t);

    // Paired rounds: the peak and ops::matmul measured back to back, so that load from other
    // processes (this is a shared 2-core machine) hits both alike.
    let mut best_ratio = 0.0f64;
    for round in 0..5 {
        let p = fma_peak();
        let t = best_of(5, || {
            std::hint::black_box(ops::matmul(&a, &b).expect("matmul"));
        });
        let g = flops / t;
        let ratio = if p > 0.0 { g / p } else { 0.0 };
        best_ratio = best_ratio.max(ratio);
        println!(
            "round {round}: peak {:6.1} GFLOP/s, ops::matmul {:6.1} GFLOP/s = {:5.1}% of peak",
            p / 1e9,
            g / 1e9,
            100.0 * ratio
        );
    }
    println!("best paired ratio ops::matmul / FMA peak: {:5.1}%", 100.0 * best_ratio);

    // MOEBA_SWEEP=1: try other cache blockings of the AVX2 path.
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("MOEBA_SWEEP").is_some() {
        use moeba_kernels::cpu::matmul::{avx2::Blocking, matmul_with_blocking};
        for kc in [256, 384, 512] {
            for mc in [72, 144, 192, 264] {
                let bl = Blocking { mc, kc, nc: 4080 };
                let t = best_of(10, || {
                    std::hint::black_box(matmul_with_blocking(&a, &b, bl).expect("matmul"));
                });
                report(&format!("  blocking mc {mc} kc {kc}:"), t);
            }
        }
    }

    // Check the result once against the gemm crate.
    let ours = ops::matmul(&a, &b)?.to_vec::<f32>()?;
    gemm_call(&mut c, 0..n, gemm::Parallelism::Rayon(threads));
    let max_err = ours.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    println!("max |ops::matmul - gemm| = {max_err:e}");
    Ok(())
}
