//! The training loop of the hybrid model: AdamW with warmup + cosine/linear/constant schedules,
//! global-norm clipping, gradient accumulation, activation recomputation, the MoE aux losses and
//! bias balancing, evaluation (loss, perplexity, bits per byte), collapse warnings, atomic
//! checkpoints (last N + best) with bit-exact resume, `metrics.jsonl`, TensorBoard events, plots
//! and a progress bar. A non-finite loss stops the run with an error naming the step; the last
//! good checkpoint stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use moeba_autograd::{no_grad, Grads, Var};
use moeba_kernels::ops;
use moeba_nn::moe::{CollapseDetector, MoeContext, RoutingStats};
use moeba_nn::{ForwardOptions, HybridModel, Param, ParamCounts, ParamStore};
use moeba_tensor::{DType, Device, Rng, Tensor};

use crate::build::build_model;
use crate::checkpoint::{
    load_checkpoint, resolve_checkpoint, write_atomic, Checkpoint, CheckpointError, Checkpointer, TrainState,
};
use crate::config::{ConfigError, RunConfig};
use crate::data::{eval_batches, Batch, Batcher, DataError, Dataset};
use crate::metrics::{read_metrics, MetricsWriter, StepLog};
use crate::optim::{clip_factor, grad_norm, AdamW, AdamWConfig};
use crate::plots::{plot_heatmap, plot_losses, Heatmap};
use crate::schedule::Schedule;
use crate::tokenizer::Tokenizer;

/// What can stop a training run (or loading one).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor op failed.
    #[error(transparent)]
    Tensor(#[from] moeba_tensor::Error),
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Data or tokenizer trouble.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint or metrics file trouble.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The loss became NaN or infinite.
    #[error("training loss is {loss} at step {step}; stopped before updating, the last checkpoint is intact. HINT: lower learning_rate or set grad_clip")]
    NonFinite {
        /// The step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// A bad argument.
    #[error("`{key}`: {msg}")]
    Invalid {
        /// The option.
        key: String,
        /// What was wrong.
        msg: String,
    },
}

/// How to run [`train`] (things that are not part of the config).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run directory (checkpoints, `metrics.jsonl`, `tb/`, plots, `config.toml`).
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `out` (bit-exact), instead of starting fresh.
    pub resume: bool,
    /// Show an indicatif progress bar on stderr.
    pub progress: bool,
}

/// Validation figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy, nats per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub ppl: f64,
    /// Bits per byte of text.
    pub bpb: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps done.
    pub steps: usize,
    /// The last validation figures.
    pub final_eval: Option<EvalResult>,
    /// The best validation loss.
    pub best_val_loss: Option<f64>,
    /// Training wall time (this process), seconds.
    pub seconds: f64,
    /// Mean training tokens per second.
    pub tokens_per_s: f64,
    /// Parameter counts.
    pub params: ParamCounts,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// Warnings (config, collapse) seen during the run.
    pub warnings: Vec<String>,
}

/// A trained model loaded from a checkpoint, with everything needed to use it.
pub struct LoadedRun {
    /// The run's config.
    pub config: RunConfig,
    /// The parameters.
    pub store: ParamStore,
    /// The model.
    pub model: HybridModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The step the checkpoint was taken at.
    pub step: usize,
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
}

/// Extra controls of a run, beyond [`TrainOptions`] (for [`train_with`]).
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Stop after this many optimizer steps in total, as if the run were interrupted there: the
    /// state is checkpointed (no evaluation, no log line, no plots) so `resume` continues it
    /// exactly. `None` (the default): run to `max_steps` or `max_seconds`.
    pub stop_after: Option<usize>,
    /// When set (e.g. by a Ctrl-C handler), the loop stops after the current step the same way.
    pub stop: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for LoadedRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedRun")
            .field("checkpoint", &self.checkpoint)
            .field("step", &self.step)
            .field("tokenizer", &self.tokenizer)
            .field("params", &self.store.num_elements())
            .finish_non_exhaustive()
    }
}

/// Trains `cfg` as `opts` says, calling `on_log` for each logged step.
pub fn train(
    cfg: &RunConfig,
    opts: &TrainOptions,
    on_log: impl FnMut(&StepLog),
) -> Result<TrainSummary, TrainError> {
    train_with(cfg, opts, &RunControl::default(), on_log)
}

