//! The `architectures` lab: a transformer, a Mamba-1, a Mamba-2, a transformer with MoE and a
//! Jamba-style hybrid (Mamba + attention + MoE) at a matched total parameter count, each trained
//! for the same wall-clock budget on tiny Shakespeare with moeba-train's trainer (same sequence
//! length, batch, learning-rate schedule and seed).
//!
//! Measured per model: validation loss against wall time and against training tokens (the two
//! plots), training throughput (median tokens/s of the steps that did not follow an evaluation),
//! training memory (the peak of one forward + backward measured by a counting allocator when one
//! is registered, plus weights, gradients and AdamW state; otherwise moeba-train's estimate,
//! labelled as such), and generation speed: greedy decoding tokens/s with the caches after
//! prefilling a short and a long context (`decode_short`, `decode_context`), from which the
//! long/short slowdown follows (attention's KV cache grows with the context; Mamba's state does
//! not).
//!
//! Matching the size: every model has the same width (`hidden_size`) and depth (`num_layers`);
//! the feed-forward width `f` (dense SwiGLU MLPs of width `f`; MoE layers of `num_experts`
//! experts of width `f / 2`, so top-2 routing is as wide as a dense layer per token) is solved
//! per model so the total parameter count meets `target_params` (the count is linear in `f`).
//! MoE models report their total and their active parameters per token.
//!
//! Settings (`--set key=value`): see [`KEYS`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use moeba_autograd::no_grad;
use moeba_nn::{HybridModel, ParamCounts, Recompute};
use moeba_tensor::{DType, Device, Tensor};
use moeba_train::config::{FfnKind, MixerKind, ModelConfig, RoutingConfig, RunConfig, TrainerConfig};
use moeba_train::data::Dataset;
use moeba_train::inspect::{activation_estimate, human_bytes, human_count};
use moeba_train::sampling::argmax;
use moeba_train::schedule::ScheduleKind;
use moeba_train::{build_model, load_run, train, StepLog, Tokenizer, TrainOptions};
use serde_json::{json, Value};

use crate::plot::{plot_lines, LineChart, Series};
use crate::report::{finish, md_table, Report};
use crate::{LabError, LabOptions, LabRun, Result};

/// The lab's name.
pub const LAB: &str = "architectures";

/// The settings `--set` accepts.
pub const KEYS: [&str; 19] = [
    "budget_s",
    "seq_len",
    "batch",
    "lr",
    "warmup_steps",
    "target_params",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_experts",
    "experts_per_tok",
    "eval_every",
    "eval_steps",
    "decode_context",
    "decode_short",
    "decode_tokens",
    "seed",
    "keep_runs",
    "models",
];

/// The five architectures of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama-style decoder: GQA attention with RoPE and dense SwiGLU MLPs in every layer.
    Transformer,
    /// Mamba-1 (selective scan) mixers with dense SwiGLU MLPs.
    Mamba,
    /// Mamba-2 (chunked SSD) mixers with dense SwiGLU MLPs.
    Mamba2,
    /// Attention in every layer, every feed-forward a top-k MoE (Mixtral-style).
    MoeTransformer,
    /// Jamba-style: Mamba-1 mixers with attention (no RoPE) in layer `i % 4 == 2`, MoE in odd
    /// layers, dense MLPs in even ones.
    Jamba,
}

impl Arch {
    /// All five, in the order they are reported.
    pub const ALL: [Arch; 5] =
        [Arch::Transformer, Arch::Mamba, Arch::Mamba2, Arch::MoeTransformer, Arch::Jamba];

    /// The short name used in results.json, the plots and `--set models=…`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Transformer => "transformer",
            Arch::Mamba => "mamba",
            Arch::Mamba2 => "mamba2",
            Arch::MoeTransformer => "moe-transformer",
            Arch::Jamba => "jamba",
        }
    }

    /// One line for the report.
    pub fn description(self) -> &'static str {
        match self {
            Arch::Transformer => "GQA attention with RoPE + dense SwiGLU MLP in every layer (Llama-style)",
            Arch::Mamba => "Mamba-1 selective scan + dense SwiGLU MLP in every layer",
            Arch::Mamba2 => "Mamba-2 chunked SSD + dense SwiGLU MLP in every layer",
            Arch::MoeTransformer => "GQA attention with RoPE + top-k MoE in every layer (Mixtral-style)",
            Arch::Jamba => {
                "Mamba-1 mixers, attention without RoPE in layer i % 4 == 2, MoE in odd layers, dense MLP in \
                 even ones (Jamba-style)"
            }
        }
    }

    fn has_moe(self) -> bool {
        matches!(self, Arch::MoeTransformer | Arch::Jamba)
    }

    fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// The lab's settings, after the `--quick` defaults and the `--set` overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Training wall-clock budget per model, seconds.
    pub budget_s: f64,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Peak learning rate (constant after warmup: the budget, not a step count, ends training).
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// The total parameter count every model is sized to.
    pub target_params: usize,
    /// Width of every model.
    pub hidden_size: usize,
    /// Depth of every model.
    pub num_layers: usize,
    /// Attention query heads (key/value heads: half of them).
    pub num_heads: usize,
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts per token.
    pub experts_per_tok: usize,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_steps: usize,
    /// The long context decoding is measured after.
    pub decode_context: usize,
    /// The short context decoding is measured after.
    pub decode_short: usize,
    /// Tokens decoded per measurement.
    pub decode_tokens: usize,
    /// Seed of initialisation and data order (the same for every model).
    pub seed: u64,
    /// Keep the training run directories (checkpoints, metrics) under `runs/`.
    pub keep_runs: bool,
    /// The models to run.
    pub models: Vec<Arch>,
}

