//! Profiling harness for the small-shape training step (issue 7): a tiny hybrid LM built from the
//! existing layers, timed forward, backward and per component.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p moeba-nn --example train_step -- \
//!     [--seq 128] [--batch 16] [--hidden 128] [--layers MA] [--iters 20] [--dtype f32]
//! ```
//!
//! The model is `Embedding → N × [RmsNorm → mixer → add, RmsNorm → FFN → add] → RmsNorm → tied
//! head → cross-entropy`, timed as the library's `HybridModel` (the step `moeba train` runs, plus
//! the MoE aux loss) and as the harness's own assembly of the same layers, whose components are
//! then timed one by one. `--layers` gives one letter per layer: `M` = Mamba mixer + SwiGLU MLP,
//! `A` = attention (4 heads of 32, `--kv-heads` 4 or 2) + MoE (8 experts, top-2, d_ff 256),
//! `a` = attention + MLP, `m` = Mamba + MoE. Reported: the median (and min) over `--iters`
//! steps of the forward, the backward and the whole step, tokens per second, then the same
//! for each component alone (its backward is seeded with a random output gradient).

use std::time::Instant;

use moeba_autograd::Var;
use moeba_nn::mamba::{MambaBlock, MambaConfig};
use moeba_nn::moe::{MoeConfig, MoeContext, MoeLayer};
use moeba_nn::{
    Attention, AttentionConfig, BlockConfig, Embedding, FfnConfig, ForwardOptions, HybridConfig, HybridModel,
    MixerConfig, ParamStore, RmsNorm, SwiGluMlp,
};
use moeba_tensor::{DType, Device, Result, Tensor};

struct Args {
    seq: usize,
    batch: usize,
    hidden: usize,
    layers: String,
    iters: usize,
    kv_heads: usize,
    mlp: usize,
    dtype: DType,
    /// Time only the components whose name contains this (and skip the full step).
    only: Option<String>,
}

fn parse_args() -> Args {
    parse_args_from(std::env::args().collect())
}

fn parse_args_from(argv: Vec<String>) -> Args {
    let mut a = Args {
        seq: 128,
        batch: 16,
        hidden: 128,
        layers: "MAMA".into(),
        iters: 20,
        kv_heads: 4,
        mlp: 512,
        dtype: DType::F32,
        only: None,
    };
    let argv: Vec<String> = argv.into_iter().skip(1).collect();
    let mut i = 0;
    while i + 1 < argv.len() {
        let (k, v) = (argv[i].as_str(), argv[i + 1].as_str());
        let num = || v.parse::<usize>().unwrap_or_else(|_| panic!("{k} expects a number, got {v}"));
        match k {
            "--seq" => a.seq = num(),
            "--batch" => a.batch = num(),
            "--hidden" => a.hidden = num(),
            "--iters" => a.iters = num(),
            "--kv-heads" => a.kv_heads = num(),
            "--mlp" => a.mlp = num(),
            "--layers" => a.layers = v.to_string(),
            "--only" => a.only = Some(v.to_string()),
            "--dtype" => a.dtype = if v == "f64" { DType::F64 } else { DType::F32 },
            _ => panic!("unknown argument {k}"),
        }
        i += 2;
    }
    a
}

enum Mixer {
    Mamba(Box<MambaBlock>),
    Attn(Box<Attention>),
}

enum Ffn {
    Mlp(Box<SwiGluMlp>),
    Moe(Box<MoeLayer>),
}

struct Block {
    norm1: RmsNorm,
    mixer: Mixer,
    norm2: RmsNorm,
    ffn: Ffn,
}

struct Model {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
}

impl Mixer {
    fn forward(&self, x: &Var) -> Result<Var> {
        match self {
            Mixer::Mamba(m) => m.forward(x, None),
            Mixer::Attn(a) => a.forward(x),
        }
    }
}

impl Ffn {
    fn forward(&self, x: &Var) -> Result<Var> {
        match self {
            Ffn::Mlp(m) => m.forward(x),
            Ffn::Moe(m) => {
                let out = m.forward(x, &MoeContext::training(0, 0))?;
                match out.aux.weighted_total(m.config())? {
                    // The auxiliary loss joins through a zero-weight term, which keeps it on the tape.
                    Some(aux) => out.out.add(&aux.affine(0.0, 0.0)?),
                    None => Ok(out.out),
                }
            }
        }
    }
}

