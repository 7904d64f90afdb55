//! The training loop of the first end-to-end model ([`moeba_nn::WindowLm`] on bytes): AdamW,
//! warmup + cosine schedule, global-norm clipping, periodic evaluation on held-out text,
//! `metrics.jsonl`, and atomic checkpoints. A non-finite loss stops the run with an error naming
//! the step, before any parameter is touched, so the last checkpoint stays good.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use moeba_autograd::no_grad;
use moeba_kernels::ops;
use moeba_nn::{ParamStore, WindowLm, WindowLmConfig};
use moeba_tensor::{DType, Device, Rng, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::data::{sample_windows, ByteTokenizer, TokenDataset};
use crate::optim::{clip_factor, AdamW, AdamWConfig};
use crate::schedule::{Schedule, ScheduleKind};

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor op failed.
    #[error(transparent)]
    Tensor(#[from] moeba_tensor::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The loss became NaN or infinite.
    #[error("training loss is {loss} at step {step}; stopped before updating, the last checkpoint is intact. HINT: lower learning_rate or set grad_clip")]
    NonFinite {
        /// The step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// An option had a bad value.
    #[error("bad option `{key}`: {msg}")]
    BadOption {
        /// The option.
        key: &'static str,
        /// What was wrong.
        msg: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// The model's sizes as saved beside a checkpoint (`config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOptions {
    /// Previous bytes the model sees.
    pub context: usize,
    /// Width of each byte embedding.
    pub embed_dim: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width inside each SwiGLU block.
    pub intermediate: usize,
    /// Residual blocks.
    pub layers: usize,
}

impl ModelOptions {
    /// The nn config (byte vocabulary).
    pub fn to_nn(self) -> WindowLmConfig {
        WindowLmConfig {
            vocab: ByteTokenizer::VOCAB,
            context: self.context,
            embed_dim: self.embed_dim,
            hidden: self.hidden,
            intermediate: self.intermediate,
            layers: self.layers,
        }
    }
}

/// Everything a run needs. `Default` is the embedded default run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Model sizes.
    pub model: ModelOptions,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Windows per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Validation windows per evaluation, in batches of `batch_size`.
    pub eval_batches: usize,
    /// Seed for initialisation and sampling.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: ModelOptions { context: 16, embed_dim: 24, hidden: 256, intermediate: 512, layers: 2 },
            max_steps: 3000,
            batch_size: 64,
            learning_rate: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            grad_clip: 1.0,
            eval_every: 250,
            eval_batches: 16,
            seed: 1337,
        }
    }
}

