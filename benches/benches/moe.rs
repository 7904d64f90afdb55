//! Top-k gating, grouped expert GEMM against a dense GEMM of equal FLOPs, the MoE layer.
//!
//! Kernel groups (f32, 4096 tokens):
//! - `moe_gating`: `ops::topk_gating` forward and `topk_gating_backward` at 4096×8 top-2 and
//!   4096×64 top-8; throughput in tokens;
//! - `moe_grouped_gemm`: the two layers, (d 512, ff 1024, E 8, top-2) and (d 256, ff 256,
//!   E 64, top-8), gate_up and down projections, uniform and skewed expert loads:
//!   `ops::grouped_matmul` and `grouped_matmul_backward` beside `ops::matmul` of equal FLOPs.
//!   Throughput is in FLOPs (criterion prints elements/s: read "Gelem/s" as GFLOP/s).
//!
//! Layer group (B2), below the marked line: `moe_layer_f32`, the whole `MoeLayer` forward (no_grad)
//! and forward + backward at the same two shapes; throughput in expert-GEMM FLOPs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moeba_benches::randn;
use moeba_kernels::ops;
use moeba_tensor::{Device, Tensor};

/// Rows per expert: uniform, or Zipf-like (weights 1/(i+1), every 7th expert from the 6th empty).
fn group_offsets(rows: usize, experts: usize, skewed: bool) -> Tensor {
    let mut g: Vec<usize> = if skewed {
        let w: Vec<f64> =
            (0..experts).map(|i| if i % 7 == 5 { 0.0 } else { 1.0 / (i as f64 + 1.0) }).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| (x / s * rows as f64) as usize).collect()
    } else {
        vec![rows / experts; experts]
    };
    let short = rows - g.iter().sum::<usize>();
    g[0] += short;
    let mut o = vec![0i64];
    for x in g {
        o.push(o[o.len() - 1] + x as i64);
    }
    Tensor::from_vec(o, experts + 1, &Device::Cpu).expect("offsets")
}

fn gating(c: &mut Criterion) {
    let mut group = c.benchmark_group("moe_gating");
    for (t, e, k) in [(4096usize, 8usize, 2usize), (4096, 64, 8)] {
        let logits = randn(1, &[t, e]).expect("logits");
        let gw = randn(2, &[t, k]).expect("cotangent");
        let opts = ops::TopkGatingOptions::softmax(k);
        let fwd = ops::topk_gating(&logits, None, &opts).expect("gating");
        group.throughput(Throughput::Elements(t as u64));
        let id = format!("{t}x{e}_top{k}");
        group.bench_with_input(BenchmarkId::new("forward", &id), &logits, |b, l| {
            b.iter(|| ops::topk_gating(l, None, &opts).expect("gating"))
        });
        group.bench_with_input(BenchmarkId::new("backward", &id), &logits, |b, l| {
            b.iter(|| ops::topk_gating_backward(l, &fwd, &opts, Some(&gw), None, None).expect("backward"))
        });
    }
    group.finish();
}

fn grouped_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("moe_grouped_gemm");
    group.sample_size(10);
    // (name, rows = tokens·k, experts, in, out, skewed)
    let cases = [
        ("d512_E8_gate_up", 8192usize, 8usize, 512usize, 2048usize, false),
        ("d512_E8_down", 8192, 8, 1024, 512, false),
        ("d512_E8_gate_up_skewed", 8192, 8, 512, 2048, true),
        ("d256_E64_gate_up", 32768, 64, 256, 512, false),
        ("d256_E64_down", 32768, 64, 256, 256, false),
        ("d256_E64_gate_up_skewed", 32768, 64, 256, 512, true),
    ];
    for (name, r, e, i, o, skewed) in cases {
        let x = randn(1, &[r, i]).expect("x");
        let w = randn(2, &[e, o, i]).expect("w");
        let g = randn(3, &[r, o]).expect("grad");
        let wd = randn(4, &[i, o]).expect("dense w");
        let wdt = randn(5, &[o, i]).expect("dense w");
        let offsets = group_offsets(r, e, skewed);
        let flops = 2 * (r * i * o) as u64;
        group.throughput(Throughput::Elements(flops));
        group.bench_function(BenchmarkId::new("grouped_forward", name), |b| {
            b.iter(|| ops::grouped_matmul(&x, &w, &offsets).expect("grouped"))
        });
        group.bench_function(BenchmarkId::new("dense_forward", name), |b| {
            b.iter(|| ops::matmul(&x, &wd).expect("dense"))
        });
        group.throughput(Throughput::Elements(2 * flops));
        group.bench_function(BenchmarkId::new("grouped_backward", name), |b| {
            b.iter(|| ops::grouped_matmul_backward(&x, &w, &offsets, &g).expect("grouped backward"))
        });
        group.bench_function(BenchmarkId::new("dense_backward", name), |b| {
            b.iter(|| {
                let dx = ops::matmul(&g, &wdt).expect("dx");
                let dw = ops::matmul(&g.t().expect("t"), &x).expect("dw");
                (dx, dw)
            })
        });
    }
    group.finish();
}

