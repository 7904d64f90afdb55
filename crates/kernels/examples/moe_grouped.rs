//! Times the SwiGLU experts of the MoE layer's two benchmark shapes in one process, the variants
//! interleaved round by round (so a loaded machine slows them alike), printing the best time of
//! each: `RAYON_NUM_THREADS=2 cargo run --release -p moeba-kernels --example moe_grouped`.
//!
//! Variants: the fused forward without and with the saved `h`/`a`
//! (`ops::moe_swiglu_experts_forward`), the three-op composite (`grouped_matmul`, `moe_swiglu`,
//! `grouped_matmul`), and the down projection's grouped backward.

use std::time::Instant;

use moeba_kernels::{cpu, ops};
use moeba_tensor::{DType, Device, Result, Tensor};

fn main() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).and_then(|v| v.parse().ok()).unwrap_or(6);
    for &(r, d, f, e) in &[(8192usize, 512usize, 1024usize, 8usize), (32768, 256, 256, 64)] {
        let x = Tensor::randn(1, (r, d), 0.0, 1.0, DType::F32, &Device::Cpu)?;
        let gu = Tensor::randn(2, (e, 2 * f, d), 0.0, 0.05, DType::F32, &Device::Cpu)?;
        let dn = Tensor::randn(3, (e, d, f), 0.0, 0.05, DType::F32, &Device::Cpu)?;
        let offs: Vec<usize> = (0..=e).map(|i| i * r / e).collect();
        let offsets =
            Tensor::from_vec(offs.iter().map(|&o| o as i64).collect::<Vec<_>>(), e + 1, &Device::Cpu)?;
        let g = Tensor::randn(4, (r, d), 0.0, 1.0, DType::F32, &Device::Cpu)?;
        let a = ops::moe_swiglu(&ops::grouped_matmul(&x, &gu, &offsets)?)?;
        let names = ["fused", "fused+keep", "composite", "down backward"];
        let mut best = [f64::INFINITY; 4];
        for _ in 0..rounds {
            for (i, b) in best.iter_mut().enumerate() {
                let t = Instant::now();
                match i {
                    0 => drop(ops::moe_swiglu_experts_forward(&x, &gu, &dn, &offsets, false)?),
                    1 => drop(ops::moe_swiglu_experts_forward(&x, &gu, &dn, &offsets, true)?),
                    2 => drop(cpu::grouped_gemm::swiglu_experts_composite(&x, &gu, &dn, &offs, true)?),
                    _ => drop(ops::grouped_matmul_backward(&a, &dn, &offsets, &g)?),
                }
                *b = b.min(t.elapsed().as_secs_f64());
            }
        }
        let fwd = 2.0 * (r * 3 * d * f) as f64 / 1e9;
        for (i, (name, b)) in names.iter().zip(best).enumerate() {
            let flops = if i == 3 { 2.0 * fwd / 3.0 } else { fwd };
            println!("R {r} d {d} f {f} E {e}: {name:14} {:7.1} ms {:6.1} GFLOP/s", b * 1e3, flops / b);
        }
    }
    Ok(())
}