impl TrainOptions {
    /// Checks the values; errors name the option.
    pub fn validate(&self) -> Result<(), TrainError> {
        let positive = [
            ("max_steps", self.max_steps),
            ("batch_size", self.batch_size),
            ("eval_every", self.eval_every),
            ("eval_batches", self.eval_batches),
            ("model.context", self.model.context),
            ("model.embed_dim", self.model.embed_dim),
            ("model.hidden", self.model.hidden),
            ("model.intermediate", self.model.intermediate),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(TrainError::BadOption { key, msg: "must be > 0".into() });
            }
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return Err(TrainError::BadOption {
                key: "learning_rate",
                msg: format!("must be > 0, got {}", self.learning_rate),
            });
        }
        if !(0.0..=self.learning_rate).contains(&self.min_lr) {
            return Err(TrainError::BadOption {
                key: "min_lr",
                msg: format!("must be in [0, learning_rate], got {}", self.min_lr),
            });
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    /// Step number (1-based: steps done).
    pub step: usize,
    /// Training loss of this step, nats per byte.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Training throughput since the previous log.
    pub tokens_per_s: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Validation loss (nats per byte), on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Seconds since the start of training.
    pub elapsed_s: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The last validation loss.
    pub final_val_loss: f64,
    /// Wall time of the loop.
    pub seconds: f64,
    /// Trainable parameters.
    pub num_params: usize,
    /// Where the checkpoint is.
    pub checkpoint: PathBuf,
}

/// Mean validation loss over `batches` fixed windows (the same windows every call).
pub fn evaluate(model: &WindowLm, val: &[u32], batch: usize, batches: usize) -> Result<f64, TrainError> {
    let _g = no_grad();
    let mut rng = Rng::new(0xE7A1);
    let mut total = 0.0;
    for _ in 0..batches {
        let (x, y) = sample_windows(val, batch, model.config().context, &mut rng, &Device::Cpu)?;
        let logits = model.forward(&x)?;
        total += ops::cross_entropy(logits.tensor(), &y, None)?.to_scalar::<f32>()? as f64;
    }
    Ok(total / batches as f64)
}

/// Trains on `data`, writing `metrics.jsonl`, `config.json` and `model.safetensors` into `out`,
/// and calling `on_log` for every logged step.
pub fn train(
    opts: &TrainOptions,
    data: &TokenDataset,
    out: &Path,
    mut on_log: impl FnMut(&StepLog),
) -> Result<TrainSummary, TrainError> {
    opts.validate()?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let store = ParamStore::new(DType::F32, Device::Cpu, opts.seed);
    let model = WindowLm::new(&store.root(), opts.model.to_nn())?;
    let cfg_path = out.join("config.json");
    let cfg_json = serde_json::to_vec_pretty(opts)
        .map_err(|e| TrainError::BadOption { key: "config", msg: e.to_string() })?;
    write_atomic(&cfg_path, &cfg_json).map_err(io(&cfg_path))?;
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(io(&metrics_path))?;
    let ckpt = out.join("model.safetensors");

    let mut opt = AdamW::new(
        store.params(),
        AdamWConfig { weight_decay: opts.weight_decay, ..AdamWConfig::default() },
    )?;
    let schedule = Schedule {
        kind: ScheduleKind::Cosine,
        lr: opts.learning_rate,
        min_lr: opts.min_lr,
        warmup_steps: opts.warmup_steps,
        max_steps: opts.max_steps,
    };
    let mut rng = Rng::new(opts.seed);
    let start = Instant::now();
    let mut last_log = (Instant::now(), 0usize);
    let mut val_loss = f64::NAN;
    for step in 0..opts.max_steps {
        let (x, y) =
            sample_windows(&data.train, opts.batch_size, opts.model.context, &mut rng, &Device::Cpu)?;
        let logits = model.forward(&x)?;
        let loss = logits.cross_entropy(&y, None)?;
        let loss_value = loss.tensor().to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            return Err(TrainError::NonFinite { step: step + 1, loss: loss_value });
        }
        let grads = loss.backward()?;
        let (grad_norm, factor) = clip_factor(&grads, opts.grad_clip)?;
        let lr = schedule.lr_at(step);
        opt.step(&grads, lr, factor)?;

        let done = step + 1;
        let eval_now = done % opts.eval_every == 0 || done == opts.max_steps;
        if eval_now || done % 50 == 0 {
            let mut log = StepLog {
                step: done,
                loss: loss_value,
                lr,
                tokens_per_s: ((done - last_log.1) * opts.batch_size) as f64
                    / last_log.0.elapsed().as_secs_f64(),
                grad_norm,
                val_loss: None,
                elapsed_s: start.elapsed().as_secs_f64(),
            };
            if eval_now {
                val_loss = evaluate(&model, &data.val, opts.batch_size, opts.eval_batches)?;
                log.val_loss = Some(val_loss);
                let bytes = store.to_safetensors(None)?;
                write_atomic(&ckpt, &bytes).map_err(io(&ckpt))?;
            }
            let line = serde_json::to_string(&log)
                .map_err(|e| TrainError::BadOption { key: "metrics", msg: e.to_string() })?;
            writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
            on_log(&log);
            last_log = (Instant::now(), done);
        }
    }
    Ok(TrainSummary {
        final_val_loss: val_loss,
        seconds: start.elapsed().as_secs_f64(),
        num_params: store.num_elements(),
        checkpoint: ckpt,
    })
}

/// Loads a run directory written by [`train`]: its options and the trained model.
pub fn load_run(dir: &Path) -> Result<(TrainOptions, ParamStore, WindowLm), TrainError> {
    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read(&cfg_path).map_err(io(&cfg_path))?;
    let opts: TrainOptions = serde_json::from_slice(&cfg).map_err(|e| TrainError::BadOption {
        key: "config.json",
        msg: format!("{}: {e}", cfg_path.display()),
    })?;
    let store = ParamStore::new(DType::F32, Device::Cpu, opts.seed);
    let model = WindowLm::new(&store.root(), opts.model.to_nn())?;
    let ckpt = dir.join("model.safetensors");
    let bytes = std::fs::read(&ckpt).map_err(io(&ckpt))?;
    store
        .load_safetensors(&bytes)
        .map_err(|e| TrainError::BadOption { key: "checkpoint", msg: format!("{}: {e}", ckpt.display()) })?;
    Ok((opts, store, model))
}

/// Continues `prompt` by `n` bytes: temperature sampling (greedy at 0) from [`WindowLm`].
/// Prompts shorter than the context are padded on the left with newlines.
pub fn generate(
    model: &WindowLm,
    prompt: &str,
    n: usize,
    temperature: f64,
    seed: u64,
) -> Result<String, TrainError> {
    let _g = no_grad();
    let ctx = model.config().context;
    let mut ids = vec![b'\n' as u32; ctx.saturating_sub(prompt.len())];
    ids.extend(ByteTokenizer::encode(prompt));
    let start = ids.len();
    let mut rng = Rng::new(seed);
    for _ in 0..n {
        let window = Tensor::from_slice(&ids[ids.len() - ctx..], (1, ctx), &Device::Cpu)?;
        let logits = model.forward(&window)?.tensor().to_vec::<f32>()?;
        let next = if temperature <= 0.0 {
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best
        } else {
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
            let mut r = rng.uniform() * w.iter().sum::<f64>();
            let mut pick = w.len() - 1;
            for (i, wi) in w.iter().enumerate() {
                if r < *wi {
                    pick = i;
                    break;
                }
                r -= wi;
            }
            pick
        };
        ids.push(next as u32);
    }
    Ok(ByteTokenizer::decode(&ids[start..]))
}