/// The seed of the data sampler, derived from the run seed (independent of the init stream).
const BATCHER_SEED: u64 = 0xDA7A_5EED_0000_0001;
/// The seed of the trainer's RNG (per-step MoE jitter seeds).
const TRAINER_SEED: u64 = 0x7E41_4E52_0000_0002;

fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(CheckpointError::Io { path: path.display().to_string(), msg: e.to_string() })
}

fn ckpt_invalid(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint(CheckpointError::Invalid { path: path.display().to_string(), msg: msg.into() })
}

/// The name a MoE layer's balancing bias is saved under.
fn bias_key(block: usize) -> String {
    format!("model.layers.{block}.feed_forward")
}

/// One MoE layer's monitor: its collapse detector and whether it is currently warning.
struct MoeMonitor {
    block: usize,
    detector: CollapseDetector,
    warned: bool,
}

/// [`train`] with extra [`RunControl`]s.
pub fn train_with(
    cfg: &RunConfig,
    opts: &TrainOptions,
    control: &RunControl,
    mut on_log: impl FnMut(&StepLog),
) -> Result<TrainSummary, TrainError> {
    let mut warnings = cfg.validate()?;
    let t = &cfg.trainer;
    let device = Device::Cpu;
    let out = opts.out.as_path();
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;

    let tokenizer = Tokenizer::from_spec(&t.tokenizer)?;
    cfg.check_vocab(tokenizer.vocab_size())?;
    let hcfg = cfg.model.to_hybrid(t)?;
    let (store, model) = build_model(&hcfg, t.seed, &device)?;
    if let (Some(dir), false) = (&t.init_from_hf, opts.resume) {
        crate::hf::load_hf_weights(Path::new(dir), &hcfg, &store)?;
    }
    let params = store.params();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig { beta1: t.betas[0], beta2: t.betas[1], eps: 1e-8, weight_decay: t.weight_decay },
    )?;
    let schedule = Schedule {
        kind: t.schedule,
        lr: t.learning_rate,
        min_lr: t.min_lr,
        warmup_steps: t.warmup_steps,
        max_steps: t.max_steps,
    };
    let checkpointer = Checkpointer::new(out, t.keep_last)?;

    // The run's mutable state: what a checkpoint holds besides tensors.
    let mut step = 0usize;
    let mut batcher = Batcher::new(t.seed ^ BATCHER_SEED);
    let mut rng = Rng::new(t.seed ^ TRAINER_SEED);
    let mut tokens_seen = 0u64;
    let mut elapsed_before = 0.0f64;
    let mut best_val: Option<f64> = None;
    let mut last_ckpt: Option<PathBuf> = None;
    if opts.resume {
        let dir = checkpointer.latest()?.ok_or_else(|| TrainError::Invalid {
            key: "resume".into(),
            msg: format!(
                "no checkpoint to resume from in {}; start without --resume",
                out.join("checkpoints").display()
            ),
        })?;
        let ck = load_checkpoint(&dir)?;
        let (saved, _) = RunConfig::from_toml(&ck.config_toml)
            .map_err(|e| ckpt_invalid(&dir.join("config.toml"), e.to_string()))?;
        if saved.model != cfg.model {
            return Err(ckpt_invalid(
                &dir,
                "was trained with a different [model] table than the config given; resume with the run's own \
                 config.toml",
            ));
        }
        store
            .load_safetensors(&ck.model)
            .map_err(|e| ckpt_invalid(&dir.join("model.safetensors"), e.to_string()))?;
        opt.load_state_safetensors(&ck.optimizer)
            .map_err(|e| ckpt_invalid(&dir.join("optimizer.safetensors"), e.to_string()))?;
        restore_biases(&model, &ck.state, &dir)?;
        let st = ck.state;
        step = st.step;
        rng = Rng::from_state(st.rng);
        batcher = Batcher::from_state(st.data);
        tokens_seen = st.tokens_seen;
        elapsed_before = st.elapsed_s;
        best_val = st.best_val_loss;
        last_ckpt = Some(dir);
    } else if checkpointer.latest()?.is_some() {
        return Err(TrainError::Invalid {
            key: "out".into(),
            msg: format!(
                "{} already holds checkpoints of an earlier run. HINT: resume it (--resume), pick another \
                 run directory (--out), or delete it",
                out.display()
            ),
        });
    }

    let data = Dataset::load(&t.dataset, &tokenizer, t.val_fraction, t.seed)?;
    let evals =
        eval_batches(&data.val, data.val_tasks.as_deref(), t.batch_size, t.seq_len, t.eval_steps, &device)?;
    let config_toml = cfg.to_toml()?;
    let cfg_path = out.join("config.toml");
    write_atomic(&cfg_path, config_toml.as_bytes()).map_err(|e| io_err(&cfg_path, e))?;
    let mut metrics = MetricsWriter::open(out, opts.resume.then_some(step))?;

    let moe_layers = model.moe_layers();
    let mut monitors: Vec<MoeMonitor> = moe_layers
        .iter()
        .map(|(block, layer)| {
            let e = layer.config().num_experts.max(1) as f64;
            MoeMonitor { block: *block, detector: CollapseDetector::new(0.1 / e, 20), warned: false }
        })
        .collect();

    let bar = opts.progress.then(|| progress_bar(t.max_steps, step));
    let say = |msg: &str| match &bar {
        Some(b) => b.println(msg),
        None => eprintln!("{msg}"),
    };
    for w in &warnings {
        say(&format!("warning: {w}"));
    }

    let recompute = t.recompute.to_nn();
    let accum = t.grad_accum_steps;
    let tokens_per_step = (t.batch_size * t.seq_len * accum) as u64;
    let start = Instant::now();
    let mut last_log = (Instant::now(), tokens_seen);
    let mut final_eval: Option<EvalResult> = None;
    let mut interrupted = false;
    let mut ckpt_path = last_ckpt.clone();
    let first_step = step;

    while step < t.max_steps {
        let lr = schedule.lr_at(step);
        let moe_seed = rng.next_u64();
        let mut acc: Option<Grads> = None;
        let mut loss_sum = 0.0;
        let mut aux_sum = 0.0;
        let mut step_stats: Vec<Option<RoutingStats>> = vec![None; monitors.len()];
        for micro in 0..accum {
            let batch = batcher.next_batch(
                &data.train,
                data.train_tasks.as_deref(),
                t.batch_size,
                t.seq_len,
                &device,
            )?;
            let mut moe = MoeContext::training((step * accum + micro) as u64, moe_seed).with_causal(true);
            if let Some(tasks) = &batch.tasks {
                moe = moe.with_task_ids(tasks.clone());
            }
            let fo = ForwardOptions { recompute, moe };
            let out = model.forward(&batch.ids, &fo).map_err(|e| diverged(e, step + 1))?;
            let lm = HybridModel::lm_loss(&out.logits, &batch.targets).map_err(|e| diverged(e, step + 1))?;
            let (total, lm_v, aux_v) = match &out.aux_loss {
                Some(aux) => {
                    // One host read for both scalars.
                    let both = ops::stack(&[lm.tensor(), aux.tensor()], 0)?.to_vec_f64()?;
                    (lm.add(aux)?, both[0], both[1])
                }
                None => {
                    let v = lm.tensor().to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    (lm.clone(), v, 0.0)
                }
            };
            if !(lm_v.is_finite() && aux_v.is_finite()) {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(TrainError::NonFinite { step: step + 1, loss: lm_v + aux_v });
            }
            loss_sum += lm_v;
            aux_sum += aux_v;
            for (block, stats) in &out.routing {
                let Some(slot) = monitors.iter().position(|m| m.block == *block).map(|i| &mut step_stats[i])
                else {
                    continue;
                };
                *slot = Some(match slot.take() {
                    Some(prev) => prev.merge(stats),
                    None => stats.clone(),
                });
            }
            drop(out);
            let grads = total.backward().map_err(|e| diverged(e, step + 1))?;
            acc = Some(match acc {
                None => grads,
                Some(prev) => add_grads(&params, prev, grads)?,
            });
        }
        let grads = acc.unwrap_or_default();
        // The mean gradient over micro-batches is grads / accum: fold that into the scale.
        let norm = grad_norm(&params, &grads)? / accum as f64;
        if !norm.is_finite() {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(TrainError::NonFinite { step: step + 1, loss: norm });
        }
        let clip = clip_factor(norm, t.grad_clip);
        opt.step(&grads, lr, clip / accum as f64).map_err(|e| diverged(e, step + 1))?;
        drop(grads);
        step += 1;
        tokens_seen += tokens_per_step;

        // Balancing bias and collapse monitoring from this step's routing.
        let mut balance: Option<f64> = None;
        for ((mon, (_, layer)), stats) in monitors.iter_mut().zip(&moe_layers).zip(&step_stats) {
            let Some(stats) = stats else { continue };
            layer.update_balancing_bias(stats)?;
            let ratio = stats.max_load_ratio();
            balance = Some(balance.map_or(ratio, |b: f64| b.max(ratio)));
            match mon.detector.observe(stats) {
                Some(w) if !mon.warned => {
                    let msg = format!("layer {}: {w}", mon.block);
                    say(&format!("warning: {msg}"));
                    warnings.push(msg);
                    mon.warned = true;
                }
                Some(_) => {}
                None => mon.warned = false,
            }
        }

        let elapsed = elapsed_before + start.elapsed().as_secs_f64();
        let out_of_time = t.max_seconds.is_some_and(|m| elapsed >= m);
        let finished = step >= t.max_steps || out_of_time;
        let stop_now = !finished
            && (control.stop_after.is_some_and(|s| step >= s)
                || control.stop.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)));
        let mut saved_now = false;
        let eval_now = step.is_multiple_of(t.eval_every) || finished;
        let log_now = step.is_multiple_of(t.log_every) || eval_now;
        if log_now {
            let now = Instant::now();
            let dt = now.duration_since(last_log.0).as_secs_f64();
            let mut log = StepLog {
                step,
                loss: loss_sum / accum as f64,
                lr,
                tokens_per_s: if dt > 0.0 { (tokens_seen - last_log.1) as f64 / dt } else { 0.0 },
                aux_loss: aux_sum / accum as f64,
                grad_norm: norm,
                expert_balance: balance,
                val_loss: None,
                val_ppl: None,
                val_bpb: None,
                tokens: tokens_seen,
                elapsed_s: elapsed,
            };
            let mut is_best = false;
            if eval_now {
                let (ev, _) = evaluate_with_stats(&model, &evals, data.bytes_per_token)?;
                log.val_loss = Some(ev.loss);
                log.val_ppl = Some(ev.ppl);
                log.val_bpb = Some(ev.bpb);
                is_best = best_val.is_none_or(|b| ev.loss < b);
                if is_best {
                    best_val = Some(ev.loss);
                }
                final_eval = Some(ev);
            }
            metrics.log(&log)?;
            for ((block, _), stats) in moe_layers.iter().zip(&step_stats) {
                if let Some(stats) = stats {
                    for (e, u) in stats.usage().iter().enumerate() {
                        metrics.scalar(&format!("moe/layer{block}/expert{e}"), *u, step)?;
                    }
                }
            }
            if let Some(b) = &bar {
                b.set_position(step as u64);
                b.set_message(progress_message(&log));
            }
            if eval_now {
                metrics.flush()?;
            }
            on_log(&log);
            last_log = (Instant::now(), tokens_seen);
            if eval_now {
                let saving = t.save_every == 0 || step.is_multiple_of(t.save_every) || finished || is_best;
                if saving {
                    let st = train_state(
                        step,
                        &rng,
                        &batcher,
                        tokens_seen,
                        elapsed,
                        log.val_loss,
                        best_val,
                        &model,
                    );
                    ckpt_path = Some(save(&checkpointer, &config_toml, &store, &opt, st, is_best)?);
                    saved_now = true;
                }
            }
        } else if let Some(b) = &bar {
            b.set_position(step as u64);
        }
        let periodic = t.save_every > 0 && step.is_multiple_of(t.save_every);
        if !saved_now && (periodic || stop_now) {
            let st = train_state(step, &rng, &batcher, tokens_seen, elapsed, None, best_val, &model);
            ckpt_path = Some(save(&checkpointer, &config_toml, &store, &opt, st, false)?);
        }
        if stop_now {
            interrupted = true;
            break;
        }
        if finished {
            break;
        }
    }
    metrics.flush()?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();
    let trained_tokens = (step - first_step) as u64 * tokens_per_step;

    if !interrupted {
        // Plots: loss curves, and expert usage per MoE layer on the validation batches.
        let plot = || -> Result<(), TrainError> {
            let logs = read_metrics(&out.join("metrics.jsonl"))?;
            plot_losses(&logs, out)?;
            if !moe_layers.is_empty() {
                let (_, stats) = evaluate_with_stats(&model, &evals, data.bytes_per_token)?;
                let cols = stats.first().map_or(0, |(_, s)| s.num_experts());
                let map = Heatmap {
                    title: "expert usage per MoE layer (validation)".into(),
                    rows: stats.iter().map(|(b, _)| format!("layer {b}")).collect(),
                    cols: (0..cols).map(|e| format!("e{e}")).collect(),
                    values: stats.iter().map(|(_, s)| s.usage()).collect(),
                };
                plot_heatmap(&map, out, "experts")?;
            }
            Ok(())
        };
        if let Err(e) = plot() {
            let msg = format!("plots were not written: {e}");
            eprintln!("warning: {msg}");
            warnings.push(msg);
        }
    }

    let checkpoint = ckpt_path.ok_or_else(|| ckpt_invalid(out, "no checkpoint was written"))?;
    Ok(TrainSummary {
        steps: step,
        final_eval,
        best_val_loss: best_val,
        seconds,
        tokens_per_s: if seconds > 0.0 { trained_tokens as f64 / seconds } else { 0.0 },
        params: model.param_counts(),
        run_dir: out.to_path_buf(),
        checkpoint,
        warnings,
    })
}

