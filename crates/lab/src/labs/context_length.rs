//! The `context-length` lab: how time, memory and the decoding cache grow with the context for
//! one layer of attention (materialised and memory-efficient), Mamba-1, Mamba-2 and a
//! Jamba-style hybrid block, at equal width.
//!
//! For each mixer and each context length (doubling from `min_len` to `max_len`), it measures
//! the forward time and peak heap bytes (no tape), the forward+backward time and peak heap bytes
//! (gradients of every parameter), the decoding cache at that context and the time and
//! transient memory of one generated token. A mixer is stopped cleanly, before it runs, when
//! the next length is predicted (from its own measured growth between the last two lengths)
//! to need more than `--mem-budget` bytes or more than `max_seconds` for a forward+backward.
//! Exponents are least-squares slopes on log-log axes.
//!
//! Peak memory needs the counting allocator ([`crate::alloc`]) registered as the global
//! allocator (the `moeba` binary and the lab tests do); without it memory is reported as
//! unmeasured (`null`) and only the time limit stops a mixer.

use std::time::Instant;

use moeba_autograd::fused::attention as fused;
use moeba_autograd::{no_grad, Var};
use moeba_nn::attention::Attention;
use moeba_nn::mamba::{MambaBlock, MambaCache, MambaConfig};
use moeba_nn::mamba2::{Mamba2Block, Mamba2Cache, Mamba2Config};
use moeba_nn::{AttentionConfig, KvCache, ParamStore, RmsNorm, RopeConfig};
use moeba_tensor::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::plot::{plot_lines, LineChart, Series};
use crate::report::{finish, md_table, Report};
use crate::{alloc, LabError, LabOptions, LabRun, Result};

/// The lab's name.
pub const NAME: &str = "context-length";

/// The settings `--set` accepts.
pub const KEYS: [&str; 9] =
    ["d_model", "heads", "min_len", "max_len", "max_seconds", "decode_steps", "reps", "seed", "mixers"];

/// The mixers, in the order they are run and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixerKind {
    /// Causal attention with the `(h, l, l)` score matrix materialised (matmul, mask, softmax).
    AttentionMaterialised,
    /// moeba's tiled attention with an online softmax (`O(l)` memory).
    AttentionFlash,
    /// Mamba-1 (selective scan).
    Mamba1,
    /// Mamba-2 (SSD).
    Mamba2,
    /// A Jamba-style block: Mamba-1, Mamba-1, attention (memory-efficient), Mamba-1, each
    /// pre-normed with a residual (Jamba's 1:7 attention ratio scaled to 1:3).
    Hybrid,
}

impl MixerKind {
    /// Every mixer.
    pub const ALL: [MixerKind; 5] = [
        MixerKind::AttentionMaterialised,
        MixerKind::AttentionFlash,
        MixerKind::Mamba1,
        MixerKind::Mamba2,
        MixerKind::Hybrid,
    ];

    /// The key in results.json and `--set mixers=`.
    pub fn key(self) -> &'static str {
        match self {
            MixerKind::AttentionMaterialised => "attention_materialised",
            MixerKind::AttentionFlash => "attention",
            MixerKind::Mamba1 => "mamba1",
            MixerKind::Mamba2 => "mamba2",
            MixerKind::Hybrid => "hybrid",
        }
    }

    /// The name in the report and the plots.
    pub fn label(self) -> &'static str {
        match self {
            MixerKind::AttentionMaterialised => "attention (materialised)",
            MixerKind::AttentionFlash => "attention (memory-efficient)",
            MixerKind::Mamba1 => "Mamba-1",
            MixerKind::Mamba2 => "Mamba-2",
            MixerKind::Hybrid => "Jamba-style block (3 Mamba-1 + 1 attention)",
        }
    }
}

/// The lab's settings.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    d_model: usize,
    heads: usize,
    min_len: usize,
    max_len: usize,
    max_seconds: f64,
    decode_steps: usize,
    reps: usize,
    seed: u64,
    mixers: Vec<MixerKind>,
}