fn invalid(msg: impl Into<String>) -> LabError {
    LabError::Invalid(format!("lab `{LAB}`: {}", msg.into()))
}

impl Settings {
    /// The settings of `opts`: `--quick` or full defaults, then `--set` overrides, checked.
    pub fn from_options(opts: &LabOptions) -> Result<Settings> {
        opts.check_keys(LAB, &KEYS)?;
        let q = opts.quick;
        let models_text: String = opts.get("models", "all".to_string())?;
        let models = if models_text == "all" {
            Arch::ALL.to_vec()
        } else {
            let mut v = Vec::new();
            for name in models_text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let a = Arch::from_name(name).ok_or_else(|| {
                    invalid(format!(
                        "--set models: unknown model `{name}`; the models are: all, {}",
                        Arch::ALL.map(Arch::name).join(", ")
                    ))
                })?;
                if !v.contains(&a) {
                    v.push(a);
                }
            }
            v
        };
        let s = Settings {
            budget_s: opts.get("budget_s", if q { 2.0 } else { 150.0 })?,
            seq_len: opts.get("seq_len", if q { 64 } else { 128 })?,
            batch: opts.get("batch", if q { 4 } else { 16 })?,
            lr: opts.get("lr", 3e-3)?,
            warmup_steps: opts.get("warmup_steps", if q { 5 } else { 30 })?,
            target_params: opts.get("target_params", if q { 60_000 } else { 800_000 })?,
            hidden_size: opts.get("hidden_size", if q { 32 } else { 128 })?,
            num_layers: opts.get("num_layers", 4)?,
            num_heads: opts.get("num_heads", 4)?,
            num_experts: opts.get("num_experts", 8)?,
            experts_per_tok: opts.get("experts_per_tok", 2)?,
            eval_every: opts.get("eval_every", if q { 8 } else { 25 })?,
            eval_steps: opts.get("eval_steps", if q { 2 } else { 4 })?,
            decode_context: opts.get("decode_context", if q { 256 } else { 2048 })?,
            decode_short: opts.get("decode_short", if q { 16 } else { 64 })?,
            decode_tokens: opts.get("decode_tokens", if q { 8 } else { 64 })?,
            seed: opts.get("seed", 1337)?,
            keep_runs: opts.get("keep_runs", false)?,
            models,
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<()> {
        if !(self.budget_s > 0.0 && self.budget_s.is_finite()) {
            return Err(invalid(format!("--set budget_s: must be > 0 seconds, got {}", self.budget_s)));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(invalid(format!("--set lr: must be > 0, got {}", self.lr)));
        }
        for (key, v) in [
            ("seq_len", self.seq_len),
            ("batch", self.batch),
            ("target_params", self.target_params),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_experts", self.num_experts),
            ("experts_per_tok", self.experts_per_tok),
            ("eval_every", self.eval_every),
            ("eval_steps", self.eval_steps),
            ("decode_context", self.decode_context),
            ("decode_short", self.decode_short),
            ("decode_tokens", self.decode_tokens),
        ] {
            if v == 0 {
                return Err(invalid(format!("--set {key}: must be > 0")));
            }
        }
        if self.models.is_empty() {
            return Err(invalid("--set models: names no model"));
        }
        if self.experts_per_tok > self.num_experts {
            return Err(invalid(format!(
                "--set experts_per_tok: {} is more than num_experts = {}",
                self.experts_per_tok, self.num_experts
            )));
        }
        if self.decode_short >= self.decode_context {
            return Err(invalid(format!(
                "--set decode_short: {} must be shorter than decode_context = {}",
                self.decode_short, self.decode_context
            )));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads)
            || !(self.hidden_size / self.num_heads).is_multiple_of(2)
        {
            return Err(invalid(format!(
                "--set hidden_size: {} must be a multiple of 2 × num_heads = {} (even attention heads for RoPE)",
                self.hidden_size,
                2 * self.num_heads
            )));
        }
        if self.models.contains(&Arch::Mamba2)
            && !(2 * self.hidden_size).is_multiple_of(self.mamba2_head_dim())
        {
            return Err(invalid(format!(
                "--set hidden_size: 2 × {} must be a multiple of the Mamba-2 head width {}",
                self.hidden_size,
                self.mamba2_head_dim()
            )));
        }
        if self.models.contains(&Arch::Jamba) && self.num_layers < 3 {
            return Err(invalid(format!(
                "--set num_layers: the Jamba-style model puts attention in layer 2, so it needs at least 3 \
                 layers, got {}",
                self.num_layers
            )));
        }
        Ok(())
    }

    fn mamba2_head_dim(&self) -> usize {
        if self.hidden_size >= 64 {
            32
        } else {
            16
        }
    }

    fn kv_heads(&self) -> usize {
        if self.num_heads.is_multiple_of(2) {
            self.num_heads / 2
        } else {
            self.num_heads
        }
    }

    /// The `[model]` table of `arch` with feed-forward width `f` (experts: `f / 2`).
    pub fn model_config(&self, arch: Arch, f: usize) -> ModelConfig {
        let d = self.hidden_size;
        let base = ModelConfig {
            vocab_size: 256,
            hidden_size: d,
            num_layers: self.num_layers,
            max_seq_len: self.seq_len.max(self.decode_context + self.decode_tokens),
            tie_embeddings: true,
            num_heads: self.num_heads,
            kv_heads: self.kv_heads(),
            d_state: 16,
            d_conv: 4,
            expand: 2,
            mamba2_head_dim: self.mamba2_head_dim(),
            mamba2_d_state: if d >= 64 { 32 } else { 16 },
            chunk_size: if self.seq_len >= 128 { 32 } else { 16 },
            intermediate_size: f.max(1),
            num_experts: 0,
            experts_per_tok: self.experts_per_tok,
            moe_intermediate_size: Some((f / 2).max(1)),
            routing: RoutingConfig::default(),
            ..ModelConfig::default()
        };
        match arch {
            Arch::Transformer => ModelConfig { mixer: MixerKind::Attention, ..base },
            Arch::Mamba => ModelConfig { mixer: MixerKind::Mamba, ..base },
            Arch::Mamba2 => ModelConfig { mixer: MixerKind::Mamba2, ..base },
            Arch::MoeTransformer => {
                ModelConfig { mixer: MixerKind::Attention, num_experts: self.num_experts, ..base }
            }
            Arch::Jamba => ModelConfig {
                attn_layer_period: Some(4),
                attn_layer_offset: 2,
                mamba_kind: MixerKind::Mamba,
                attention_kind: MixerKind::Attention,
                rope: false,
                num_experts: self.num_experts,
                moe_every: Some(2),
                moe_offset: 1,
                ..base
            },
        }
    }

    /// The `[trainer]` table shared by every model, writing into `out`.
    pub fn trainer_config(&self, out: &Path) -> TrainerConfig {
        TrainerConfig {
            learning_rate: self.lr,
            min_lr: self.lr,
            warmup_steps: self.warmup_steps,
            schedule: ScheduleKind::Constant,
            batch_size: self.batch,
            seq_len: self.seq_len,
            // The wall-clock budget ends training, not the step count.
            max_steps: 10_000_000,
            max_seconds: Some(self.budget_s),
            eval_every: self.eval_every,
            eval_steps: self.eval_steps,
            save_every: 0,
            keep_last: 1,
            log_every: 1,
            load_balance_alpha: 0.01,
            router_z_loss_alpha: 0.001,
            seed: self.seed,
            dataset: "tinyshakespeare".into(),
            output_dir: out.display().to_string(),
            ..TrainerConfig::default()
        }
    }

    fn config_json(&self) -> Value {
        json!({
            "budget_s": self.budget_s,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "lr": self.lr,
            "schedule": "linear warmup then constant",
            "warmup_steps": self.warmup_steps,
            "target_params": self.target_params,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "kv_heads": self.kv_heads(),
            "num_experts": self.num_experts,
            "experts_per_tok": self.experts_per_tok,
            "eval_every": self.eval_every,
            "eval_steps": self.eval_steps,
            "decode_context": self.decode_context,
            "decode_short": self.decode_short,
            "decode_tokens": self.decode_tokens,
            "seed": self.seed,
            "keep_runs": self.keep_runs,
            "models": self.models.iter().map(|a| a.name()).collect::<Vec<_>>(),
            "dataset": "tinyshakespeare (byte tokenizer, last 10% held out)",
        })
    }
}

/// A model sized to the target.
#[derive(Debug, Clone)]
pub struct SizedModel {
    /// The architecture.
    pub arch: Arch,
    /// Its `[model]` table.
    pub config: ModelConfig,
    /// The feed-forward width `f` that was solved for.
    pub ffn_width: usize,
    /// Its parameter counts.
    pub counts: ParamCounts,
}

fn counts_of(s: &Settings, arch: Arch, f: usize) -> Result<ParamCounts> {
    let mc = s.model_config(arch, f);
    let run = RunConfig { model: mc, trainer: s.trainer_config(Path::new("unused")) };
    run.validate()?;
    let hc = run.model.to_hybrid(&run.trainer)?;
    let (_store, model) = build_model(&hc, s.seed, &Device::Cpu)?;
    Ok(model.param_counts())
}

/// Solves the feed-forward width of `arch` so its total parameter count is nearest
/// `s.target_params` (the count is linear in `f` for even `f`). A target below what the model
/// has without its feed-forwards is an error naming `target_params`.
pub fn size_model(s: &Settings, arch: Arch) -> Result<SizedModel> {
    let (f1, f2) = (2usize, 4usize);
    let c1 = counts_of(s, arch, f1)?.total as f64;
    let c2 = counts_of(s, arch, f2)?.total as f64;
    let slope = (c2 - c1) / (f2 - f1) as f64;
    let target = s.target_params as f64;
    if target < c1 || slope <= 0.0 {
        return Err(invalid(format!(
            "--set target_params: {} is too small for the {} model at hidden_size {} and {} layers: it has \
             {} parameters with the narrowest feed-forward; raise target_params or lower hidden_size / \
             num_layers",
            s.target_params,
            arch.name(),
            s.hidden_size,
            s.num_layers,
            c1 as usize
        )));
    }
    let exact = f1 as f64 + (target - c1) / slope;
    let f = (((exact / 2.0).round() as usize) * 2).max(2);
    let counts = counts_of(s, arch, f)?;
    Ok(SizedModel { arch, config: s.model_config(arch, f), ffn_width: f, counts })
}

/// One point of a validation curve.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CurvePoint {
    step: usize,
    tokens: u64,
    elapsed_s: f64,
    val_loss: f64,
    val_bpb: f64,
}

