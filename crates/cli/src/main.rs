//! The `moeba` command: `train` (the main job) and `generate`.
//!
//! `moeba train` with no argument trains the embedded default: a byte-level language model on
//! the tiny Shakespeare corpus built into the binary, writing `metrics.jsonl`, `config.json` and
//! `model.safetensors` into the run directory. `moeba generate --checkpoint DIR` samples from it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use moeba_train::data::TokenDataset;
use moeba_train::{generate, load_run, train, TrainOptions};

#[derive(Parser)]
#[command(name = "moeba", version, about = "Train and sample hybrid Mamba / attention / MoE models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the default byte-level model on the embedded tiny Shakespeare corpus.
    Train {
        /// Run directory (checkpoint, metrics.jsonl, config.json).
        #[arg(long, default_value = "runs/default")]
        out: PathBuf,
        /// Optimizer steps (default: the embedded default's).
        #[arg(long)]
        steps: Option<usize>,
        /// Random seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Peak learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Windows per step.
        #[arg(long)]
        batch_size: Option<usize>,
    },
    /// Sample text from a trained run directory.
    Generate {
        /// The run directory written by `moeba train`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The text to continue.
        #[arg(long, default_value = "ROMEO:\n")]
        prompt: String,
        /// Bytes to generate.
        #[arg(long, default_value_t = 300)]
        max_new_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train { out, steps, seed, lr, batch_size } => {
            let mut opts = TrainOptions::default();
            if let Some(s) = steps {
                opts.max_steps = s;
                opts.eval_every = opts.eval_every.min(s.max(1));
            }
            if let Some(s) = seed {
                opts.seed = s;
            }
            if let Some(lr) = lr {
                opts.learning_rate = lr;
                opts.min_lr = opts.min_lr.min(lr);
            }
            if let Some(b) = batch_size {
                opts.batch_size = b;
            }
            let data = TokenDataset::tiny_shakespeare();
            println!(
                "moeba train: byte-level WindowLm on tiny Shakespeare ({} train / {} val bytes), {} steps, run dir {}",
                data.train.len(),
                data.val.len(),
                opts.max_steps,
                out.display()
            );
            let summary = train(&opts, &data, &out, |log| {
                let val = log.val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
                println!(
                    "step {:>5}  loss {:.4}{val}  lr {:.2e}  {:.0} tok/s  |g| {:.3}  {:.1}s",
                    log.step, log.loss, log.lr, log.tokens_per_s, log.grad_norm, log.elapsed_s
                );
            })
            .context("training failed")?;
            println!(
                "done: {} parameters, validation loss {:.4} nats/byte, {:.1}s; checkpoint {}",
                summary.num_params,
                summary.final_val_loss,
                summary.seconds,
                summary.checkpoint.display()
            );
        }
        Command::Generate { checkpoint, prompt, max_new_tokens, temperature, seed } => {
            let (_, _, model) = load_run(&checkpoint)
                .with_context(|| format!("cannot load the run in {}", checkpoint.display()))?;
            let text = generate(&model, &prompt, max_new_tokens, temperature, seed)?;
            println!("{prompt}{text}");
        }
    }
    Ok(())
}
