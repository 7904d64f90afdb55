//! The Mamba-1 selective scan (f32) through `moeba_kernels::ops`: forward and forward+backward at
//! (b=1, d=1536, n=16, l=2048) and l=512, with the inputs of the PyTorch peer's W1
//! (`../shared/peers/torch_bench.py`: delta = N(0, 0.5²) plus an inverse-softplus dt bias,
//! A = -exp(U(0, ln 16)), D in [0.5, 1.5), softplus, D skip, silu(z) gate), both in the
//! `(b, d, l)`-contiguous layout of the peer and in the channel-last layout the Mamba block uses;
//! and the causal conv1d (k=4, SiLU) the block runs before it.
//!
//! Throughput is in state updates (`b·d·l·n`): each is about 17 vector-lane flops in the forward.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeba_kernels::ops::{self, SelectiveScanArgs};
use moeba_tensor::{DType, Device, Result, Tensor};

/// The W1 inputs: `[u, delta, A, B, C, D, z, delta_bias]` (B and C as `(b, 1, n, l)`).
fn scan_inputs(l: usize, d: usize, n: usize, channel_last: bool) -> Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    let f = DType::F32;
    let bdl = |seed: u64, std: f64| -> Result<Tensor> {
        if channel_last {
            Tensor::randn(seed, (1, l, d), 0.0, std, f, &dev)?.transpose(1, 2)
        } else {
            Tensor::randn(seed, (1, d, l), 0.0, std, f, &dev)
        }
    };
    let a_log = Tensor::rand(3, (d, n), 0.0, 16f64.ln(), DType::F64, &dev)?;
    let a =
        Tensor::from_vec(a_log.to_vec::<f64>()?.iter().map(|v| -v.exp()).collect::<Vec<_>>(), (d, n), &dev)?;
    let dt = Tensor::rand(8, d, 1e-3f64.ln(), 0.1f64.ln(), DType::F64, &dev)?.to_vec::<f64>()?;
    let bias: Vec<f64> = dt.iter().map(|v| v.exp()).map(|dt| dt + (-(-dt).exp_m1()).ln()).collect();
    Ok(vec![
        bdl(1, 1.0)?,
        bdl(2, 0.5)?,
        a.to_dtype(f)?,
        Tensor::randn(4, (1, 1, n, l), 0.0, 1.0, f, &dev)?,
        Tensor::randn(5, (1, 1, n, l), 0.0, 1.0, f, &dev)?,
        Tensor::rand(6, d, 0.5, 1.5, f, &dev)?,
        bdl(7, 1.0)?,
        Tensor::from_vec(bias, d, &dev)?.to_dtype(f)?,
    ])
}

fn args(t: &[Tensor]) -> SelectiveScanArgs<'_> {
    SelectiveScanArgs {
        u: &t[0],
        delta: &t[1],
        a: &t[2],
        b: &t[3],
        c: &t[4],
        d: Some(&t[5]),
        z: Some(&t[6]),
        delta_bias: Some(&t[7]),
        delta_softplus: true,
        initial_state: None,
        seq_idx: None,
    }
}

fn selective_scan(c: &mut Criterion) {
    let (d, n) = (1536, 16);
    let mut group =
        c.benchmark_group(format!("selective_scan_f32_{}", moeba_kernels::cpu::simd::active_path()));
    group.sample_size(10);
    for l in [2048usize, 512] {
        for channel_last in [false, true] {
            let t = scan_inputs(l, d, n, channel_last).expect("inputs");
            let layout = if channel_last { "bld" } else { "bdl" };
            group.throughput(Throughput::Elements((d * l * n) as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("fwd_{layout}"), format!("1x{d}x{n}x{l}")),
                &t,
                |b, t| b.iter(|| ops::selective_scan(&args(t)).expect("scan")),
            );
            let go = Tensor::randn(9, (1, d, l), 0.0, 1.0, DType::F32, &Device::Cpu).expect("grad");
            group.bench_with_input(
                BenchmarkId::new(format!("fwd_bwd_{layout}"), format!("1x{d}x{n}x{l}")),
                &t,
                |b, t| {
                    b.iter(|| {
                        let out = ops::selective_scan(&args(t)).expect("scan");
                        ops::selective_scan_backward(&args(t), &out, &go, None).expect("backward")
                    })
                },
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("causal_conv1d_f32");
    group.sample_size(10);
    let (d, l, k) = (1536, 2048, 4);
    let x = Tensor::randn(1, (1, l, d), 0.0, 1.0, DType::F32, &Device::Cpu)
        .expect("x")
        .transpose(1, 2)
        .expect("view");
    let w = Tensor::randn(2, (d, k), 0.0, 0.5, DType::F32, &Device::Cpu).expect("w");
    let bias = Tensor::randn(3, d, 0.0, 0.5, DType::F32, &Device::Cpu).expect("bias");
    let go = Tensor::randn(4, (1, d, l), 0.0, 1.0, DType::F32, &Device::Cpu).expect("go");
    group.throughput(Throughput::Bytes((d * l * 8) as u64));
    group.bench_function(format!("fwd_bld_1x{d}x{l}_k{k}"), |b| {
        b.iter(|| ops::causal_conv1d(&x, &w, Some(&bias), true, None).expect("conv"))
    });
    group.bench_function(format!("bwd_bld_1x{d}x{l}_k{k}"), |b| {
        b.iter(|| ops::causal_conv1d_backward(&x, &w, Some(&bias), true, None, &go).expect("conv bwd"))
    });
    group.finish();
}

criterion_group!(benches, selective_scan);
criterion_main!(benches);