/// A kernel or the optimizer refusing a non-finite value (an overflowing activation, a NaN
/// gradient) means the run diverged: reported as [`TrainError::NonFinite`] naming the step (the
/// cause goes to stderr); other errors pass through.
fn diverged(e: moeba_tensor::Error, step: usize) -> TrainError {
    let msg = e.to_string();
    if msg.contains("non-finite") {
        eprintln!("error: step {step}: {msg}");
        TrainError::NonFinite { step, loss: f64::NAN }
    } else {
        e.into()
    }
}

fn progress_bar(len: usize, pos: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(pos as u64);
    bar
}

fn progress_message(log: &StepLog) -> String {
    let mut msg = format!(
        "loss {:.4} lr {:.2e} {:.0} tok/s aux {:.4}",
        log.loss, log.lr, log.tokens_per_s, log.aux_loss
    );
    if let Some(b) = log.expert_balance {
        msg.push_str(&format!(" bal {b:.2}"));
    }
    if let Some(v) = log.val_loss {
        msg.push_str(&format!(" val {v:.4}"));
    }
    msg
}

/// Adds the gradients of `b` into `a`, parameter by parameter.
fn add_grads(params: &[Param], mut a: Grads, mut b: Grads) -> Result<Grads, TrainError> {
    for p in params {
        let var = p.var();
        if let Some(gb) = b.remove(&var) {
            let sum = match a.remove(&var) {
                Some(ga) => ops::add(&ga, &gb)?,
                None => gb,
            };
            a.insert(&var, sum);
        }
    }
    Ok(a)
}

