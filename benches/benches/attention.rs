//! Causal GQA attention, f32, b = 1, 8 query heads, 4 kv heads, head dim 64, l = 512 … 4096:
//! - `attention_fwd_f32`: the tiled kernel (`ops::attention`);
//! - `attention_fwd_bwd_f32`: forward and `ops::attention_backward`;
//! - `attention_materialised_{fwd,fwd_bwd}_f32`: the same function written with the score
//!   matrix materialised (`matmul`, `masked_fill`, `softmax`, `matmul` on autograd Vars: what an
//!   unfused implementation does), for contrast (l ≤ 2048 under criterion; the table covers 4096).
//!
//! Before criterion runs, a table is printed with one timed call per row and its **peak extra
//! heap** (bytes allocated beyond what was live before the call, measured by the counting global
//! allocator of this binary): the tiled kernel's memory grows linearly with l, the materialised
//! one quadratically. Set `MOEBA_ATTN_TABLE_ONLY=1` to print the table and skip criterion, and
//! `MOEBA_ATTN_TILED_ONLY=1` to leave the materialised rows out of the table.
//!
//! Throughput is counted in FLOPs of the causal forward (`2 · 2 · hq · l² / 2 · d`; read criterion's
//! "elem/s" as FLOP/s).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moeba_autograd::Var;
use moeba_benches::randn;
use moeba_kernels::ops::{self, AttentionOptions};
use moeba_tensor::{Device, Result, Tensor};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now =
                    LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` once; returns its result, the wall time in ms and the peak heap beyond the bytes
/// live before the call.
fn measure<T>(f: impl FnOnce() -> T) -> (T, f64, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = Instant::now();
    let r = f();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    (r, ms, PEAK.load(Ordering::Relaxed) - base)
}

const B: usize = 1;
const HQ: usize = 8;
const HKV: usize = 4;
const D: usize = 64;
const LENGTHS: [usize; 4] = [512, 1024, 2048, 4096];

/// q, k, v and a cotangent for sequence length `l`.
fn inputs(l: usize) -> Result<[Tensor; 4]> {
    Ok([
        randn(1, &[B, HQ, l, D])?,
        randn(2, &[B, HKV, l, D])?,
        randn(3, &[B, HKV, l, D])?,
        randn(4, &[B, HQ, l, D])?,
    ])
}

fn opts() -> AttentionOptions {
    AttentionOptions::causal(D)
}

/// The tiled forward and backward.
fn fwd_bwd(x: &[Tensor; 4]) -> Result<(Tensor, Tensor, Tensor)> {
    let fwd = ops::attention(&x[0], &x[1], &x[2], &opts())?;
    ops::attention_backward(&x[0], &x[1], &x[2], &fwd, &x[3], &opts())
}

/// `(l, l)` mask, 1 above the diagonal (hidden keys).
fn causal_mask(l: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(m, (l, l), &Device::Cpu)
}

/// Causal GQA attention with the `(l × l)` scores materialised, on Vars (the q heads of a group
/// are stacked so that K/V are not repeated).
fn materialised(q: &Var, k: &Var, v: &Var, mask: &Tensor) -> Result<Var> {
    let (b, hq, l, d) = (q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]);
    let (hkv, rep) = (k.dims()[1], hq / k.dims()[1]);
    let s = q.reshape((b, hkv, rep * l, d))?.matmul(&k.transpose(2, 3)?)?.scale(opts().scale)?;
    let p = s.reshape(vec![b, hkv, rep, l, l])?.masked_fill(mask, f64::NEG_INFINITY)?.softmax(4)?;
    p.reshape((b, hkv, rep * l, l))?.matmul(v)?.reshape((b, hq, l, d))
}

fn materialised_fwd_bwd(x: &[Tensor; 4], mask: &Tensor) -> Result<()> {
    let (q, k, v) = (Var::param(x[0].clone()), Var::param(x[1].clone()), Var::param(x[2].clone()));
    let out = materialised(&q, &k, &v, mask)?;
    let g = out.backward_with(x[3].clone())?;
    assert!(g.get(&q).is_some());
    Ok(())
}

/// Useful GFLOP/s of a call taking `ms`: `factor` × the causal forward's FLOPs (forward 1,
/// forward + backward 3.5: the backward has 5 products of the forward's 2, the recomputed `QKᵀ`
/// not counted).
fn gf(l: usize, ms: f64, factor: f64) -> f64 {
    flops(l) as f64 * factor / ms / 1e6
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// One timed call per row, with the peak extra heap, on stdout.
fn table() {
    println!(
        "attention (causal GQA f32, b {B}, hq {HQ}, hkv {HKV}, d {D}; RAYON_NUM_THREADS={}; simd {}; 1 call each)",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        moeba_kernels::cpu::simd::active_path()
    );
    // Calibration: what the machine gives a plain GEMM right now (shared machines are noisy).
    let (a, bm) = (randn(5, &[1024, 1024]).expect("a"), randn(6, &[1024, 1024]).expect("b"));
    let _ = ops::matmul(&a, &bm).expect("matmul");
    let best =
        (0..3).map(|_| measure(|| ops::matmul(&a, &bm).expect("matmul")).1).fold(f64::INFINITY, f64::min);
    println!(
        "calibration: ops::matmul 1024^3 f32 {:.1} GFLOP/s (best of 3)",
        2.0 * 1024f64.powi(3) / best / 1e6
    );
    println!("{:>6} {:>26} {:>10} {:>10} {:>14}", "l", "what", "ms", "GFLOP/s", "peak extra MiB");
    for l in LENGTHS {
        let x = inputs(l).expect("inputs");
        let mask = causal_mask(l).expect("mask");
        let _warm = ops::attention(&x[0], &x[1], &x[2], &opts()).expect("attention");
        let (_, ms, peak) = measure(|| ops::attention(&x[0], &x[1], &x[2], &opts()).expect("attention"));
        println!("{l:>6} {:>26} {ms:>10.1} {:>10.1} {:>14.2}", "tiled fwd", gf(l, ms, 1.0), mib(peak));
        let (_, ms, peak) = measure(|| fwd_bwd(&x).expect("fwd+bwd"));
        println!("{l:>6} {:>26} {ms:>10.1} {:>10.1} {:>14.2}", "tiled fwd+bwd", gf(l, ms, 3.5), mib(peak));
        if std::env::var_os("MOEBA_ATTN_TILED_ONLY").is_some() {
            continue;
        }
        let (_, ms, peak) = measure(|| {
            let _g = moeba_autograd::no_grad();
            let (q, k, v) =
                (Var::constant(x[0].clone()), Var::constant(x[1].clone()), Var::constant(x[2].clone()));
            materialised(&q, &k, &v, &mask).expect("materialised")
        });
        println!("{l:>6} {:>26} {ms:>10.1} {:>10.1} {:>14.2}", "materialised fwd", gf(l, ms, 1.0), mib(peak));
        let (_, ms, peak) = measure(|| materialised_fwd_bwd(&x, &mask).expect("materialised fwd+bwd"));
        println!(
            "{l:>6} {:>26} {ms:>10.1} {:>10.1} {:>14.2}",
            "materialised fwd+bwd",
            gf(l, ms, 3.5),
            mib(peak)
        );
    }
}

fn flops(l: usize) -> u64 {
    // QKᵀ and PV over the causal half: 2 products × 2 flops × hq × l²/2 × d.
    (2 * HQ * l * l * D) as u64 * B as u64
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_fwd_f32");
    group.sample_size(10);
    for l in LENGTHS {
        let x = inputs(l).expect("inputs");
        group.throughput(Throughput::Elements(flops(l)));
        group.bench_with_input(BenchmarkId::from_parameter(l), &x, |bch, x| {
            bch.iter(|| ops::attention(&x[0], &x[1], &x[2], &opts()).expect("attention"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("attention_fwd_bwd_f32");
    group.sample_size(10);
    for l in LENGTHS {
        let x = inputs(l).expect("inputs");
        group.throughput(Throughput::Elements(flops(l) * 7 / 2));
        group.bench_with_input(BenchmarkId::from_parameter(l), &x, |bch, x| {
            bch.iter(|| fwd_bwd(x).expect("fwd+bwd"))
        });
    }
    group.finish();

    for (name, bwd) in
        [("attention_materialised_fwd_f32", false), ("attention_materialised_fwd_bwd_f32", true)]
    {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for l in [512, 1024, 2048] {
            let x = inputs(l).expect("inputs");
            let mask = causal_mask(l).expect("mask");
            group.bench_with_input(BenchmarkId::from_parameter(l), &x, |bch, x| {
                bch.iter(|| {
                    if bwd {
                        materialised_fwd_bwd(x, &mask).expect("materialised fwd+bwd")
                    } else {
                        let _g = moeba_autograd::no_grad();
                        let (q, k, v) = (
                            Var::constant(x[0].clone()),
                            Var::constant(x[1].clone()),
                            Var::constant(x[2].clone()),
                        );
                        materialised(&q, &k, &v, &mask).map(|_| ()).expect("materialised")
                    }
                })
            });
        }
        group.finish();
    }
}

// ------------------------------------------------------------------ decode step: MLA vs GQA (C2)

/// One decoding step at context `ctx` (b = 1, f32, d_model 1024, 16 heads of 64): GQA with 4 kv
/// heads, MHA (16 kv heads) and MLA in the absorbed form (kv latent 256, rope 32, nope 64, v 64,
/// no q latent: DeepSeek-V2-Lite proportions). The cache is prefilled once; every iteration
/// truncates it back to `ctx` (O(1)) and decodes one token. The benchmark ids carry the cache
/// bytes per token and layer; a line per layer prints them too.
fn decode(c: &mut Criterion) {
    use moeba_nn::mla::{Mla, MlaConfig};
    use moeba_nn::{Attention, AttentionConfig, ParamStore, RopeConfig};
    use moeba_tensor::DType;

    const DM: usize = 1024;
    let store = ParamStore::new(DType::F32, Device::Cpu, 41);
    let gqa = Attention::new(&store.root().pp("gqa"), &AttentionConfig::new(DM, 16, 4, 64)).expect("gqa");
    let mha = Attention::new(&store.root().pp("mha"), &AttentionConfig::new(DM, 16, 16, 64)).expect("mha");
    let mla_cfg = MlaConfig {
        d_model: DM,
        num_heads: 16,
        q_latent_dim: None,
        kv_latent_dim: 256,
        qk_nope_head_dim: 64,
        d_rope: 32,
        v_head_dim: 64,
        rope: RopeConfig::interleaved(10000.0),
        norm_eps: 1e-6,
        softmax_scale: None,
    };
    let mla = Mla::new(&store.root().pp("mla"), &mla_cfg).expect("mla");
    let step = randn(4, &[1, 1, DM]).expect("step");
    let mut group = c.benchmark_group("attention_decode_step_f32");
    group.sample_size(20);
    for ctx in [512usize, 2048, 8192] {
        let prefix = randn(3, &[1, ctx, DM]).expect("prefix");
        for (name, attn) in [("gqa16q4kv", &gqa), ("mha16", &mha)] {
            let mut cache = attn.new_cache(1, ctx + 1).expect("cache");
            attn.forward_step(&prefix, &mut cache).expect("prefill");
            let id = format!("{name}_{}B_per_token", cache.bytes_per_token());
            println!("decode ctx {ctx}: {id}: cache {} KiB", ctx * cache.bytes_per_token() / 1024);
            group.bench_function(BenchmarkId::new(id, ctx), |bch| {
                bch.iter(|| {
                    cache.truncate(ctx).expect("truncate");
                    attn.forward_step(&step, &mut cache).expect("step")
                })
            });
        }
        let mut cache = mla.new_cache(1, ctx + 1).expect("cache");
        mla.forward_step(&prefix, &mut cache).expect("prefill");
        let id = format!("mla_absorbed_{}B_per_token", cache.bytes_per_token());
        println!("decode ctx {ctx}: {id}: cache {} KiB", ctx * cache.bytes_per_token() / 1024);
        group.bench_function(BenchmarkId::new(id, ctx), |bch| {
            bch.iter(|| {
                cache.truncate(ctx).expect("truncate");
                mla.forward_step(&step, &mut cache).expect("step")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, attention, decode);

fn main() {
    table();
    if std::env::var_os("MOEBA_ATTN_TABLE_ONLY").is_some() {
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