/// Decoding speed after a prefill.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DecodeFigures {
    context: usize,
    prefill_s: f64,
    /// 1 / median seconds per decoded token.
    tok_s: f64,
    /// Mean tokens/s over the whole decode.
    mean_tok_s: f64,
    cache_bytes: usize,
}

/// Memory of training one model.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MemoryFigures {
    /// Weights + gradients + AdamW moments (f32).
    state_bytes: usize,
    /// moeba-train's activation estimate of one step (no recomputation).
    activation_estimate: usize,
    /// Measured peak of one forward + backward above the weights (gradients included).
    measured_step_peak: Option<usize>,
    /// Measured peak heap growth of the whole training call (model, optimizer, data, evaluation,
    /// checkpoint buffers).
    run_peak: Option<usize>,
}

impl MemoryFigures {
    /// The figure reported: weights + AdamW moments + the measured step peak (which includes the
    /// gradients), or the estimate (weights + gradients + moments + activations).
    fn reported(&self) -> usize {
        match self.measured_step_peak {
            // The measured peak already holds the gradients: add weights and the two moments.
            Some(p) => self.state_bytes / 4 * 3 + p,
            None => self.state_bytes + self.activation_estimate,
        }
    }
}

/// Everything measured for one model.
#[derive(Debug, Clone)]
struct ArchResult {
    sized: SizedModel,
    steps: usize,
    tokens: u64,
    train_seconds: f64,
    final_val_loss: f64,
    final_val_bpb: f64,
    best_val_loss: f64,
    tok_s_median: f64,
    tok_s_mean: f64,
    curve: Vec<CurvePoint>,
    memory: MemoryFigures,
    short: DecodeFigures,
    long: DecodeFigures,
    warnings: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Greedy decoding speed of `model`: prefill `prompt`, then `new_tokens` one-token steps.
fn decode_speed(model: &HybridModel, prompt: &[u32], new_tokens: usize) -> Result<DecodeFigures> {
    let _guard = no_grad();
    let device = Device::Cpu;
    let mut cache = model.new_cache(1, prompt.len() + new_tokens)?;
    let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &device)?;
    let t0 = Instant::now();
    let mut logits = model.prefill(&ids, &mut cache)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut per_token = Vec::with_capacity(new_tokens);
    let start = Instant::now();
    for _ in 0..new_tokens {
        let t = Instant::now();
        let row = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec::<f32>()?;
        let next = argmax(&row);
        logits = model.forward_step(&Tensor::from_vec(vec![next], 1, &device)?, &mut cache)?;
        per_token.push(t.elapsed().as_secs_f64());
    }
    let total = start.elapsed().as_secs_f64();
    let med = median(per_token);
    Ok(DecodeFigures {
        context: prompt.len(),
        prefill_s,
        tok_s: if med > 0.0 { 1.0 / med } else { f64::NAN },
        mean_tok_s: if total > 0.0 { new_tokens as f64 / total } else { f64::NAN },
        cache_bytes: model.cache_bytes(prompt.len() + new_tokens),
    })
}

