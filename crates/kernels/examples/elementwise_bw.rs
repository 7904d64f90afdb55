//! Measures elementwise throughput against the machine's copy bandwidth, in one run.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p moeba-kernels --example elementwise_bw [elements]
//! MOEBA_SIMD=scalar RAYON_NUM_THREADS=2 cargo run --release -p moeba-kernels --example elementwise_bw
//! ```
//!
//! Prints, each as the best of several runs on `elements` f32 values (default 16M):
//! - copy: a parallel `copy_from_slice` into a preallocated buffer (8 bytes per element moved);
//! - add (kernel): `simd::binary_f32` in parallel chunks into a preallocated buffer (12 B/elem),
//!   then the same with non-temporal stores (`simd::binary_f32_stream`);
//! - `ops::add` (what moeba uses: allocates its output every call, 12 B/elem), and its fraction of
//!   the copy bandwidth;
//! - `ops::exp`, `ops::sum_all` and `ops::softmax` (rows of 4096) for reference;
//!
//! and the SIMD path that ran.

use std::time::Instant;

use moeba_kernels::cpu::{par, simd};
use moeba_kernels::{ops, BinaryOp};
use moeba_tensor::{Device, Tensor};
use rayon::prelude::*;

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() -> moeba_tensor::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(16 << 20);
    let reps = 10;
    let dev = Device::Cpu;
    println!(
        "elements {n} ({} MiB per f32 array), rayon threads {}, simd path {}",
        (n * 4) >> 20,
        rayon::current_num_threads(),
        simd::active_path()
    );
    let src: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let src2: Vec<f32> = (0..n).map(|i| (i % 777) as f32 * 1e-3).collect();
    let mut dst = vec![0f32; n];
    let gbs = |bytes: f64, s: f64| bytes / s / 1e9;

    let chunk = par::chunk_len::<f32>();
    let t_copy = best_of(reps, || {
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let copy = gbs(8.0 * n as f64, t_copy);
    println!("copy (prealloc)        {:8.2} ms  {:6.2} GB/s", t_copy * 1e3, copy);

    let t_kernel = best_of(reps, || {
        par::for_each_chunk_mut(simd::as_uninit_mut(&mut dst), |s, d| {
            let len = d.len();
            simd::binary_f32(
                BinaryOp::Add,
                simd::Arg::Slice(&src[s..s + len]),
                simd::Arg::Slice(&src2[s..s + len]),
                d,
            )
        });
    });
    println!("add kernel (prealloc)  {:8.2} ms  {:6.2} GB/s", t_kernel * 1e3, gbs(12.0 * n as f64, t_kernel));
    let t_stream = best_of(reps, || {
        par::for_each_chunk_mut(simd::as_uninit_mut(&mut dst), |s, d| {
            let len = d.len();
            simd::binary_f32_stream(
                BinaryOp::Add,
                simd::Arg::Slice(&src[s..s + len]),
                simd::Arg::Slice(&src2[s..s + len]),
                d,
            )
        });
    });
    println!("add kernel, NT stores  {:8.2} ms  {:6.2} GB/s", t_stream * 1e3, gbs(12.0 * n as f64, t_stream));

    let a = Tensor::from_vec(src.clone(), n, &dev)?;
    let b = Tensor::from_vec(src2.clone(), n, &dev)?;
    let t_add = best_of(reps, || {
        let c = ops::add(&a, &b).expect("add");
        std::hint::black_box(&c);
    });
    let add = gbs(12.0 * n as f64, t_add);
    println!(
        "ops::add               {:8.2} ms  {:6.2} GB/s  = {:.0}% of copy",
        t_add * 1e3,
        add,
        100.0 * add / copy
    );

    let t_exp = best_of(reps, || {
        std::hint::black_box(ops::exp(&a).expect("exp"));
    });
    println!("ops::exp               {:8.2} ms  {:6.2} GB/s", t_exp * 1e3, gbs(8.0 * n as f64, t_exp));
    let t_sum = best_of(reps, || {
        std::hint::black_box(ops::sum_all(&a).expect("sum"));
    });
    println!("ops::sum_all           {:8.2} ms  {:6.2} GB/s", t_sum * 1e3, gbs(4.0 * n as f64, t_sum));
    if n.is_multiple_of(4096) {
        let x = a.reshape((n / 4096, 4096))?;
        let t_sm = best_of(reps, || {
            std::hint::black_box(ops::softmax(&x, 1).expect("softmax"));
        });
        println!("ops::softmax (.., 4096) {:7.2} ms  {:6.2} GB/s", t_sm * 1e3, gbs(8.0 * n as f64, t_sm));
    }
    Ok(())
}
