//! `moeba inspect`: what a config or checkpoint describes. The layer map (each layer's mixer and
//! feed-forward), parameter counts (total and active per token), memory estimates for training
//! (weights, gradients, AdamW state, activations per recompute level) and for decoding (cache
//! bytes at a context length), and optionally the measured peak memory of one training step at
//! each recompute level.
//!
//! The activation estimate counts, per token, the numbers of every intermediate tensor the tape
//! keeps for the backward (each op's output is saved once, as the input of the next op); see
//! [`block_activations`] for the per-layer formulas. With recomputation a block keeps less, and
//! the backward temporarily rebuilds one mixer (or one block) at a time:
//!
//! - [`Recompute::None`]: embedding + Σ blocks (norms, residuals, mixer and FFN internals) + final
//!   norm + logits;
//! - [`Recompute::Mixer`]: each block keeps its input, the mixer's output and the FFN internals;
//!   plus the largest mixer's internals (rebuilt in the backward);
//! - [`Recompute::Block`]: each block keeps its input only; plus the largest block's internals.

use std::fmt::Write as _;

use moeba_autograd::Var;
use moeba_nn::moe::{MoeContext, RoutingKind};
use moeba_nn::{BlockConfig, FfnConfig, ForwardOptions, HybridConfig, HybridModel, MixerConfig, Recompute};
use moeba_tensor::{Device, Rng, Tensor};

use crate::config::RunConfig;
use crate::trainer::TrainError;

/// The inspection of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// One line per layer: (index, mixer, ffn description).
    pub layers: Vec<(usize, String, String)>,
    /// Total parameters.
    pub total_params: usize,
    /// Active parameters per token.
    pub active_params: usize,
    /// Bytes of weights + gradients + AdamW state (f32).
    pub train_state_bytes: usize,
    /// Estimated activation bytes of one training step at the config's batch and seq_len, per
    /// recompute level.
    pub activation_bytes: Vec<(Recompute, usize)>,
    /// Measured peak bytes of one training step per recompute level (when measured).
    pub measured_peak_bytes: Vec<(Recompute, usize)>,
    /// Decoding cache bytes per sequence at `context` tokens.
    pub cache_bytes: usize,
    /// The context length used for `cache_bytes`.
    pub context: usize,
}

/// Bytes per number of the model's parameters and activations (f32).
pub const BYTES_PER_NUMBER: usize = 4;

/// The recompute levels, in the order they are reported.
pub const RECOMPUTE_LEVELS: [Recompute; 3] = [Recompute::None, Recompute::Mixer, Recompute::Block];

/// Numbers per token that one block keeps for the backward (see [`block_activations`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockActivations {
    /// Inside the mixer (projections, conv, scan or attention outputs, gating).
    pub mixer: usize,
    /// Inside the feed-forward (MLP or MoE: router, gathered rows, expert activations).
    pub ffn: usize,
    /// Around them: the block input, two norms, two residual sums (`5 · d`; `3 · d` without FFN).
    pub residual: usize,
}

impl BlockActivations {
    /// Everything the block keeps without recomputation.
    pub fn total(&self) -> usize {
        self.mixer + self.ffn + self.residual
    }
}