/// The `(reset_peak, peak_bytes)` hooks of a counting allocator.
type PeakHooks = (fn(), fn() -> usize);

/// The peak-memory hooks of moeba-lab's counting allocator, when the binary registered it.
fn peak_hooks() -> Option<PeakHooks> {
    crate::alloc::enable()
        .then_some((crate::alloc::reset_peak as fn(), crate::alloc::peak_bytes as fn() -> usize))
}

/// Measures the memory of training `run`'s model.
fn memory_of(run: &RunConfig, model: &HybridModel) -> Result<MemoryFigures> {
    let counts = model.param_counts();
    let hc = model.config();
    let activation_estimate = activation_estimate(hc, run.trainer.batch_size, run.trainer.seq_len)
        .into_iter()
        .find(|(r, _)| *r == Recompute::None)
        .map_or(0, |(_, b)| b);
    let measured_step_peak = match peak_hooks() {
        Some((reset, peak)) => {
            let peaks = moeba_train::inspect::measure_peaks(run, model, &reset, &peak)?;
            peaks.into_iter().find(|(r, _)| *r == Recompute::None).map(|(_, b)| b)
        }
        None => None,
    };
    Ok(MemoryFigures {
        state_bytes: 4 * counts.total * 4,
        activation_estimate,
        measured_step_peak,
        run_peak: None,
    })
}