#[allow(clippy::too_many_arguments)]
fn train_state(
    step: usize,
    rng: &Rng,
    batcher: &Batcher,
    tokens_seen: u64,
    elapsed_s: f64,
    val_loss: Option<f64>,
    best_val_loss: Option<f64>,
    model: &HybridModel,
) -> TrainState {
    let balancing_bias = model
        .moe_layers()
        .iter()
        .filter_map(|(block, layer)| layer.balancing_bias().map(|b| (bias_key(*block), b)))
        .collect();
    TrainState {
        step,
        rng: rng.state(),
        data: batcher.state(),
        tokens_seen,
        elapsed_s,
        val_loss,
        best_val_loss,
        balancing_bias,
    }
}

fn save(
    checkpointer: &Checkpointer,
    config_toml: &str,
    store: &ParamStore,
    opt: &AdamW,
    state: TrainState,
    is_best: bool,
) -> Result<PathBuf, TrainError> {
    let ckpt = Checkpoint {
        config_toml: config_toml.to_string(),
        model: store.to_safetensors(None)?,
        optimizer: opt.state_to_safetensors()?,
        state,
    };
    Ok(checkpointer.save(&ckpt, is_best)?)
}

/// Puts the saved aux-loss-free balancing biases back into the model's MoE layers; a layer
/// missing from the checkpoint, or an extra one, is an error naming it.
fn restore_biases(model: &HybridModel, state: &TrainState, dir: &Path) -> Result<(), TrainError> {
    let state_file = dir.join("state.json");
    let mut used = 0;
    for (block, layer) in model.moe_layers() {
        let Some(balancer) = layer.balancer() else { continue };
        let key = bias_key(block);
        let (_, bias) = state.balancing_bias.iter().find(|(k, _)| *k == key).ok_or_else(|| {
            ckpt_invalid(&state_file, format!("has no balancing bias for `{key}`, which the model balances"))
        })?;
        balancer.set_bias(bias).map_err(|e| ckpt_invalid(&state_file, format!("`{key}`: {e}")))?;
        used += 1;
    }
    if used != state.balancing_bias.len() {
        return Err(ckpt_invalid(
            &state_file,
            format!(
                "holds {} balancing biases, the model has {used} MoE layers with bias balancing",
                state.balancing_bias.len()
            ),
        ));
    }
    Ok(())
}