/// Numbers per token one block keeps for its backward, by layer kind (`d` = hidden size):
///
/// - Mamba: in_proj `2·di`, conv+SiLU `2·di`, x_proj `r + 2n`, Δ `di`, scan output `di`, gate
///   SiLU and product `2·di`, out_proj `d` → `8·di + r + 2n + d`;
/// - Mamba-2: in_proj `2·di + 2·g·n + h`, conv+SiLU `2·(di + 2·g·n)`, Δ `h`, SSD output `di`,
///   chunk states `h·p·n / chunk`, gated norm `2·di`, out_proj `d`;
/// - attention: q, k, v `h·hd + 2·kv·hd`, RoPE'd q and k `h·hd + kv·hd`, output `h·hd` and
///   log-sum-exp `h`, o_proj `d`;
/// - MLA: query latent and its norm `2·ql`, queries `h·qk`, the KV latent `kvl + r`, its norm `kvl`,
///   up-projected keys and values `h·(nope + v)`, keys with the rope part `h·qk`, RoPE'd q `h·qk`,
///   output `h·v` and `h`, o_proj `d`;
/// - MLP: gate and up `2·f`, SiLU `f`, product `f`, down `d` → `4·f + d`;
/// - MoE: router logits and scores `2·E` (dense: every expert runs, `k = E`), per routed row the
///   gathered input `d`, gate/up `2·f`, SiLU and product `2·f`, down `d`, weighted `d` → `k·(3·d +
///   4·f)`, the combined output `d`, and the shared expert `4·fs + d` (+1 for its gate).
pub fn block_activations(block: &BlockConfig, d: usize) -> BlockActivations {
    let mixer = match &block.mixer {
        MixerConfig::Mamba(c) => {
            let di = c.expand * c.d_model;
            8 * di + c.dt_rank + 2 * c.d_state + d
        }
        MixerConfig::Mamba2(c) => {
            let di = c.expand * c.d_model;
            let gn = c.n_groups * c.d_state;
            let h = c.num_heads;
            let states = (h * c.head_dim * c.d_state).div_ceil(c.chunk_size.max(1));
            (2 * di + 2 * gn + h) + 2 * (di + 2 * gn) + h + di + states + 2 * di + d
        }
        MixerConfig::Attention(c) => {
            let (h, kv, hd) = (c.num_heads, c.kv_heads, c.head_dim);
            (h * hd + 2 * kv * hd) + (h * hd + kv * hd) + h * hd + h + d
        }
        MixerConfig::Mla(c) => {
            let h = c.num_heads;
            let qk = c.qk_head_dim();
            let ql = c.q_latent_dim.unwrap_or(0);
            2 * ql
                + h * qk
                + (c.kv_latent_dim + c.d_rope)
                + c.kv_latent_dim
                + h * (c.qk_nope_head_dim + c.v_head_dim)
                + h * qk
                + h * qk
                + h * c.v_head_dim
                + h
                + d
        }
    };
    let ffn = match &block.ffn {
        FfnConfig::None => 0,
        FfnConfig::Mlp { intermediate_size } => 4 * intermediate_size + d,
        FfnConfig::Moe(c) => {
            let k = match c.strategy {
                RoutingKind::DenseGated | RoutingKind::Soft { .. } => c.num_experts,
                RoutingKind::MultiTask { num_tasks } => c.experts_per_tok * num_tasks.max(1),
                _ => c.experts_per_tok,
            };
            let shared = if c.shared_expert_enabled {
                4 * c.shared_expert_d_ff + d + usize::from(c.shared_expert_gate)
            } else {
                0
            };
            2 * c.num_experts + k * (3 * d + 4 * c.d_ff) + d + shared
        }
    };
    // Without a feed-forward: the block input, one norm and one residual sum.
    let residual = if block.ffn == FfnConfig::None { 3 * d } else { 5 * d };
    BlockActivations { mixer, ffn, residual }
}

/// Estimated activation bytes of one training step of `cfg` on `batch × seq_len` tokens, per
/// recompute level (the formulas are in the module docs and [`block_activations`]).
pub fn activation_estimate(cfg: &HybridConfig, batch: usize, seq_len: usize) -> Vec<(Recompute, usize)> {
    let d = cfg.hidden_size;
    let blocks: Vec<BlockActivations> = cfg.blocks.iter().map(|b| block_activations(b, d)).collect();
    // Embedding output, final norm, logits.
    let outer = d + d + cfg.vocab_size;
    let none = outer + blocks.iter().map(BlockActivations::total).sum::<usize>();
    let max_mixer = blocks.iter().map(|b| b.mixer).max().unwrap_or(0);
    let max_block = blocks.iter().map(BlockActivations::total).max().unwrap_or(0);
    // Mixer: each block keeps its input, the mixer output (d), the FFN internals, its norms and sums.
    let mixer = outer + blocks.iter().map(|b| b.residual + d + b.ffn).sum::<usize>() + max_mixer;
    let block = outer + blocks.len() * d + max_block;
    let tokens = batch * seq_len;
    [(Recompute::None, none), (Recompute::Mixer, mixer), (Recompute::Block, block)]
        .into_iter()
        .map(|(r, n)| (r, n * tokens * BYTES_PER_NUMBER))
        .collect()
}

