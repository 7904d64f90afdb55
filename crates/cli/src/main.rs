//! The `moeba` command: train, sample, evaluate and inspect hybrid Mamba / attention / MoE
//! language models described by a TOML config.
//!
//! - `moeba train [CONFIG]` trains (no argument: the embedded tiny-hybrid config on the embedded
//!   tiny Shakespeare corpus) and writes a run directory: checkpoints, `metrics.jsonl`,
//!   TensorBoard events and plots;
//! - `moeba generate --checkpoint DIR` streams text sampled from a trained model;
//! - `moeba eval --checkpoint DIR` reports loss, perplexity and bits per byte on held-out data;
//! - `moeba inspect CONFIG|CHECKPOINT` shows the layer map, parameter counts and memory;
//! - `moeba experts CHECKPOINT` reports which tokens go to which expert of each MoE layer.
//!
//! Errors are printed as one line (with their causes) and exit with status 1; bad arguments
//! exit with status 2.

mod alloc;
mod commands;
mod configs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    name = "moeba",
    version,
    about = "Train and sample hybrid Mamba / attention / MoE language models",
    long_about = "Train and sample hybrid Mamba / attention / MoE language models described by a TOML \
                  config.\n\nStart with `moeba train` (the embedded tiny-hybrid model on tiny Shakespeare), \
                  then `moeba generate --checkpoint runs/default`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a config (default: the embedded tiny-hybrid on tiny Shakespeare).
    #[command(long_about = "Train a model from a config and write a run directory: checkpoints/ \
        (the last few and best/), metrics.jsonl, tb/ (TensorBoard), loss and expert plots, config.toml.\n\n\
        CONFIG is a TOML file or the name of a shipped config (tiny-hybrid, mamba-only, transformer-only, \
        moe-transformer, jamba-like, mla-moe, mamba2-hybrid); without it the embedded tiny-hybrid is used.")]
    Train {
        /// A TOML config file or a shipped config name (default: tiny-hybrid).
        config: Option<String>,
        /// Run directory (default: the config's trainer.output_dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config key, e.g. `--set trainer.max_steps=100 --set model.hidden_size=64`
        /// (the value is TOML: numbers, true/false, "strings", [lists]); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the newest checkpoint in the run directory (bit-exact).
        #[arg(long)]
        resume: bool,
        /// No progress bar; print every logged step instead.
        #[arg(long)]
        no_progress: bool,
    },
    /// Sample text from a trained model, streaming it to stdout.
    Generate {
        /// A run directory (its best checkpoint, else the newest) or a checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The text to continue, printed first (empty: start from a newline).
        #[arg(long, default_value = "")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 500)]
        max_new_tokens: usize,
        /// Softmax temperature (0 = greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample only from the K most likely tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Sample only from the smallest set of tokens whose probability reaches P (nucleus).
        #[arg(long)]
        top_p: Option<f64>,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Loss, perplexity and bits per byte of a trained model on held-out data.
    Eval {
        /// A run directory (its best checkpoint, else the newest) or a checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Data set: tinyshakespeare, arithmetic, a text file or a folder (default: the run's).
        #[arg(long)]
        data: Option<String>,
        /// Evaluation batches (default: the run's trainer.eval_steps).
        #[arg(long)]
        steps: Option<usize>,
    },
    /// Layer map, parameter counts, training memory per recompute level and decoding cache size.
    #[command(long_about = "Show what a config or checkpoint describes: each layer's mixer and \
        feed-forward, parameters (total and active per token), the training memory (weights, gradients, \
        AdamW state, and the activations of one step at each recompute level: none, mixer, block) and the \
        decoding cache at a context length. With --measure, one training step per recompute level is run \
        and its peak memory measured.")]
    Inspect {
        /// A TOML config file, a shipped config name, or a run / checkpoint directory.
        target: String,
        /// Context length for the decoding cache size (default: model.max_seq_len).
        #[arg(long)]
        context: Option<usize>,
        /// Run one training step per recompute level and measure its peak memory.
        #[arg(long)]
        measure: bool,
        /// Override a config key (as for `train`); on a checkpoint only trainer.* keys.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Which tokens go to which expert: usage, entropy, token classes, purity, heatmaps.
    #[command(long_about = "Route held-out tokens through a trained MoE model and report, per MoE \
        layer, each expert's share, the router entropy, the share of each token class (letters, digits, \
        whitespace, punctuation, the operators + - =, and the tasks of the arithmetic set) per expert, the \
        top tokens per expert and the purity of the + and - positions. Heatmaps (PNG and SVG) are written \
        into --out (default: the run directory).")]
    Experts {
        /// A run directory (its best checkpoint, else the newest) or a checkpoint directory.
        checkpoint: PathBuf,
        /// Data set: tinyshakespeare, arithmetic, a text file or a folder (default: the run's).
        #[arg(long)]
        data: Option<String>,
        /// Validation tokens to route.
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Where the heatmaps go (default: the run directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, out, set, resume, no_progress } => {
            commands::train::run(config.as_deref(), out, &set, resume, no_progress)
        }
        Command::Generate { checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed } => {
            let opts = moeba_train::SampleOptions { max_new_tokens, temperature, top_k, top_p, seed };
            commands::generate::run(&checkpoint, &prompt, &opts)
        }
        Command::Eval { checkpoint, data, steps } => commands::eval::run(&checkpoint, data.as_deref(), steps),
        Command::Inspect { target, context, measure, set } => {
            commands::inspect::run(&target, context, measure, &set)
        }
        Command::Experts { checkpoint, data, tokens, out } => {
            commands::experts::run(&checkpoint, data.as_deref(), tokens, out)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