/// Loads a model from a checkpoint directory, or from a run directory (its best checkpoint when
/// `prefer_best`, else its newest).
pub fn load_run(path: &Path, prefer_best: bool) -> Result<LoadedRun, TrainError> {
    let dir = resolve_checkpoint(path, prefer_best)?;
    let ck = load_checkpoint(&dir)?;
    let (config, _) = RunConfig::from_toml(&ck.config_toml)
        .map_err(|e| ckpt_invalid(&dir.join("config.toml"), e.to_string()))?;
    let tokenizer = Tokenizer::from_spec(&config.trainer.tokenizer)?;
    config.check_vocab(tokenizer.vocab_size())?;
    let hcfg = config.model.to_hybrid(&config.trainer)?;
    let (store, model) = build_model(&hcfg, config.trainer.seed, &Device::Cpu)?;
    store
        .load_safetensors(&ck.model)
        .map_err(|e| ckpt_invalid(&dir.join("model.safetensors"), e.to_string()))?;
    restore_biases(&model, &ck.state, &dir)?;
    Ok(LoadedRun { config, store, model, tokenizer, step: ck.state.step, checkpoint: dir })
}

/// Mean loss, perplexity and bits per byte of `model` over `batches` (no gradients).
pub fn evaluate(
    model: &HybridModel,
    batches: &[Batch],
    bytes_per_token: f64,
) -> Result<EvalResult, TrainError> {
    Ok(evaluate_with_stats(model, batches, bytes_per_token)?.0)
}