/// The short description of a layer's mixer, e.g. `mamba (d_inner 256, d_state 16, d_conv 4, dt_rank 8)`.
pub fn describe_mixer(m: &MixerConfig) -> String {
    match m {
        MixerConfig::Mamba(c) => format!(
            "mamba (d_inner {}, d_state {}, d_conv {}, dt_rank {})",
            c.expand * c.d_model,
            c.d_state,
            c.d_conv,
            c.dt_rank
        ),
        MixerConfig::Mamba2(c) => format!(
            "mamba2 ({} heads × {}, d_state {}, groups {}, chunk {})",
            c.num_heads, c.head_dim, c.d_state, c.n_groups, c.chunk_size
        ),
        MixerConfig::Attention(c) => {
            let mut s =
                format!("attention ({} heads, {} kv, head_dim {}", c.num_heads, c.kv_heads, c.head_dim);
            if c.rope.is_none() {
                s.push_str(", no rope");
            }
            if c.qk_norm {
                s.push_str(", qk-norm");
            }
            if let Some(w) = c.window {
                let _ = write!(s, ", window {w}");
            }
            s.push(')');
            s
        }
        MixerConfig::Mla(c) => {
            let q = c.q_latent_dim.map(|q| format!("q latent {q}, ")).unwrap_or_default();
            format!(
                "mla ({} heads, {q}kv latent {}, nope {}, rope {}, v {})",
                c.num_heads, c.kv_latent_dim, c.qk_nope_head_dim, c.d_rope, c.v_head_dim
            )
        }
    }
}

/// The short description of a layer's feed-forward, e.g. `moe (8 × 256, top-2, topk, shared 512)`.
pub fn describe_ffn(f: &FfnConfig) -> String {
    match f {
        FfnConfig::None => "none".to_string(),
        FfnConfig::Mlp { intermediate_size } => format!("mlp (swiglu {intermediate_size})"),
        FfnConfig::Moe(c) => {
            let mut s = format!(
                "moe ({} × {}, top-{}, {}",
                c.num_experts,
                c.d_ff,
                c.experts_per_tok,
                c.strategy.name()
            );
            if c.shared_expert_enabled {
                let _ = write!(s, ", shared {}", c.shared_expert_d_ff);
                if c.shared_expert_gate {
                    s.push_str(" gated");
                }
            }
            if c.bias_balancing.is_some() {
                s.push_str(", bias balancing");
            }
            if let Some(cf) = c.capacity_factor {
                let _ = write!(s, ", capacity {cf}");
            }
            s.push(')');
            s
        }
    }
}

/// Inspects `model` built from `cfg` (estimates only; see [`measure_peaks`] for measurements).
pub fn inspect(cfg: &RunConfig, model: &HybridModel, context: usize) -> Result<Inspection, TrainError> {
    let hc = model.config();
    let layers = hc
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| (i, describe_mixer(&b.mixer), describe_ffn(&b.ffn)))
        .collect();
    let counts = model.param_counts();
    let t = &cfg.trainer;
    Ok(Inspection {
        layers,
        total_params: counts.total,
        active_params: counts.active,
        // Weights, gradients and AdamW's two moments.
        train_state_bytes: 4 * counts.total * BYTES_PER_NUMBER,
        activation_bytes: activation_estimate(hc, t.batch_size, t.seq_len),
        measured_peak_bytes: Vec::new(),
        cache_bytes: model.cache_bytes(context),
        context,
    })
}

/// A byte count for people: `812 B`, `12.3 KiB`, `4.56 MiB`, `1.20 GiB`.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let prec = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{v:.prec$} {}", UNITS[unit])
}

/// A parameter count for people: `5.62M (5,621,248)`.
pub fn human_count(n: usize) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let short = if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", n as f64 / 1e3)
    } else {
        return grouped;
    };
    format!("{short} ({grouped})")
}

/// The name of a recompute level as the config spells it.
pub fn recompute_name(r: Recompute) -> &'static str {
    match r {
        Recompute::None => "none",
        Recompute::Mixer => "mixer",
        Recompute::Block => "block",
    }
}

