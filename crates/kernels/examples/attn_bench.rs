//! Times causal GQA attention (b=1, 8 heads, 4 kv heads, d=64, f32) forward and forward+backward:
//! `cargo run --release -p moeba-kernels --example attn_bench -- [l...] [--bwd] [--reps N]`.
//! Prints the min and median wall time per length (use `RAYON_NUM_THREADS` to pick threads).

use std::time::Instant;

use moeba_kernels::ops::{self, AttentionOptions};
use moeba_tensor::{DType, Device, Tensor};

fn main() -> moeba_tensor::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bwd = args.iter().any(|a| a == "--bwd");
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(7usize);
    let mut ls: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).filter(|&x| x != reps).collect();
    if ls.is_empty() {
        ls = vec![512, 1024, 2048, 4096];
    }
    let (hq, hkv, d) = (8, 4, 64);
    for l in ls {
        let r =
            |s: u64, h: usize| Tensor::randn(s, [1, h, l, d].as_slice(), 0.0, 1.0, DType::F32, &Device::Cpu);
        let (q, k, v, g) = (r(1, hq)?, r(2, hkv)?, r(3, hkv)?, r(4, hq)?);
        let o = AttentionOptions::causal(d);
        let mut times = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            let f = ops::attention(&q, &k, &v, &o)?;
            if bwd {
                let _ = ops::attention_backward(&q, &k, &v, &f, &g, &o)?;
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let flops = 4.0 * (hq * d) as f64 * (l * (l + 1) / 2) as f64 * if bwd { 3.5 } else { 1.0 };
        println!(
            "l={l:5} {}: min {:8.2} ms  median {:8.2} ms  {:6.1} GFLOP/s (min)",
            if bwd { "fwd+bwd" } else { "fwd" },
            times[0],
            times[times.len() / 2],
            flops / times[0] / 1e6
        );
    }
    Ok(())
}