/// A prompt of `len` tokens from the validation text (repeated if it is shorter).
fn prompt_of(val: &[u32], len: usize) -> Vec<u32> {
    if val.is_empty() {
        return vec![b'\n' as u32; len];
    }
    val.iter().copied().cycle().take(len).collect()
}

fn train_arch(
    s: &Settings,
    sized: &SizedModel,
    dir: &Path,
    val: &[u32],
    progress: bool,
) -> Result<ArchResult> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| LabError::Io { path: dir.to_path_buf(), source })?;
    }
    let run = RunConfig { model: sized.config.clone(), trainer: s.trainer_config(dir) };
    run.validate()?;
    let mut curve = Vec::new();
    let mut step_tok_s = Vec::new();
    let mut prev_eval = true; // the first step pays for warming up
    let train_opts = TrainOptions { out: dir.to_path_buf(), resume: false, progress };
    let (summary, run_peak) = crate::alloc::measure_peak(|| {
        train(&run, &train_opts, |log: &StepLog| {
            if !prev_eval {
                step_tok_s.push(log.tokens_per_s);
            }
            prev_eval = log.val_loss.is_some();
            if let Some(v) = log.val_loss {
                curve.push(CurvePoint {
                    step: log.step,
                    tokens: log.tokens,
                    elapsed_s: log.elapsed_s,
                    val_loss: v,
                    val_bpb: log.val_bpb.unwrap_or(f64::NAN),
                });
            }
        })
    });
    let summary = summary?;
    let loaded = load_run(dir, false)?;
    let mut memory = memory_of(&run, &loaded.model)?;
    memory.run_peak = run_peak.map(|b| b as usize);
    let short = decode_speed(&loaded.model, &prompt_of(val, s.decode_short), s.decode_tokens)?;
    let long = decode_speed(&loaded.model, &prompt_of(val, s.decode_context), s.decode_tokens)?;
    let last = curve.last().copied();
    let tok_s_median = median(step_tok_s);
    Ok(ArchResult {
        sized: sized.clone(),
        steps: summary.steps,
        tokens: (summary.steps * s.batch * s.seq_len) as u64,
        train_seconds: summary.seconds,
        final_val_loss: summary.final_eval.map_or(f64::NAN, |e| e.loss),
        final_val_bpb: summary.final_eval.map_or(f64::NAN, |e| e.bpb),
        best_val_loss: summary.best_val_loss.unwrap_or(f64::NAN),
        // With a single step (a tiny budget) there is no step that did not follow an evaluation.
        tok_s_median: if tok_s_median.is_finite() { tok_s_median } else { summary.tokens_per_s },
        tok_s_mean: summary.tokens_per_s,
        curve: if curve.is_empty() { last.into_iter().collect() } else { curve },
        memory,
        short,
        long,
        warnings: summary.warnings,
    })
}