impl Model {
    fn new(store: &ParamStore, a: &Args) -> Result<Model> {
        let root = store.root();
        let d = a.hidden;
        let embed = Embedding::new(&root.pp("embed_tokens"), 256, d)?;
        let mut blocks = Vec::new();
        for (i, c) in a.layers.chars().enumerate() {
            let p = root.pp("layers").pp(i);
            let mixer = match c {
                'M' | 'm' => Mixer::Mamba(Box::new(MambaBlock::new(&p.pp("mixer"), &MambaConfig::new(d))?)),
                _ => Mixer::Attn(Box::new(Attention::new(
                    &p.pp("self_attn"),
                    &AttentionConfig::new(d, 4, a.kv_heads, 32),
                )?)),
            };
            let ffn = match c {
                'A' | 'm' => Ffn::Moe(Box::new(MoeLayer::new(&p.pp("moe"), &MoeConfig::new(d, 256, 8, 2))?)),
                _ => Ffn::Mlp(Box::new(SwiGluMlp::new(&p.pp("mlp"), d, a.mlp)?)),
            };
            blocks.push(Block {
                norm1: RmsNorm::new(&p.pp("input_layernorm"), d, 1e-5)?,
                mixer,
                norm2: RmsNorm::new(&p.pp("post_attention_layernorm"), d, 1e-5)?,
                ffn,
            });
        }
        let norm = RmsNorm::new(&root.pp("norm"), d, 1e-5)?;
        Ok(Model { embed, blocks, norm })
    }

    fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Var> {
        let mut x = self.embed.forward(ids)?;
        for b in &self.blocks {
            x = x.add(&b.mixer.forward(&b.norm1.forward(&x)?)?)?;
            x = x.add(&b.ffn.forward(&b.norm2.forward(&x)?)?)?;
        }
        let x = self.norm.forward(&x)?;
        head_loss(&x, &self.embed, targets)
    }
}

/// The same stack as [`Model`] as the library's [`HybridModel`] (what `moeba train` runs).
fn hybrid_config(a: &Args) -> HybridConfig {
    let d = a.hidden;
    let blocks = a
        .layers
        .chars()
        .map(|c| BlockConfig {
            mixer: match c {
                'M' | 'm' => MixerConfig::Mamba(MambaConfig::new(d)),
                _ => MixerConfig::Attention(AttentionConfig::new(d, 4, a.kv_heads, 32)),
            },
            ffn: match c {
                'A' | 'm' => FfnConfig::Moe(MoeConfig::new(d, 256, 8, 2)),
                _ => FfnConfig::Mlp { intermediate_size: a.mlp },
            },
        })
        .collect();
    HybridConfig { vocab_size: 256, hidden_size: d, blocks, tie_embeddings: true, norm_eps: 1e-5 }
}

fn hybrid_loss(m: &HybridModel, ids: &Tensor, targets: &Tensor) -> Result<Var> {
    let out = m.forward(ids, &ForwardOptions { moe: MoeContext::training(0, 0), ..Default::default() })?;
    let loss = HybridModel::lm_loss(&out.logits, targets)?;
    match out.aux_loss {
        Some(aux) => loss.add(&aux),
        None => Ok(loss),
    }
}

fn head_loss(x: &Var, embed: &Embedding, targets: &Tensor) -> Result<Var> {
    let d = embed.dim();
    let n = x.elem_count() / d;
    let logits = x.reshape((n, d))?.matmul(&embed.weight.var().t()?)?;
    logits.cross_entropy(&targets.reshape(n)?, None)
}