// ------------------------------------------------------------------ the MoE layer (B2's groups)

/// The whole MoE layer (top-k softmax router, renormalised, SwiGLU experts, dropless) at the
/// issue's shapes: 4096 tokens, (d 512, ff 1024, E 8, top-2) and (d 256, ff 256, E 64, top-8),
/// forward under no_grad and forward + backward (gradients for x, the router and the experts).
/// Weights N(0, 0.02), x N(0, 1), as the PyTorch peer (`torch_bench.py` W4). Throughput counts
/// the expert GEMMs only: `2·T·k·3·d·ff` per forward, three times that with the backward.
fn moe_layer(c: &mut Criterion) {
    use moeba_autograd::Var;
    use moeba_nn::moe::{MoeConfig, MoeContext, MoeLayer, MoeWeights};
    use moeba_tensor::{DType, Device, Tensor};

    let mut group = c.benchmark_group("moe_layer_f32");
    group.sample_size(10);
    for (t, d, ff, e, k) in [(4096usize, 512usize, 1024usize, 8usize, 2usize), (4096, 256, 256, 64, 8)] {
        let store = moeba_nn::ParamStore::new(DType::F32, Device::Cpu, 0);
        let layer = MoeLayer::new(&store.root(), &MoeConfig::new(d, ff, e, k)).expect("layer");
        let init = |seed: u64, dims: &[usize]| {
            Tensor::randn(seed, dims, 0.0, 0.02, DType::F32, &Device::Cpu).expect("weights")
        };
        let (router, gate_up, down) = (init(3, &[e, d]), init(4, &[e, 2 * ff, d]), init(5, &[e, d, ff]));
        let x = moeba_benches::randn(1, &[t, d]).expect("x");
        let dout = moeba_benches::randn(2, &[t, d]).expect("dout");
        let fwd_flops = 2 * (t * k * 3 * d * ff) as u64;
        let label = format!("T{t}_d{d}_ff{ff}_E{e}_top{k}");
        let ctx = MoeContext::default();
        group.throughput(Throughput::Elements(fwd_flops));
        group.bench_function(BenchmarkId::new("fwd", &label), |b| {
            let w = MoeWeights {
                router: vec![Var::constant(router.clone())],
                gate_up: Var::constant(gate_up.clone()),
                down: Var::constant(down.clone()),
                shared: None,
            };
            let xv = Var::constant(x.clone());
            b.iter(|| {
                let _g = moeba_autograd::no_grad();
                layer.forward_with(&xv, &w, &ctx).expect("forward").out
            })
        });
        group.throughput(Throughput::Elements(3 * fwd_flops));
        group.bench_function(BenchmarkId::new("fwd_bwd", &label), |b| {
            b.iter(|| {
                let w = MoeWeights {
                    router: vec![Var::param(router.clone())],
                    gate_up: Var::param(gate_up.clone()),
                    down: Var::param(down.clone()),
                    shared: None,
                };
                let xv = Var::param(x.clone());
                let y = layer.forward_with(&xv, &w, &ctx).expect("forward").out;
                y.backward_with(dout.clone()).expect("backward")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, gating, grouped_gemm, moe_layer);
criterion_main!(benches);