fn layer_map(mc: &ModelConfig) -> String {
    match mc.layers() {
        Ok(plan) => plan
            .iter()
            .map(|l| {
                let m = match l.mixer {
                    MixerKind::Attention => "A",
                    MixerKind::Mamba => "M",
                    MixerKind::Mamba2 => "M2",
                    MixerKind::Mla => "MLA",
                };
                let f = match l.ffn {
                    FfnKind::Mlp => "",
                    FfnKind::Moe => "+E",
                };
                format!("{m}{f}")
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => e.to_string(),
    }
}

fn result_json(r: &ArchResult, target: usize) -> Value {
    let c = r.sized.counts;
    let mc = &r.sized.config;
    json!({
        "name": r.sized.arch.name(),
        "description": r.sized.arch.description(),
        "layers": layer_map(mc),
        "hidden_size": mc.hidden_size,
        "num_layers": mc.num_layers,
        "ffn_width": r.sized.ffn_width,
        "expert_width": if r.sized.arch.has_moe() { json!(mc.moe_intermediate_size) } else { Value::Null },
        "num_experts": if r.sized.arch.has_moe() { mc.num_experts } else { 0 },
        "experts_per_tok": if r.sized.arch.has_moe() { mc.experts_per_tok } else { 0 },
        "params_total": c.total,
        "params_active": c.active,
        "params_embedding": c.embedding,
        "params_rel_error": c.total as f64 / target as f64 - 1.0,
        "steps": r.steps,
        "tokens": r.tokens,
        "train_seconds": r.train_seconds,
        "final_val_loss": r.final_val_loss,
        "final_val_bpb": r.final_val_bpb,
        "best_val_loss": r.best_val_loss,
        "train_tokens_per_s": r.tok_s_median,
        "train_tokens_per_s_mean": r.tok_s_mean,
        "memory": {
            "train_bytes": r.memory.reported(),
            "measured": r.memory.measured_step_peak.is_some(),
            "weights_grads_adam_bytes": r.memory.state_bytes,
            "activation_estimate_bytes": r.memory.activation_estimate,
            "measured_step_peak_bytes": r.memory.measured_step_peak,
            "measured_train_run_peak_bytes": r.memory.run_peak,
        },
        "decode": {
            "short_context": r.short.context,
            "short_tokens_per_s": r.short.tok_s,
            "short_mean_tokens_per_s": r.short.mean_tok_s,
            "short_prefill_s": r.short.prefill_s,
            "short_cache_bytes": r.short.cache_bytes,
            "long_context": r.long.context,
            "long_tokens_per_s": r.long.tok_s,
            "long_mean_tokens_per_s": r.long.mean_tok_s,
            "long_prefill_s": r.long.prefill_s,
            "long_cache_bytes": r.long.cache_bytes,
            "long_over_short_speed": r.long.tok_s / r.short.tok_s,
        },
        "curve": r.curve.iter().map(|p| json!({
            "step": p.step,
            "tokens": p.tokens,
            "elapsed_s": p.elapsed_s,
            "val_loss": p.val_loss,
            "val_bpb": p.val_bpb,
        })).collect::<Vec<_>>(),
        "warnings": r.warnings,
    })
}

fn fmt_f(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".into()
    }
}

fn table(results: &[ArchResult]) -> String {
    let headers = [
        "model",
        "layers",
        "params total",
        "active / token",
        "steps",
        "tokens",
        "val loss",
        "val bpb",
        "train tok/s",
        "train memory",
        "cache @ long",
        "decode tok/s @ short",
        "decode tok/s @ long",
        "long / short",
    ];
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let c = r.sized.counts;
            let mem = format!(
                "{} ({})",
                human_bytes(r.memory.reported()),
                if r.memory.measured_step_peak.is_some() { "measured" } else { "estimate" }
            );
            vec![
                format!("`{}`", r.sized.arch.name()),
                layer_map(&r.sized.config),
                human_count(c.total),
                human_count(c.active),
                r.steps.to_string(),
                human_count(r.tokens as usize),
                fmt_f(r.final_val_loss, 3),
                fmt_f(r.final_val_bpb, 3),
                fmt_f(r.tok_s_median, 0),
                mem,
                human_bytes(r.long.cache_bytes),
                fmt_f(r.short.tok_s, 1),
                fmt_f(r.long.tok_s, 1),
                fmt_f(r.long.tok_s / r.short.tok_s, 2),
            ]
        })
        .collect();
    md_table(&headers, &rows)
}

/// The validation loss of `curve` at `tokens`, linearly interpolated between the evaluations
/// around it (`None` when the curve does not reach `tokens`).
fn loss_at_tokens(curve: &[CurvePoint], tokens: u64) -> Option<f64> {
    let i = curve.iter().position(|p| p.tokens >= tokens)?;
    let b = curve[i];
    if b.tokens == tokens || i == 0 {
        return (b.tokens == tokens).then_some(b.val_loss);
    }
    let a = curve[i - 1];
    let t = (tokens - a.tokens) as f64 / (b.tokens - a.tokens) as f64;
    Some(a.val_loss + t * (b.val_loss - a.val_loss))
}

fn best_by(results: &[ArchResult], key: impl Fn(&ArchResult) -> f64) -> Option<&ArchResult> {
    results.iter().filter(|r| key(r).is_finite()).min_by(|a, b| key(a).total_cmp(&key(b)))
}