/// The layer map alone (index, mixer, ffn), as `moeba train` prints it before training.
pub fn render_layers(ins: &Inspection) -> String {
    let mut s = String::new();
    let w = ins.layers.iter().map(|(_, m, _)| m.chars().count()).max().unwrap_or(5).max(5);
    let _ = writeln!(s, "  {:>5}  {:<w$}  ffn", "layer", "mixer");
    for (i, m, f) in &ins.layers {
        let _ = writeln!(s, "  {i:>5}  {m:<w$}  {f}");
    }
    s
}

/// Renders an inspection as the text `moeba inspect` prints.
pub fn render(ins: &Inspection) -> String {
    let mut s = String::new();
    s.push_str("layers:\n");
    s.push_str(&render_layers(ins));
    let _ = writeln!(
        s,
        "parameters: {} total, {} active per token",
        human_count(ins.total_params),
        human_count(ins.active_params)
    );
    let _ = writeln!(
        s,
        "training memory (f32): weights + gradients + AdamW state {}",
        human_bytes(ins.train_state_bytes)
    );
    s.push_str("  activations of one step, per recompute level (estimate");
    if !ins.measured_peak_bytes.is_empty() {
        s.push_str("; measured: peak above the weights of one forward + backward, gradients included");
    }
    s.push_str("):\n");
    for (r, bytes) in &ins.activation_bytes {
        let _ = write!(s, "    {:<6} {:>10}", recompute_name(*r), human_bytes(*bytes));
        if let Some((_, m)) = ins.measured_peak_bytes.iter().find(|(l, _)| l == r) {
            let _ = write!(s, "   measured {:>10}", human_bytes(*m));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "decoding cache at {} tokens: {} per sequence",
        ins.context,
        human_bytes(ins.cache_bytes)
    );
    s
}

/// Measures the peak bytes above the baseline of one forward+backward per recompute level with
/// `current_bytes` (the binary's counting allocator: returns bytes currently allocated) and
/// `reset_peak`/`peak_bytes` hooks.
///
/// The contract of the hooks: `reset_peak()` starts a measurement at the bytes allocated now;
/// `peak_bytes()` returns the most bytes allocated at any moment since then, above that start.
/// Each level runs one training forward (random ids of the config's `batch_size × seq_len`, the
/// MoE in training mode), the LM loss plus the weighted aux loss, and the backward; the gradients
/// are dropped before the next level. A first untimed step at [`Recompute::None`] warms caches
/// (thread pools, lazily built tables) so they are not counted against the first level.
pub fn measure_peaks(
    cfg: &RunConfig,
    model: &HybridModel,
    reset_peak: &dyn Fn(),
    peak_bytes: &dyn Fn() -> usize,
) -> Result<Vec<(Recompute, usize)>, TrainError> {
    let t = &cfg.trainer;
    let hc = model.config();
    let (b, l) = (t.batch_size, t.seq_len);
    if b == 0 || l == 0 {
        return Err(TrainError::Invalid {
            key: "trainer.batch_size".into(),
            msg: format!("measuring needs batch_size and seq_len > 0, got {b} × {l}"),
        });
    }
    let mut rng = Rng::new(t.seed);
    let vocab = hc.vocab_size.max(1) as u64;
    let device = Device::Cpu;
    let ids: Vec<u32> = (0..b * l).map(|_| rng.below(vocab) as u32).collect();
    let targets: Vec<u32> = (0..b * l).map(|_| rng.below(vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, l), &device)?;
    let targets = Tensor::from_vec(targets, (b, l), &device)?;
    let step = |recompute: Recompute| -> Result<(), TrainError> {
        let opts = ForwardOptions { recompute, moe: MoeContext::training(0, t.seed).with_causal(true) };
        let out = model.forward(&ids, &opts)?;
        let mut loss: Var = HybridModel::lm_loss(&out.logits, &targets)?;
        if let Some(aux) = &out.aux_loss {
            loss = loss.add(aux)?;
        }
        drop(out);
        let grads = loss.backward()?;
        drop(grads);
        Ok(())
    };
    step(Recompute::None)?;
    let mut peaks = Vec::with_capacity(RECOMPUTE_LEVELS.len());
    for r in RECOMPUTE_LEVELS {
        reset_peak();
        step(r)?;
        peaks.push((r, peak_bytes()));
    }
    Ok(peaks)
}