thread_local! {
    /// The median CPU time (ms, all threads) of the last [`time`] call's iterations.
    static LAST_CPU_MS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// CPU time of every thread of this process so far, in ns (Linux `schedstat`; 0 elsewhere).
/// Less sensitive than wall time to other processes sharing the cores (with one rayon thread it
/// is the work itself; with two it includes rayon's spinning).
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `iters` runs of `fwd` (building the tape) then `bwd` on its result; returns the medians
/// and minima in ms: (fwd, bwd, total, min total).
fn time<F, B>(iters: usize, mut fwd: F, mut bwd: B) -> Result<(f64, f64, f64, f64)>
where
    F: FnMut() -> Result<Var>,
    B: FnMut(&Var) -> Result<()>,
{
    // Warm up (allocator, rayon pool, caches).
    for _ in 0..2 {
        let y = fwd()?;
        bwd(&y)?;
    }
    let (mut f, mut b, mut t, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters.max(1) {
        let c0 = cpu_ns();
        let t0 = Instant::now();
        let y = fwd()?;
        let t1 = Instant::now();
        bwd(&y)?;
        let t2 = Instant::now();
        drop(y);
        cpu.push((cpu_ns() - c0) as f64 / 1e6);
        f.push((t1 - t0).as_secs_f64() * 1e3);
        b.push((t2 - t1).as_secs_f64() * 1e3);
        t.push((t2 - t0).as_secs_f64() * 1e3);
    }
    LAST_CPU_MS.with(|c| c.set(median(&mut cpu)));
    let min = t.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok((median(&mut f), median(&mut b), median(&mut t), min))
}

fn report(name: &str, r: (f64, f64, f64, f64), total: f64) {
    println!(
        "{name:<28} fwd {:>7.2} ms  bwd {:>7.2} ms  total {:>7.2} ms  (min {:>7.2}, cpu {:>7.2})  {:>5.1}%",
        r.0,
        r.1,
        r.2,
        r.3,
        if r.2 > 0.0 { LAST_CPU_MS.with(|c| c.get()) } else { 0.0 },
        if total > 1.0 { 100.0 * r.2 / total } else { 0.0 }
    );
}

/// A named GEMM to time.
type Case<'a> = (&'static str, Box<dyn Fn() -> Result<Tensor> + 'a>);

/// `--matmul`: GFLOP/s of the Linear forward/backward GEMMs of the step (best of `iters`).
fn matmul_shapes(a: &Args) -> Result<()> {
    let dev = Device::Cpu;
    let t = a.batch * a.seq;
    for (k, n) in [(a.hidden, a.mlp), (a.mlp, a.hidden), (a.hidden, 2 * a.hidden), (2 * a.hidden, a.hidden)] {
        let x = Tensor::randn(1, (t, k), 0.0, 1.0, a.dtype, &dev)?;
        let w = Tensor::randn(2, (n, k), 0.0, 1.0, a.dtype, &dev)?;
        let g = Tensor::randn(3, (t, n), 0.0, 1.0, a.dtype, &dev)?;
        let cases: [Case<'_>; 3] = [
            ("fwd x@Wt", Box::new(|| moeba_kernels::ops::matmul(&x, &w.t()?))),
            ("bwd g@W", Box::new(|| moeba_kernels::ops::matmul(&g, &w))),
            ("bwd xt@g", Box::new(|| moeba_kernels::ops::matmul(&x.t()?, &g))),
        ];
        for (name, f) in cases {
            let mut best = f64::INFINITY;
            for _ in 0..a.iters + 2 {
                let t0 = Instant::now();
                drop(f()?);
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let flops = 2.0 * (t * k * n) as f64;
            println!(
                "T {t} k {k} n {n} {name:<9} {:>7.3} ms {:>6.1} GFLOP/s",
                best * 1e3,
                flops / best / 1e9
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|s| s == "--matmul") {
        let args: Vec<String> = std::env::args().filter(|s| s != "--matmul").collect();
        return matmul_shapes(&parse_args_from(args));
    }
    let a = parse_args();
    let dev = Device::Cpu;
    let store = ParamStore::new(a.dtype, dev.clone(), 7);
    let model = Model::new(&store, &a)?;
    let (b, l, d) = (a.batch, a.seq, a.hidden);
    let ids: Vec<u32> = (0..b * l).map(|i| ((i * 2654435761usize) >> 7) as u32 % 256).collect();
    let tgt: Vec<u32> = (0..b * l).map(|i| ((i * 40503usize + 17) >> 3) as u32 % 256).collect();
    let ids = Tensor::from_vec(ids, (b, l), &dev)?;
    let tgt = Tensor::from_vec(tgt, (b, l), &dev)?;
    println!(
        "train_step: layers {} hidden {d} seq {l} batch {b} kv_heads {} mlp {} {:?}, {} rayon threads, {} params",
        a.layers,
        a.kv_heads,
        a.mlp,
        a.dtype,
        rayon_threads(),
        store.num_elements()
    );

    let hstore = ParamStore::new(a.dtype, dev.clone(), 7);
    let hybrid = HybridModel::new(&hstore.root(), &hybrid_config(&a))?;
    let full = if a.only.is_some() {
        (1.0, 1.0, 1.0, 1.0)
    } else {
        let own = time(a.iters, || model.loss(&ids, &tgt), |y| y.backward().map(drop))?;
        println!(
            "step (the harness's own assembly of the layers): fwd {:.2} ms, bwd {:.2} ms, total {:.2} ms \
             (cpu {:.2})",
            own.0,
            own.1,
            own.2,
            LAST_CPU_MS.with(|c| c.get())
        );
        time(a.iters, || hybrid_loss(&hybrid, &ids, &tgt), |y| y.backward().map(drop))?
    };
    if a.only.is_none() {
        // One more step with the backward profiler on: where the backward time goes, per op.
        let loss = hybrid_loss(&hybrid, &ids, &tgt)?;
        moeba_autograd::set_backward_profiling(true);
        loss.backward()?;
        moeba_autograd::set_backward_profiling(false);
        print_profile();
    }
    let tokens = (b * l) as f64;
    println!(
        "step (HybridModel): fwd {:.2} ms, bwd {:.2} ms, total {:.2} ms (min {:.2}, cpu {:.2}) -> {:.0} tokens/s",
        full.0,
        full.1,
        full.2,
        full.3,
        LAST_CPU_MS.with(|c| c.get()),
        tokens / (full.2 / 1e3)
    );

    // Per component: one layer alone on a random input, its backward seeded with a random grad.
    let x = Var::param(Tensor::randn(1, (b, l, d), 0.0, 1.0, a.dtype, &dev)?);
    let gy = Tensor::randn(2, (b, l, d), 0.0, 1.0, a.dtype, &dev)?;
    let seeded = |y: &Var| y.backward_with(gy.clone()).map(drop);
    let keep = |name: &str| a.only.as_ref().is_none_or(|o| name.contains(o.as_str()));
    let skipped = (0.0, 0.0, 0.0, 0.0);
    let total = full.2;
    let mut sum = 0.0;
    let r = if keep("embedding") { time(a.iters, || model.embed.forward(&ids), seeded)? } else { skipped };
    report("embedding", r, total);
    sum += r.2;
    let n_blocks = model.blocks.len();
    let mut norms = 1;
    for (i, blk) in model.blocks.iter().enumerate() {
        let name = match blk.mixer {
            Mixer::Mamba(_) => format!("layer {i} mamba"),
            Mixer::Attn(_) => format!("layer {i} attention"),
        };
        let r = if keep(&name) { time(a.iters, || blk.mixer.forward(&x), seeded)? } else { skipped };
        if a.only.is_some() && keep(&name) {
            let y = blk.mixer.forward(&x)?;
            moeba_autograd::set_backward_profiling(true);
            y.backward_with(gy.clone())?;
            moeba_autograd::set_backward_profiling(false);
            print_profile();
        }
        report(&name, r, total);
        sum += r.2;
        let name = match blk.ffn {
            Ffn::Mlp(_) => format!("layer {i} mlp"),
            Ffn::Moe(_) => format!("layer {i} moe"),
        };
        let r = if keep(&name) { time(a.iters, || blk.ffn.forward(&x), seeded)? } else { skipped };
        if a.only.is_some() && keep(&name) {
            let y = blk.ffn.forward(&x)?;
            moeba_autograd::set_backward_profiling(true);
            y.backward_with(gy.clone())?;
            moeba_autograd::set_backward_profiling(false);
            print_profile();
        }
        report(&name, r, total);
        sum += r.2;
        norms += 2;
    }
    let r = if keep("rmsnorm") { time(a.iters, || model.norm.forward(&x), seeded)? } else { skipped };
    report(&format!("rmsnorm (each, x{norms})"), r, total);
    sum += r.2 * norms as f64;
    let r = if keep("residual") { time(a.iters, || x.add(&x.affine(1.0, 0.0)?), seeded)? } else { skipped };
    report(&format!("residual add (each, x{})", 2 * n_blocks), r, total);
    sum += r.2 * (2 * n_blocks) as f64;
    let r = if keep("head") {
        time(a.iters, || head_loss(&x, &model.embed, &tgt), |y| y.backward().map(drop))?
    } else {
        skipped
    };
    report("tied head + cross-entropy", r, total);
    sum += r.2;
    println!("sum of components {sum:.2} ms = {:.1}% of the step", 100.0 * sum / total);
    Ok(())
}

fn print_profile() {
    let prof = moeba_autograd::take_backward_profile();
    let total: f64 = prof.iter().map(|p| p.1.as_secs_f64()).sum();
    println!("backward by op (one step, {:.2} ms in rules):", total * 1e3);
    for (name, d, n) in prof.iter().take(14) {
        println!("  {name:<26} {:>8.2} ms  {:>4} calls", d.as_secs_f64() * 1e3, n);
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}