fn answer(s: &Settings, results: &[ArchResult]) -> String {
    let mut out = Vec::new();
    let mut by_loss: Vec<&ArchResult> = results.iter().filter(|r| r.final_val_loss.is_finite()).collect();
    by_loss.sort_by(|a, b| a.final_val_loss.total_cmp(&b.final_val_loss));
    if let (Some(first), Some(last)) = (by_loss.first(), by_loss.last()) {
        out.push(format!(
            "- **Loss at equal wall time ({} s each).** Ranking by final validation loss: {}. `{}` ends lowest at \
             {:.3} nats/token ({:.3} bits/byte), {:.3} below `{}`.",
            s.budget_s,
            by_loss
                .iter()
                .map(|r| format!("`{}` {:.3}", r.sized.arch.name(), r.final_val_loss))
                .collect::<Vec<_>>()
                .join(" < "),
            first.sized.arch.name(),
            first.final_val_loss,
            first.final_val_bpb,
            last.final_val_loss - first.final_val_loss,
            last.sized.arch.name(),
        ));
    }
    if let (Some(fast), Some(slow)) =
        (best_by(results, |r| -r.tok_s_median), best_by(results, |r| r.tok_s_median))
    {
        out.push(format!(
            "- **Throughput.** `{}` trains fastest at {:.0} tokens/s and so sees {} tokens in the budget; `{}` is \
             slowest at {:.0} tokens/s ({} tokens). Per token seen (the second plot), the curves separate \
             the architectures' sample efficiency from their speed on this CPU.",
            fast.sized.arch.name(),
            fast.tok_s_median,
            human_count(fast.tokens as usize),
            slow.sized.arch.name(),
            slow.tok_s_median,
            human_count(slow.tokens as usize),
        ));
    }
    // Loss at the smallest common token count, from the curves (sample efficiency).
    let common_tokens = results.iter().filter_map(|r| r.curve.last().map(|p| p.tokens)).min();
    if let Some(tk) = common_tokens.filter(|&t| t > 0) {
        let at: Vec<(&str, f64)> = results
            .iter()
            .filter_map(|r| loss_at_tokens(&r.curve, tk).map(|l| (r.sized.arch.name(), l)))
            .collect();
        if let Some((name, loss)) = at.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)) {
            out.push(format!(
                "- **Loss at equal tokens.** At {} training tokens (the fewest any model saw in the budget; \
                 validation loss interpolated linearly between evaluations), `{name}` is lowest at {loss:.3}; \
                 the others: {}.",
                human_count(tk as usize),
                at.iter()
                    .filter(|(n, _)| *n != name)
                    .map(|(n, l)| format!("`{n}` {l:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let moe: Vec<&ArchResult> = results.iter().filter(|r| r.sized.arch.has_moe()).collect();
    if !moe.is_empty() {
        out.push(format!(
            "- **Active parameters.** At the same total, the MoE models use fewer parameters per token: {}.",
            moe.iter()
                .map(|r| format!(
                    "`{}` {} of {} ({:.0}%)",
                    r.sized.arch.name(),
                    human_count(r.sized.counts.active),
                    human_count(r.sized.counts.total),
                    100.0 * r.sized.counts.active as f64 / r.sized.counts.total as f64
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let decode: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "`{}` {:.2}× ({} → {} tok/s, cache {} → {})",
                r.sized.arch.name(),
                r.long.tok_s / r.short.tok_s,
                fmt_f(r.short.tok_s, 0),
                fmt_f(r.long.tok_s, 0),
                human_bytes(r.short.cache_bytes),
                human_bytes(r.long.cache_bytes)
            )
        })
        .collect();
    out.push(format!(
        "- **Generation at a long context.** Decoding speed after {} tokens relative to after {} tokens: {}. \
         The attention models' caches grow with the context and each new token reads all of it; the Mamba \
         models' state is the same size at any context.",
        s.decode_context,
        s.decode_short,
        decode.join("; ")
    ));
    let attn_slow = results
        .iter()
        .filter(|r| matches!(r.sized.arch, Arch::Transformer | Arch::MoeTransformer))
        .map(|r| r.long.tok_s / r.short.tok_s)
        .fold(f64::NAN, f64::max);
    let ssm_slow = results
        .iter()
        .filter(|r| matches!(r.sized.arch, Arch::Mamba | Arch::Mamba2))
        .map(|r| r.long.tok_s / r.short.tok_s)
        .fold(f64::NAN, f64::min);
    if attn_slow.is_finite() && ssm_slow.is_finite() {
        out.push(format!(
            "  Measured: the pure-attention models keep at most {:.0}% of their short-context decoding speed at \
             {} tokens, the pure Mamba models at least {:.0}%{}.",
            100.0 * attn_slow,
            s.decode_context,
            100.0 * ssm_slow,
            if ssm_slow > attn_slow {
                ""
            } else {
                " (at these sizes the difference is within the noise of this machine)"
            }
        ));
    }
    if let (Some(small), Some(big)) = (
        best_by(results, |r| r.memory.reported() as f64),
        best_by(results, |r| -(r.memory.reported() as f64)),
    ) {
        let measured = results.iter().all(|r| r.memory.measured_step_peak.is_some());
        out.push(format!(
            "- **Training memory** ({}): `{}` needs the least ({}), `{}` the most ({}).",
            if measured {
                "measured peak of one forward + backward, plus weights and AdamW moments"
            } else {
                "ESTIMATE from moeba-train's activation model (no allocator counter was registered), plus \
                 weights, gradients and AdamW moments"
            },
            small.sized.arch.name(),
            human_bytes(small.memory.reported()),
            big.sized.arch.name(),
            human_bytes(big.memory.reported()),
        ));
    }
    if s.budget_s < 60.0 {
        out.push(format!(
            "\nWith a budget of {} s per model these models have barely started learning; differences in loss \
             at this size say little. Run the full lab (`moeba lab architectures`) for the real comparison.",
            s.budget_s
        ));
    }
    out.join("\n")
}

fn setup(s: &Settings, results: &[ArchResult]) -> String {
    let machine = crate::machine::MachineInfo::collect();
    let mut lines = vec![
        format!(
            "Five byte-level language models at width {} and depth {}, each sized to {} total parameters by \
             solving its feed-forward width `f` (dense SwiGLU of width `f`; MoE layers of {} experts of width \
             `f/2`, top-{} routing, Switch load-balancing loss 0.01 and router z-loss 0.001). Attention: {} \
             query heads, {} key/value heads.",
            s.hidden_size,
            s.num_layers,
            human_count(s.target_params),
            s.num_experts,
            s.experts_per_tok,
            s.num_heads,
            s.kv_heads()
        ),
        String::new(),
        "Layer maps: A attention, M Mamba-1, M2 Mamba-2, +E an MoE feed-forward (else a dense MLP).".into(),
        String::new(),
    ];
    for r in results {
        lines.push(format!(
            "- `{}`: {}; layers `{}`; f = {}; {} parameters ({:+.2}% \
             from the target), {} active per token.",
            r.sized.arch.name(),
            r.sized.arch.description(),
            layer_map(&r.sized.config),
            r.sized.ffn_width,
            r.sized.counts.total,
            100.0 * (r.sized.counts.total as f64 / s.target_params as f64 - 1.0),
            r.sized.counts.active
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "Training: moeba-train's trainer on tiny Shakespeare (byte tokenizer, last 10% held out), {} s of wall \
         time per model (`max_seconds`; evaluation time included), sequences of {} tokens, batch {}, AdamW \
         (β = 0.9, 0.95, weight decay 0.1, clip 1.0), learning rate {} after {} warmup steps and then \
         constant (a budget in seconds gives no step count for a decay to end at), seed {} for every model. \
         Validation loss on {} batches every {} steps. Training tokens/s is the median over the steps that did \
         not follow an evaluation. Decoding: greedy, one sequence, {} tokens after prefilling {} and {} \
         tokens of validation text; tokens/s is 1 / the median time per token.",
        s.budget_s,
        s.seq_len,
        s.batch,
        s.lr,
        s.warmup_steps,
        s.seed,
        s.eval_steps,
        s.eval_every,
        s.decode_tokens,
        s.decode_short,
        s.decode_context
    ));
    lines.push(String::new());
    lines.push(format!(
        "Machine: {}. The models ran one after another; other processes on the machine (e.g. compilers) \
         can slow some of them and move the wall-time curves.",
        machine.summary()
    ));
    lines.join("\n")
}

/// Runs the lab.
pub fn run(opts: &LabOptions) -> Result<LabRun> {
    let s = Settings::from_options(opts)?;
    std::fs::create_dir_all(&opts.out).map_err(|source| LabError::Io { path: opts.out.clone(), source })?;
    // Size every model before training any, so a bad target fails fast.
    let sized = s.models.iter().map(|&a| size_model(&s, a)).collect::<Result<Vec<_>>>()?;
    let tokenizer = Tokenizer::from_spec("byte").map_err(moeba_train::TrainError::from)?;
    let data =
        Dataset::load("tinyshakespeare", &tokenizer, 0.1, s.seed).map_err(moeba_train::TrainError::from)?;
    let runs_dir = opts.out.join("runs");
    let mut results = Vec::with_capacity(sized.len());
    for (i, m) in sized.iter().enumerate() {
        if opts.progress {
            eprintln!(
                "architectures: [{}/{}] training `{}` ({} parameters, {} active) for {} s",
                i + 1,
                sized.len(),
                m.arch.name(),
                m.counts.total,
                m.counts.active,
                s.budget_s
            );
        }
        let dir = runs_dir.join(m.arch.name());
        results.push(train_arch(&s, m, &dir, &data.val, opts.progress)?);
    }
    if !s.keep_runs && runs_dir.exists() {
        std::fs::remove_dir_all(&runs_dir)
            .map_err(|source| LabError::Io { path: runs_dir.clone(), source })?;
    }

    let series = |x: fn(&CurvePoint) -> f64| -> Vec<Series> {
        results
            .iter()
            .map(|r| Series {
                name: r.sized.arch.name().to_string(),
                points: r.curve.iter().map(|p| (x(p), p.val_loss)).collect(),
            })
            .collect()
    };
    let mut plots: Vec<PathBuf> = Vec::new();
    plots.extend(plot_lines(
        &LineChart {
            title: format!("validation loss against wall time ({} s per model)", s.budget_s),
            x_label: "training wall time (s)".into(),
            y_label: "validation loss (nats/token)".into(),
            log_x: false,
            log_y: false,
            series: series(|p| p.elapsed_s),
        },
        &opts.out,
        "loss_vs_time",
    )?);
    plots.extend(plot_lines(
        &LineChart {
            title: "validation loss against training tokens".into(),
            x_label: "training tokens".into(),
            y_label: "validation loss (nats/token)".into(),
            log_x: false,
            log_y: false,
            series: series(|p| p.tokens as f64),
        },
        &opts.out,
        "loss_vs_tokens",
    )?);

    let report = Report {
        title: "Architectures at matched size and time: transformer, Mamba, Mamba-2, MoE, Jamba-style hybrid".into(),
        question: "Given the same number of parameters and the same wall-clock training budget on a CPU, how do a \
                   transformer, a Mamba-1, a Mamba-2, a transformer with MoE and a Jamba-style hybrid (Mamba + \
                   attention + MoE) compare in validation loss (against time and against tokens), training \
                   throughput, training memory, and generation speed at a long context?"
            .into(),
        setup: setup(&s, &results),
        tables: vec![format!(
            "One row per model (validation loss in nats/token at the end of the budget; decoding after {} and {} \
             tokens of context).\n\n{}",
            s.decode_short,
            s.decode_context,
            table(&results)
        )],
        figures: vec![
            ("Validation loss against training wall time".into(), "loss_vs_time.png".into()),
            ("Validation loss against training tokens".into(), "loss_vs_tokens.png".into()),
        ],
        answer: answer(&s, &results),
    };
    let results_json = json!({
        "target_params": s.target_params,
        "models": results.iter().map(|r| result_json(r, s.target_params)).collect::<Vec<_>>(),
    });
    finish(opts, LAB, s.config_json(), results_json, report, plots)
}