impl Settings {
    fn from_options(opts: &LabOptions) -> Result<Self> {
        opts.check_keys(NAME, &KEYS)?;
        let (d, h, lo, hi, secs, steps) =
            if opts.quick { (32, 2, 128, 1024, 20.0, 4) } else { (128, 4, 1024, 131072, 60.0, 16) };
        let mixers_s: String = opts.get("mixers", String::from("all"))?;
        let mixers = if mixers_s == "all" {
            MixerKind::ALL.to_vec()
        } else {
            mixers_s
                .split(',')
                .map(|m| {
                    MixerKind::ALL.into_iter().find(|k| k.key() == m.trim()).ok_or_else(|| {
                        LabError::Invalid(format!(
                            "--set mixers={mixers_s}: unknown mixer `{m}`; the mixers are: all, {}",
                            MixerKind::ALL.map(|k| k.key()).join(", ")
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let s = Settings {
            d_model: opts.get("d_model", d)?,
            heads: opts.get("heads", h)?,
            min_len: opts.get("min_len", lo)?,
            max_len: opts.get("max_len", hi)?,
            max_seconds: opts.get("max_seconds", secs)?,
            decode_steps: opts.get("decode_steps", steps)?,
            reps: opts.get("reps", if opts.quick { 1 } else { 2 })?,
            seed: opts.get("seed", 0)?,
            mixers,
        };
        let bad = |msg: String| Err(LabError::Invalid(format!("lab `{NAME}`: {msg}")));
        if s.d_model == 0 || s.heads == 0 || !s.d_model.is_multiple_of(s.heads) {
            return bad(format!("d_model {} must be a positive multiple of heads {}", s.d_model, s.heads));
        }
        if !(s.d_model / s.heads).is_multiple_of(2) {
            return bad(format!(
                "the head width d_model/heads = {} must be even (RoPE)",
                s.d_model / s.heads
            ));
        }
        if s.min_len < 8 || s.max_len < s.min_len {
            return bad(format!(
                "need 8 <= min_len <= max_len, got min_len {} and max_len {}",
                s.min_len, s.max_len
            ));
        }
        if s.max_seconds.is_nan() || s.max_seconds <= 0.0 {
            return bad(format!("max_seconds must be > 0, got {}", s.max_seconds));
        }
        if s.decode_steps == 0 || s.reps == 0 {
            return bad(format!("decode_steps ({}) and reps ({}) must be >= 1", s.decode_steps, s.reps));
        }
        if s.mixers.is_empty() {
            return bad("no mixer selected".into());
        }
        Ok(s)
    }

    fn lengths(&self) -> Vec<usize> {
        std::iter::successors(Some(self.min_len), |&l| l.checked_mul(2))
            .take_while(|&l| l <= self.max_len)
            .collect()
    }

    fn mamba2_head_dim(&self) -> usize {
        (2 * self.d_model / 4).clamp(1, 64)
    }
}

/// A pre-normed residual sub-layer of the hybrid block.
#[derive(Debug)]
enum HybridLayer {
    Mamba(RmsNorm, MambaBlock),
    Attention(RmsNorm, Attention),
}

/// One built mixer with its parameters.
#[derive(Debug)]
enum Built {
    Attention(Attention),
    Mamba1(MambaBlock),
    Mamba2(Mamba2Block),
    Hybrid(Vec<HybridLayer>),
}

/// A mixer's decoding state.
enum DecodeState {
    Attention(KvCache),
    Mamba1(MambaCache),
    Mamba2(Mamba2Cache),
    Hybrid(Vec<HybridState>),
}

enum HybridState {
    Mamba(MambaCache),
    Attention(KvCache),
}

fn attention_config(s: &Settings) -> AttentionConfig {
    let mut c = AttentionConfig::new(s.d_model, s.heads, s.heads, s.d_model / s.heads);
    c.rope = Some(RopeConfig::rotate_half(10000.0));
    c
}

fn build(kind: MixerKind, s: &Settings) -> Result<(Built, usize)> {
    let store = ParamStore::new(DType::F32, Device::Cpu, s.seed);
    let root = store.root();
    let d = s.d_model;
    let built = match kind {
        MixerKind::AttentionMaterialised | MixerKind::AttentionFlash => {
            Built::Attention(Attention::new(&root.pp("attn"), &attention_config(s))?)
        }
        MixerKind::Mamba1 => Built::Mamba1(MambaBlock::new(&root.pp("mamba"), &MambaConfig::new(d))?),
        MixerKind::Mamba2 => {
            let mut c = Mamba2Config::new(d);
            c.head_dim = s.mamba2_head_dim();
            c.num_heads = 2 * d / c.head_dim;
            c.d_state = if s.d_model >= 128 { 64 } else { 16 };
            Built::Mamba2(Mamba2Block::new(&root.pp("mamba2"), &c)?)
        }
        MixerKind::Hybrid => {
            let mut layers = Vec::new();
            for i in 0..4 {
                let p = root.pp("layers").pp(i);
                let norm = RmsNorm::new(&p.pp("input_layernorm"), d, 1e-6)?;
                layers.push(if i == 2 {
                    HybridLayer::Attention(norm, Attention::new(&p.pp("attn"), &attention_config(s))?)
                } else {
                    HybridLayer::Mamba(norm, MambaBlock::new(&p.pp("mamba"), &MambaConfig::new(d))?)
                });
            }
            Built::Hybrid(layers)
        }
    };
    Ok((built, store.num_elements()))
}

/// Causal attention with the score matrix materialised: `softmax(mask(q kᵀ · scale)) v`, every
/// intermediate recorded on the tape (what a textbook implementation does).
fn materialised_attention(attn: &Attention, x: &Var) -> Result<Var> {
    let c = attn.config();
    let (b, l) = (x.dims()[0], x.dims()[1]);
    let (h, hd) = (c.num_heads, c.head_dim);
    let heads =
        |p: &moeba_nn::Linear| -> Result<Var> { Ok(p.forward(x)?.reshape((b, l, h, hd))?.transpose(1, 2)?) };
    let (mut q, mut k, v) = (heads(&attn.q_proj)?, heads(&attn.k_proj)?, heads(&attn.v_proj)?);
    if let Some(r) = &c.rope {
        q = fused::rope(&q, &r.options(0))?;
        k = fused::rope(&k, &r.options(0))?;
    }
    let mask: Vec<u32> = (0..l * l).map(|i| u32::from(i % l > i / l)).collect();
    let mask = Tensor::from_vec(mask, (l, l), &Device::Cpu)?;
    let scores = q.matmul(&k.transpose(2, 3)?)?.scale(c.softmax_scale())?;
    let p = scores.masked_fill(&mask, f64::NEG_INFINITY)?.softmax(3)?;
    let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h * hd))?;
    Ok(attn.o_proj.forward(&o)?)
}

fn forward(kind: MixerKind, built: &Built, x: &Var) -> Result<Var> {
    Ok(match built {
        Built::Attention(a) if kind == MixerKind::AttentionMaterialised => materialised_attention(a, x)?,
        Built::Attention(a) => a.forward(x)?,
        Built::Mamba1(m) => m.forward(x, None)?,
        Built::Mamba2(m) => m.forward(x, None)?,
        Built::Hybrid(layers) => {
            let mut h = x.clone();
            for layer in layers {
                let y = match layer {
                    HybridLayer::Mamba(n, m) => m.forward(&n.forward(&h)?, None)?,
                    HybridLayer::Attention(n, a) => a.forward(&n.forward(&h)?)?,
                };
                h = h.add(&y)?;
            }
            h
        }
    })
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn kv_bytes(c: &KvCache) -> u64 {
    (c.len() * c.bytes_per_token()) as u64
}

/// A decoding state holding a context of `len` tokens: the attention caches hold random keys and
/// values (a step's cost depends on how many there are, not on their values); the Mamba states
/// come from a prefill of `x`.
fn decode_state(built: &Built, x: &Tensor, len: usize, s: &Settings) -> Result<DecodeState> {
    let _g = no_grad();
    let kv = |a: &Attention, seed: u64| -> Result<KvCache> {
        let c = a.config();
        let mut cache = a.new_cache(1, len + s.decode_steps + 1)?;
        let shape = (1, c.kv_heads, len, c.head_dim);
        let k = Tensor::randn(seed, shape, 0.0, 1.0, DType::F32, &Device::Cpu)?;
        let v = Tensor::randn(seed + 1, shape, 0.0, 1.0, DType::F32, &Device::Cpu)?;
        cache.append(&k, &v)?;
        Ok(cache)
    };
    Ok(match built {
        Built::Attention(a) => DecodeState::Attention(kv(a, s.seed + 11)?),
        Built::Mamba1(m) => DecodeState::Mamba1(m.prefill(x)?.1),
        Built::Mamba2(m) => DecodeState::Mamba2(m.prefill(x)?.1),
        Built::Hybrid(layers) => DecodeState::Hybrid(
            layers
                .iter()
                .map(|l| {
                    Ok(match l {
                        HybridLayer::Mamba(_, m) => HybridState::Mamba(m.prefill(x)?.1),
                        HybridLayer::Attention(_, a) => HybridState::Attention(kv(a, s.seed + 13)?),
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    })
}

fn state_bytes(state: &DecodeState) -> u64 {
    let mamba = |c: &MambaCache| tensor_bytes(&c.conv_state) + tensor_bytes(&c.ssm_state);
    match state {
        DecodeState::Attention(c) => kv_bytes(c),
        DecodeState::Mamba1(c) => mamba(c),
        DecodeState::Mamba2(c) => tensor_bytes(&c.conv_state) + tensor_bytes(&c.ssm_state),
        DecodeState::Hybrid(v) => v
            .iter()
            .map(|h| match h {
                HybridState::Mamba(c) => mamba(c),
                HybridState::Attention(c) => kv_bytes(c),
            })
            .sum(),
    }
}

/// One generated token `x (1, d)` through the mixer.
fn decode_step(built: &Built, state: &mut DecodeState, x: &Tensor) -> Result<Tensor> {
    let _g = no_grad();
    let d = x.dims()[1];
    Ok(match (built, state) {
        (Built::Attention(a), DecodeState::Attention(c)) => a.forward_step(&x.reshape((1, 1, d))?, c)?,
        (Built::Mamba1(m), DecodeState::Mamba1(c)) => m.forward_step(x, c)?,
        (Built::Mamba2(m), DecodeState::Mamba2(c)) => m.forward_step(x, c)?,
        (Built::Hybrid(layers), DecodeState::Hybrid(states)) => {
            let mut h = Var::constant(x.clone());
            for (layer, st) in layers.iter().zip(states.iter_mut()) {
                let y = match (layer, st) {
                    (HybridLayer::Mamba(n, m), HybridState::Mamba(c)) => {
                        m.forward_step(n.forward(&h)?.tensor(), c)?
                    }
                    (HybridLayer::Attention(n, a), HybridState::Attention(c)) => {
                        a.forward_step(&n.forward(&h)?.tensor().reshape((1, 1, d))?, c)?.reshape((1, d))?
                    }
                    _ => return Err(LabError::Msg("context-length: hybrid state out of step".into())),
                };
                h = h.add(&Var::constant(y))?;
            }
            h.tensor().clone()
        }
        _ => return Err(LabError::Msg("context-length: decoding state of another mixer".into())),
    })
}

/// Runs `f` up to `reps` times (once when a run takes over a second); returns the fastest time
/// and the largest peak (None: unmeasured).
fn timed(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Option<u64>)> {
    let mut best = f64::INFINITY;
    let mut peak: Option<u64> = None;
    for rep in 0..reps {
        // Repeats only pay off on short runs; a run over a second is timed once.
        if rep > 0 && best > 1.0 {
            break;
        }
        let t0 = Instant::now();
        let ((), p) = {
            let (r, p) = alloc::measure_peak(&mut f);
            r?;
            ((), p)
        };
        best = best.min(t0.elapsed().as_secs_f64());
        peak = match (peak, p) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (_, p) => p,
        };
    }
    Ok((best, peak))
}

/// One measured context length of one mixer.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    len: usize,
    fwd_s: f64,
    fwd_peak: Option<u64>,
    fwdbwd_s: f64,
    fwdbwd_peak: Option<u64>,
    cache_bytes: Option<u64>,
    decode_s: Option<f64>,
    decode_peak: Option<u64>,
}

impl Point {
    fn json(&self) -> Value {
        json!({
            "len": self.len,
            "forward_s": self.fwd_s,
            "forward_peak_bytes": self.fwd_peak,
            "forward_backward_s": self.fwdbwd_s,
            "forward_backward_peak_bytes": self.fwdbwd_peak,
            "cache_bytes": self.cache_bytes,
            "cache_bytes_per_token": self.cache_bytes.map(|b| b as f64 / self.len as f64),
            "decode_step_s": self.decode_s,
            "decode_step_peak_bytes": self.decode_peak,
        })
    }
}

/// Measures `kind` at `len`.
fn measure(kind: MixerKind, built: &Built, s: &Settings, len: usize) -> Result<Point> {
    let x = Tensor::randn(s.seed + len as u64, (1, len, s.d_model), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    let (fwd_s, fwd_peak) = timed(s.reps, || {
        let _g = no_grad();
        let y = forward(kind, built, &Var::constant(x.clone()))?;
        drop(std::hint::black_box(y));
        Ok(())
    })?;
    let (fwdbwd_s, fwdbwd_peak) = timed(s.reps, || {
        let y = forward(kind, built, &Var::constant(x.clone()))?;
        let grads = y.sum_all()?.backward()?;
        drop(std::hint::black_box(grads));
        Ok(())
    })?;
    // Decoding: the materialised variant decodes like the memory-efficient one (one query row).
    let (cache_bytes, decode_s, decode_peak) = if kind == MixerKind::AttentionMaterialised {
        (None, None, None)
    } else {
        let mut state = decode_state(built, &x, len, s)?;
        let cache = state_bytes(&state);
        let tok = |i: usize| {
            Tensor::randn(s.seed + 7 + i as u64, (1, s.d_model), 0.0, 1.0, DType::F32, &Device::Cpu)
        };
        // One warm-up step, then the measured ones.
        decode_step(built, &mut state, &tok(0)?)?;
        let toks = (1..=s.decode_steps).map(tok).collect::<moeba_tensor::Result<Vec<_>>>()?;
        let t0 = Instant::now();
        let (r, peak) = alloc::measure_peak(|| -> Result<()> {
            for t in &toks {
                drop(std::hint::black_box(decode_step(built, &mut state, t)?));
            }
            Ok(())
        });
        r?;
        let per = t0.elapsed().as_secs_f64() / s.decode_steps as f64;
        (Some(cache), Some(per), peak)
    };
    Ok(Point { len, fwd_s, fwd_peak, fwdbwd_s, fwdbwd_peak, cache_bytes, decode_s, decode_peak })
}

/// The least-squares slope of `ln y` against `ln x` (None with fewer than two usable points).
pub fn loglog_slope(points: &[(f64, f64)]) -> Option<f64> {
    let p: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0 && x.is_finite() && y.is_finite())
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    if p.len() < 2 {
        return None;
    }
    let n = p.len() as f64;
    let (mx, my) = (p.iter().map(|q| q.0).sum::<f64>() / n, p.iter().map(|q| q.1).sum::<f64>() / n);
    let sxx: f64 = p.iter().map(|q| (q.0 - mx).powi(2)).sum();
    let sxy: f64 = p.iter().map(|q| (q.0 - mx) * (q.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The value at `next` extrapolated from the last two points `(len, value)` on log-log axes
/// (the growth exponent is clamped to at least 0).
fn extrapolate(prev: (usize, f64), last: (usize, f64), next: usize) -> f64 {
    let k = if prev.1 > 0.0 && last.1 > 0.0 && last.0 > prev.0 {
        ((last.1 / prev.1).ln() / (last.0 as f64 / prev.0 as f64).ln()).max(0.0)
    } else {
        1.0
    };
    last.1 * (next as f64 / last.0 as f64).powf(k)
}

/// Why a mixer stopped before `max_len`.
#[derive(Debug, Clone, PartialEq)]
struct Stop {
    next_len: usize,
    reason: String,
    predicted_bytes: Option<f64>,
    predicted_s: f64,
}

/// A mixer's whole run.
#[derive(Debug, Clone)]
struct MixerRun {
    kind: MixerKind,
    params: usize,
    points: Vec<Point>,
    stop: Option<Stop>,
}

impl MixerRun {
    fn series(&self, f: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
        self.points.iter().filter_map(|p| f(p).map(|v| (p.len as f64, v))).collect()
    }

    fn exponent(&self, f: impl Fn(&Point) -> Option<f64>, tail: bool) -> Option<f64> {
        let s = self.series(f);
        let s = if tail && s.len() > 3 { &s[s.len() - 3..] } else { &s[..] };
        loglog_slope(s)
    }

    fn exponents(&self, tail: bool) -> Value {
        let e = |f: &dyn Fn(&Point) -> Option<f64>| self.exponent(f, tail);
        json!({
            "forward_time": e(&|p| Some(p.fwd_s)),
            "forward_backward_time": e(&|p| Some(p.fwdbwd_s)),
            "forward_memory": e(&|p| p.fwd_peak.map(|b| b as f64)),
            "forward_backward_memory": e(&|p| p.fwdbwd_peak.map(|b| b as f64)),
            "cache_bytes": e(&|p| p.cache_bytes.map(|b| b as f64)),
            "decode_step_time": e(&|p| p.decode_s),
        })
    }

    fn longest(&self) -> usize {
        self.points.last().map_or(0, |p| p.len)
    }

    /// The longest doubling length (up to `max_len`) whose peak memory fits `budget`, and whether
    /// it was measured (else extrapolated from the last two measured peaks on log-log axes).
    /// None when memory is unmeasured or nothing ran.
    fn fits_budget(&self, budget: f64, max_len: usize) -> Option<(usize, bool)> {
        let peaks: Vec<(usize, f64)> =
            self.points.iter().filter_map(|p| peak_of(p).map(|m| (p.len, m))).collect();
        let &last = peaks.last()?;
        let memory_stop = self.stop.as_ref().is_some_and(|st| st.reason.starts_with("memory"));
        if memory_stop || peaks.len() < 2 {
            return Some((last.0, true));
        }
        let prev = peaks[peaks.len() - 2];
        let mut len = last.0;
        while let Some(next) = len.checked_mul(2).filter(|&n| n <= max_len) {
            if extrapolate(prev, last, next) > budget {
                break;
            }
            len = next;
        }
        Some((len, len == last.0))
    }
}

/// `/proc/loadavg`'s 1-minute figure (other work on the machine skews the timings).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

fn fmt_len(l: usize) -> String {
    if l >= 1024 && l.is_multiple_of(1024) {
        format!("{}K", l / 1024)
    } else {
        l.to_string()
    }
}

fn fmt_exp(v: Option<f64>) -> String {
    opt(v, |e| format!("{e:.2}"))
}

fn fmt_bytes(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Runs the lab.
pub fn run(opts: &LabOptions) -> Result<LabRun> {
    let s = Settings::from_options(opts)?;
    let load = load_average();
    let lengths = s.lengths();
    // Measurements run in a pool whose threads alone are counted by the allocator, one lab run
    // at a time in this process.
    let _exclusive = alloc::exclusive();
    let pool = alloc::measured_pool(0)
        .map_err(|e| LabError::Msg(format!("lab `{NAME}`: cannot start the measuring threads: {e}")))?;
    let measured = pool.install(alloc::enable);
    let budget = opts.mem_budget as f64;
    // The input and the output of the smallest context alone: no mixer can do with less.
    let floor = (2 * s.min_len * s.d_model * 4) as f64;
    if budget < floor {
        return Err(LabError::Invalid(format!(
            "lab `{NAME}`: --mem-budget {} is too small for the smallest context length {} (its input and output \
             alone take {}); raise --mem-budget or lower --set min_len",
            fmt_bytes(budget),
            s.min_len,
            fmt_bytes(floor)
        )));
    }

    let bar = opts.progress.then(|| {
        let pb = indicatif::ProgressBar::new((s.mixers.len() * lengths.len()) as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });

    let runs = pool.install(|| -> Result<Vec<MixerRun>> {
        let mut runs = Vec::new();
        for &kind in &s.mixers {
            let (built, params) = build(kind, &s)?;
            // Calibration at a quarter and a half of the smallest length (also the warm-up): the
            // first prediction for min_len comes from its growth.
            let cal: Vec<usize> = [s.min_len / 4, s.min_len / 2].into_iter().filter(|&l| l >= 2).collect();
            let mut history: Vec<(usize, f64, Option<f64>)> = Vec::new();
            for &l in &cal {
                let cs = Settings { reps: 1, decode_steps: 1, ..s.clone() };
                let p = measure(kind, &built, &cs, l)?;
                history.push((l, p.fwdbwd_s, peak_of(&p)));
            }
            let mut run = MixerRun { kind, params, points: Vec::new(), stop: None };
            for &len in &lengths {
                if let Some(stop) = predict_stop(&history, len, budget, s.max_seconds, measured) {
                    if let Some(pb) = &bar {
                        pb.suspend(|| eprintln!("{:<46} stopped: {}", kind.label(), stop.reason));
                    }
                    run.stop = Some(stop);
                    break;
                }
                if let Some(pb) = &bar {
                    pb.set_message(format!("{} at {}", kind.label(), fmt_len(len)));
                }
                let p = measure(kind, &built, &s, len)?;
                history.push((len, p.fwdbwd_s, peak_of(&p)));
                if let Some(pb) = &bar {
                    // One line per measurement (above the bar on a terminal, plain in a log).
                    pb.suspend(|| {
                        eprintln!(
                            "{:<46} {:>5}: fwd {:>9.2} ms, fwd+bwd {:>9.2} ms, peak {} MiB, decode {} ms/token",
                            kind.label(),
                            fmt_len(len),
                            p.fwd_s * 1e3,
                            p.fwdbwd_s * 1e3,
                            opt(p.fwdbwd_peak, mib),
                            opt(p.decode_s, |t| format!("{:.3}", t * 1e3))
                        )
                    });
                }
                run.points.push(p);
                if let Some(pb) = &bar {
                    pb.inc(1);
                }
            }
            if let Some(pb) = &bar {
                pb.inc((lengths.len() - run.points.len()) as u64);
            }
            runs.push(run);
        }
        Ok(runs)
    })?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    if runs.iter().all(|r| r.points.is_empty()) {
        return Err(LabError::Invalid(format!(
            "lab `{NAME}`: no mixer can run the smallest context length {} within --mem-budget {} and \
             max_seconds {}: {}; raise --mem-budget or lower --set min_len",
            s.min_len,
            fmt_bytes(budget),
            s.max_seconds,
            runs.iter()
                .filter_map(|r| r.stop.as_ref().map(|st| format!("{}: {}", r.kind.label(), st.reason)))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    write(opts, &s, &lengths, &runs, measured, load)
}

fn peak_of(p: &Point) -> Option<f64> {
    [p.fwd_peak, p.fwdbwd_peak, p.decode_peak].into_iter().flatten().max().map(|b| b as f64)
}

/// Whether to stop before `next`: its predicted peak memory over `budget` (from the last two
/// lengths) or forward+backward time over `max_s` (from a log-log fit of the last four).
fn predict_stop(
    history: &[(usize, f64, Option<f64>)],
    next: usize,
    budget: f64,
    max_s: f64,
    measured: bool,
) -> Option<Stop> {
    let n = history.len();
    if n < 2 {
        return None;
    }
    let (a, b) = (&history[n - 2], &history[n - 1]);
    // Time is noisy (other processes): the least-squares line through the last four points,
    // not the last two, predicts it. Memory is deterministic: the last two points do.
    let tail: Vec<(f64, f64)> = history[n.saturating_sub(4)..].iter().map(|h| (h.0 as f64, h.1)).collect();
    let predicted_s = match loglog_slope(&tail) {
        Some(k) if tail.len() >= 3 => {
            let k = k.clamp(0.0, 3.0);
            let n_t = tail.len() as f64;
            let mean_x = tail.iter().map(|p| p.0.ln()).sum::<f64>() / n_t;
            let mean_y = tail.iter().map(|p| p.1.max(1e-12).ln()).sum::<f64>() / n_t;
            (mean_y + k * ((next as f64).ln() - mean_x)).exp()
        }
        _ => extrapolate((a.0, a.1), (b.0, b.1), next),
    };
    let predicted_bytes = match (measured, a.2, b.2) {
        (true, Some(pa), Some(pb)) => Some(extrapolate((a.0, pa), (b.0, pb), next)),
        _ => None,
    };
    if let Some(m) = predicted_bytes.filter(|&m| m > budget) {
        return Some(Stop {
            next_len: next,
            reason: format!(
                "memory: about {} predicted at {} tokens, over the budget of {}",
                fmt_bytes(m),
                fmt_len(next),
                fmt_bytes(budget)
            ),
            predicted_bytes,
            predicted_s,
        });
    }
    if predicted_s > max_s {
        return Some(Stop {
            next_len: next,
            reason: format!(
                "time: a forward+backward at {} tokens predicted to take {:.0} s, over max_seconds = {max_s}",
                fmt_len(next),
                predicted_s
            ),
            predicted_bytes,
            predicted_s,
        });
    }
    None
}

fn write(
    opts: &LabOptions,
    s: &Settings,
    lengths: &[usize],
    runs: &[MixerRun],
    measured: bool,
    load: Option<f64>,
) -> Result<LabRun> {
    let dir = &opts.out;
    std::fs::create_dir_all(dir).map_err(|source| LabError::Io { path: dir.clone(), source })?;
    let mut plots = Vec::new();
    let line = |title: &str, y: &str, f: &dyn Fn(&Point) -> Option<f64>, skip_mat: bool| LineChart {
        title: title.into(),
        x_label: "context length (tokens)".into(),
        y_label: y.into(),
        log_x: true,
        log_y: true,
        series: runs
            .iter()
            .map(|r| Series {
                name: r.kind.label().into(),
                // Left out (its colour kept) where the materialised variant has no figure.
                points: if skip_mat && r.kind == MixerKind::AttentionMaterialised {
                    Vec::new()
                } else {
                    r.series(f)
                },
            })
            .collect(),
    };
    let mib_of = |b: Option<u64>| b.map(|b| b as f64 / (1u64 << 20) as f64).filter(|v| *v > 0.0);
    let charts = [
        ("time_forward", line("Forward time (one layer, batch 1)", "seconds", &|p| Some(p.fwd_s), false)),
        (
            "time_forward_backward",
            line("Forward + backward time (one layer, batch 1)", "seconds", &|p| Some(p.fwdbwd_s), false),
        ),
        (
            "memory_forward_backward",
            line(
                "Peak memory of forward + backward",
                "peak heap MiB above the weights",
                &|p| mib_of(p.fwdbwd_peak),
                false,
            ),
        ),
        (
            "memory_forward",
            line(
                "Peak memory of the forward",
                "peak heap MiB above the weights",
                &|p| mib_of(p.fwd_peak),
                false,
            ),
        ),
        (
            "decode_time",
            line("Decoding: time per generated token", "seconds per token", &|p| p.decode_s, true),
        ),
        (
            "cache_bytes",
            line(
                "Decoding cache at the context length",
                "cache KiB",
                &|p| p.cache_bytes.map(|b| b as f64 / 1024.0),
                true,
            ),
        ),
    ];
    let mut figures = Vec::new();
    for (stem, chart) in charts {
        if chart.series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        plots.extend(plot_lines(&chart, dir, stem)?);
        figures.push((chart.title.clone(), format!("{stem}.png")));
    }

    let mixers: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "key": r.kind.key(),
                "name": r.kind.label(),
                "params": r.params,
                "points": r.points.iter().map(Point::json).collect::<Vec<_>>(),
                "longest_context": r.longest(),
                "fits_budget_up_to": r.fits_budget(opts.mem_budget as f64, s.max_len).map(|(l, measured)| json!({
                    "len": l,
                    "measured": measured,
                })),
                "stopped": r.stop.as_ref().map(|st| json!({
                    "next_len": st.next_len,
                    "reason": st.reason,
                    "predicted_peak_bytes": st.predicted_bytes,
                    "predicted_forward_backward_s": st.predicted_s,
                })),
                "exponents": r.exponents(false),
                "exponents_last3": r.exponents(true),
            })
        })
        .collect();
    let results = json!({
        "memory_measured": measured,
        "load_average_at_start": load,
        "budget_bytes": opts.mem_budget,
        "lengths": lengths,
        "mixers": mixers,
    });
    let config = json!({
        "d_model": s.d_model,
        "heads": s.heads,
        "head_dim": s.d_model / s.heads,
        "mamba_d_state": 16,
        "mamba_expand": 2,
        "mamba2_head_dim": s.mamba2_head_dim(),
        "mamba2_d_state": if s.d_model >= 128 { 64 } else { 16 },
        "min_len": s.min_len,
        "max_len": s.max_len,
        "max_seconds": s.max_seconds,
        "decode_steps": s.decode_steps,
        "reps": s.reps,
        "seed": s.seed,
        "batch": 1,
        "dtype": "f32",
        "mem_budget_bytes": opts.mem_budget,
        "mixers": s.mixers.iter().map(|k| k.key()).collect::<Vec<_>>(),
    });

    // Tables.
    let summary_rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let e = r.exponents(false);
            let g = |k: &str| fmt_exp(e[k].as_f64());
            let last = r.points.last();
            vec![
                r.kind.label().into(),
                r.params.to_string(),
                fmt_len(r.longest()),
                r.stop.as_ref().map_or_else(|| "reached max_len".into(), |st| st.reason.clone()),
                opt(r.fits_budget(opts.mem_budget as f64, s.max_len), |(l, m)| {
                    if m {
                        fmt_len(l)
                    } else {
                        format!("{} (predicted)", fmt_len(l))
                    }
                }),
                g("forward_time"),
                g("forward_backward_time"),
                g("forward_backward_memory"),
                opt(last.and_then(|p| p.fwdbwd_peak), mib),
                opt(last.and_then(|p| p.cache_bytes), |b| fmt_bytes(b as f64)),
            ]
        })
        .collect();
    let summary = format!(
        "Per mixer: the longest context measured, why it stopped, the fitted log-log exponents (time or \
         memory ∝ length^k, least squares over every measured length) and, at the longest context, the peak \
         memory of a training step and the decoding cache.\n\n{}",
        md_table(
            &[
                "mixer",
                "params",
                "longest context",
                "stopped",
                "fits the budget up to",
                "k fwd time",
                "k fwd+bwd time",
                "k fwd+bwd memory",
                "fwd+bwd peak MiB",
                "cache at longest",
            ],
            &summary_rows
        )
    );
    let mut detail_rows = Vec::new();
    for r in runs {
        for p in &r.points {
            detail_rows.push(vec![
                r.kind.label().into(),
                fmt_len(p.len),
                format!("{:.2}", p.fwd_s * 1e3),
                opt(p.fwd_peak, mib),
                format!("{:.2}", p.fwdbwd_s * 1e3),
                opt(p.fwdbwd_peak, mib),
                opt(p.cache_bytes, |b| fmt_bytes(b as f64)),
                opt(p.cache_bytes, |b| format!("{:.1}", b as f64 / p.len as f64)),
                opt(p.decode_s, |t| format!("{:.3}", t * 1e3)),
                opt(p.decode_peak, |b| fmt_bytes(b as f64)),
            ]);
        }
    }
    let detail = format!(
        "Every measurement (batch 1; times are the fastest of {} runs, one run when it took over a second; memory is the peak heap above the \
         weights and the input; `—`: not measured).\n\n{}",
        s.reps,
        md_table(
            &[
                "mixer",
                "context",
                "fwd ms",
                "fwd MiB",
                "fwd+bwd ms",
                "fwd+bwd MiB",
                "cache",
                "cache B/token",
                "decode ms/token",
                "decode step peak",
            ],
            &detail_rows
        )
    );

    let machine = crate::machine::MachineInfo::collect();
    let setup = format!(
        "One layer of each mixer at width d_model = {d} in f32, batch 1: attention with {h} heads of {hd} \
         (RoPE), materialised (scores, mask and softmax as tensors on the tape) and memory-efficient (moeba's \
         tiled online-softmax kernel, O(l) memory); Mamba-1 (d_state 16, expand 2); Mamba-2 (head_dim {m2h}, \
         d_state {m2n}, expand 2); and a Jamba-style block of four pre-normed residual layers \
         (Mamba-1, Mamba-1, memory-efficient attention, Mamba-1: Jamba's 1:7 attention ratio scaled to 1:3). \
         Context lengths {lo} to {hi}, doubling. Forward: no tape. Forward+backward: the gradient of the sum \
         of the outputs with respect to every parameter. Decoding: {steps} tokens generated after a context of \
         that length (attention caches filled with random keys and values, Mamba states from a prefill). \
         A mixer stops before a length when its own growth over the last two lengths predicts more than \
         the memory budget ({budget}) or a forward+backward longer than {secs} s.\n\n\
         Peak memory: {mem}.\n\nMachine: {machine}; load average at the start {load} (work by other processes slows the \
         timings, not the memory figures). Command: `moeba lab {NAME}{quick}`.",
        d = s.d_model,
        h = s.heads,
        hd = s.d_model / s.heads,
        m2h = s.mamba2_head_dim(),
        m2n = if s.d_model >= 128 { 64 } else { 16 },
        lo = fmt_len(s.min_len),
        hi = fmt_len(s.max_len),
        steps = s.decode_steps,
        budget = fmt_bytes(opts.mem_budget as f64),
        secs = s.max_seconds,
        mem = if measured {
            "heap bytes counted by moeba's counting allocator (the lab's measuring threads, rayon workers \
             included), above the level before the call"
        } else {
            "UNMEASURED: the counting allocator is not registered in this binary, so no memory figure is given \
             and only the time limit stops a mixer"
        },
        machine = machine.summary(),
        load = opt(load, |l| format!("{l:.2}")),
        quick = if opts.quick { " --quick" } else { "" },
    );
    let report = Report {
        title: "Context length: time, memory and cache of attention, Mamba and a hybrid".into(),
        question: "How do the time, the memory and the decoding cache of one layer grow with the context length \
                   for attention (materialised and memory-efficient), Mamba-1, Mamba-2 and a Jamba-style hybrid \
                   block, and how long a context fits in the memory budget? Attention's cost is said to grow \
                   with the square of the context and Mamba's state to stay fixed."
            .into(),
        setup,
        tables: vec![summary, detail],
        figures,
        answer: answer(runs, measured, opts.mem_budget as f64, s.max_len),
    };
    finish(opts, NAME, config, results, report, plots)
}

fn answer(runs: &[MixerRun], measured: bool, budget: f64, max_len: usize) -> String {
    let mut out = Vec::new();
    for r in runs {
        let e = r.exponents(false);
        let t = e["forward_backward_time"].as_f64();
        let m = e["forward_backward_memory"].as_f64();
        let fits = match r.fits_budget(budget, max_len) {
            Some((l, true)) => format!(" Within the memory budget it fits {} (measured).", fmt_len(l)),
            Some((l, false)) => format!(
                " Its memory alone would fit {} in the budget (extrapolated from its measured growth).",
                fmt_len(l)
            ),
            None => String::new(),
        };
        let stop = match &r.stop {
            None => "it reached the largest length asked for".to_string(),
            Some(st) => format!("it stopped before {} ({})", fmt_len(st.next_len), st.reason),
        };
        let mut line = format!(
            "- **{}**: longest context {}; {stop}. Forward+backward time grows as length^{}",
            r.kind.label(),
            fmt_len(r.longest()),
            fmt_exp(t)
        );
        if measured {
            line.push_str(&format!(" and its peak memory as length^{}", fmt_exp(m)));
        }
        let caches: Vec<u64> = r.points.iter().filter_map(|p| p.cache_bytes).collect();
        if let (Some(first), Some(last)) = (caches.first(), caches.last()) {
            if first == last {
                line.push_str(&format!(
                    "; its decoding cache stays at {} whatever the context",
                    fmt_bytes(*first as f64)
                ));
            } else {
                line.push_str(&format!(
                    "; its decoding cache grows from {} to {} (×{:.0})",
                    fmt_bytes(*first as f64),
                    fmt_bytes(*last as f64),
                    *last as f64 / *first as f64
                ));
            }
        }
        let dec: Vec<f64> = r.points.iter().filter_map(|p| p.decode_s).collect();
        if let (Some(a), Some(b)) = (dec.first(), dec.last()) {
            line.push_str(&format!(
                "; a generated token takes {:.3} ms at the shortest context and {:.3} ms at the longest",
                a * 1e3,
                b * 1e3
            ));
        }
        line.push('.');
        line.push_str(&fits);
        out.push(line);
    }
    let find = |k: MixerKind| runs.iter().find(|r| r.kind == k);
    let mut verdict = String::new();
    if let (Some(a), Some(m)) = (find(MixerKind::AttentionMaterialised), find(MixerKind::Mamba1)) {
        let (ka, km) = (
            a.exponents(false)["forward_backward_memory"].as_f64(),
            m.exponents(false)["forward_backward_memory"].as_f64(),
        );
        if let (Some(ka), Some(km)) = (ka, km) {
            verdict = format!(
                "\n\nMeasured, not assumed: materialised attention's training memory grows as length^{ka:.2} \
                 against Mamba-1's length^{km:.2}, so attention {} first: the longest context within the budget is \
                 {} for materialised attention and {} for Mamba-1. The memory-efficient kernel removes the \
                 quadratic memory but not the quadratic time; only the recurrent mixers keep a decoding state \
                 that does not grow with the context.",
                if ka > km { "runs out of memory" } else { "does not run out of memory" },
                fmt_len(a.longest()),
                fmt_len(m.longest())
            );
        }
    }
    format!("{}{verdict}", out.join("\n"))
}
