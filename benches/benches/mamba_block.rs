//! The Mamba-1 block (f32): forward at d_model 768 (d_inner 1536, n 16, k 4, dt_rank 48),
//! l 1024, batch 1, without a tape (the peer's HF block forward), and forward+backward with one.

use criterion::{criterion_group, criterion_main, Criterion};
use moeba_autograd::{no_grad, Var};
use moeba_nn::mamba::{MambaBlock, MambaConfig};
use moeba_nn::ParamStore;
use moeba_tensor::{DType, Device, Tensor};

fn mamba_block(c: &mut Criterion) {
    let (dm, l) = (768, 1024);
    let store = ParamStore::new(DType::F32, Device::Cpu, 1);
    let block = MambaBlock::new(&store.root().pp("mixer"), &MambaConfig::new(dm)).expect("block");
    let x = Tensor::randn(2, (1, l, dm), 0.0, 1.0, DType::F32, &Device::Cpu).expect("x");
    let mut group = c.benchmark_group(format!("mamba_block_f32_{}", moeba_kernels::cpu::simd::active_path()));
    group.sample_size(10);
    group.bench_function(format!("fwd_d{dm}_l{l}"), |b| {
        b.iter(|| {
            let _g = no_grad();
            block.forward(&Var::constant(x.clone()), None).expect("forward")
        })
    });
    let xv = Var::param(x.clone());
    group.bench_function(format!("fwd_bwd_d{dm}_l{l}"), |b| {
        b.iter(|| {
            block.forward(&xv, None).expect("forward").sum_all().expect("sum").backward().expect("backward")
        })
    });
    group.finish();
}

criterion_group!(benches, mamba_block);
criterion_main!(benches);