/// [`evaluate`], also returning each MoE layer's routing statistics merged over the batches, as
/// (block index, stats).
pub fn evaluate_with_stats(
    model: &HybridModel,
    batches: &[Batch],
    bytes_per_token: f64,
) -> Result<(EvalResult, Vec<(usize, RoutingStats)>), TrainError> {
    if batches.is_empty() {
        return Err(TrainError::Invalid { key: "batches".into(), msg: "no evaluation batches".into() });
    }
    if !(bytes_per_token > 0.0 && bytes_per_token.is_finite()) {
        return Err(TrainError::Invalid {
            key: "bytes_per_token".into(),
            msg: format!("must be > 0, got {bytes_per_token}"),
        });
    }
    let _guard = no_grad();
    let mut losses = Vec::with_capacity(batches.len());
    let mut stats: Vec<(usize, RoutingStats)> = Vec::new();
    for batch in batches {
        let mut moe = MoeContext::default().with_causal(true);
        if let Some(tasks) = &batch.tasks {
            moe = moe.with_task_ids(tasks.clone());
        }
        let out = model.forward(&batch.ids, &ForwardOptions { moe, ..Default::default() })?;
        losses.push(HybridModel::lm_loss(&out.logits, &batch.targets)?);
        for (block, s) in out.routing {
            match stats.iter_mut().find(|(b, _)| *b == block) {
                Some((_, prev)) => *prev = prev.merge(&s),
                None => stats.push((block, s)),
            }
        }
    }
    // One host read for all batches.
    let refs: Vec<&Tensor> = losses.iter().map(Var::tensor).collect();
    let values = ops::stack(&refs, 0)?.to_vec_f64()?;
    let loss = values.iter().sum::<f64>() / values.len() as f64;
    let result = EvalResult { loss, ppl: loss.exp(), bpb: loss / std::f64::consts::LN_2 / bytes_per_token };
    Ok((result, stats))
}
