//! The Mamba-2 chunked SSD scan (f32): forward and forward + backward at (b=1, l=2048, h=24,
//! p=64, n=128, chunk 256) and l=512, plus the Mamba2Block forward (d_model 768). Throughput is
//! counted in FLOPs (criterion's "elements"): the FLOPs the chunked algorithm's GEMMs execute
//! (`ops::ssd_forward_flops` / `ops::ssd_backward_flops`), so elem/s reads as FLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeba_autograd::{no_grad, Var};
use moeba_benches::randn;
use moeba_kernels::ops::{self, SsdArgs};
use moeba_nn::mamba2::{Mamba2Block, Mamba2Config};
use moeba_nn::ParamStore;
use moeba_tensor::{DType, Device, Tensor};

/// x, dt, A, B, C, D, dt_bias, grad_y for (b, l, h, p, n) with one group.
fn inputs(b: usize, l: usize, h: usize, p: usize, n: usize) -> Vec<Tensor> {
    let dev = Device::Cpu;
    let f = DType::F32;
    vec![
        randn(1, &[b, l, h, p]).expect("x"),
        Tensor::rand(2, (b, l, h), -3.0, 0.0, f, &dev).expect("dt"),
        Tensor::rand(3, h, -4.0, -0.5, f, &dev).expect("A"),
        randn(4, &[b, l, 1, n]).expect("B"),
        randn(5, &[b, l, 1, n]).expect("C"),
        Tensor::ones(h, f, &dev).expect("D"),
        Tensor::zeros(h, f, &dev).expect("dt_bias"),
        randn(6, &[b, l, h, p]).expect("grad_y"),
    ]
}

fn ssd(c: &mut Criterion) {
    let mut group = c.benchmark_group("ssd_f32");
    group.sample_size(10);
    let (h, p, n, q) = (24, 64, 128, 256);
    for l in [2048usize, 512] {
        let t = inputs(1, l, h, p, n);
        let args = SsdArgs {
            x: &t[0],
            dt: &t[1],
            a: &t[2],
            b: &t[3],
            c: &t[4],
            d: Some(&t[5]),
            dt_bias: Some(&t[6]),
            dt_softplus: true,
            initial_state: None,
            seq_idx: None,
            chunk_size: q,
        };
        let fwd = ops::ssd_forward_flops(1, l, h, p, 1, n, q);
        let bwd = ops::ssd_backward_flops(1, l, h, p, 1, n, q);
        let label = format!("1x{l}x{h}x{p}x{n}_chunk{q}");
        group.throughput(Throughput::Elements(fwd as u64));
        group.bench_function(BenchmarkId::new("forward", &label), |bch| {
            bch.iter(|| ops::ssd(&args).expect("ssd"))
        });
        group.throughput(Throughput::Elements((fwd + bwd) as u64));
        group.bench_function(BenchmarkId::new("forward_backward", &label), |bch| {
            bch.iter(|| {
                let out = ops::ssd(&args).expect("ssd");
                ops::ssd_backward(&args, &out.saved, &t[7], None).expect("ssd_backward")
            })
        });
    }
    group.finish();
}

fn mamba2_block(c: &mut Criterion) {
    let mut group = c.benchmark_group("mamba2_block_f32");
    group.sample_size(10);
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let block = Mamba2Block::new(&store.root(), &Mamba2Config::new(768)).expect("block");
    let l = 1024;
    let x = Var::constant(randn(9, &[1, l, 768]).expect("x"));
    group.bench_function(BenchmarkId::new("forward", format!("1x{l}x768")), |bch| {
        bch.iter(|| {
            let _g = no_grad();
            block.forward(&x, None).expect("forward")
        })
    });
    group.finish();
}

criterion_group!(benches, ssd, mamba2_block);
criterion_main!(benches);
