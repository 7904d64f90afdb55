//! The `moeba` command: train, sample, evaluate and inspect hybrid Mamba / attention / MoE
//! language models described by a TOML config.
//!
//! - `moeba train [CONFIG]` trains (no argument: the embedded tiny-hybrid config on the embedded
//!   tiny Shakespeare corpus) and writes a run directory: checkpoints, `metrics.jsonl`,
//!   TensorBoard events and plots;
//! - `moeba generate --checkpoint DIR` streams text sampled from a trained model;
//! - `moeba eval --checkpoint DIR` reports loss, perplexity and bits per byte on held-out data;
//! - `moeba inspect CONFIG|CHECKPOINT` shows the layer map, parameter counts and memory;
//! - `moeba experts CHECKPOINT` reports which tokens go to which expert of each MoE layer;
//! - `moeba logits --hf DIR --ids 1,2,3` writes a model's logits to a safetensors file.
//! - `moeba lab NAME` runs a measured experiment (context-length, …) into a report with plots.
//!
//! A HuggingFace model directory (`config.json` + safetensors weights) works wherever a model
//! is read: `generate --hf DIR`, `eval --hf DIR`, `logits --hf DIR`, `inspect DIR`, and
//! `train --hf DIR` fine-tunes it.
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
        /// Fine-tune the HuggingFace model in this directory: the model and its starting weights
        /// come from DIR (config.json, safetensors), the data is tokenized with DIR/tokenizer.json;
        /// the trainer settings come from CONFIG and --set as usual.
        #[arg(long, value_name = "DIR")]
        hf: Option<PathBuf>,
    },
    /// Sample text from a trained model or a HuggingFace model, streaming it to stdout.
    #[command(long_about = "Sample from a trained model (--checkpoint) or a HuggingFace model directory \
        (--hf). A text --prompt is printed, then the generated text streams after it. With --prompt-ids \
        1,2,3 one line is printed: the prompt ids followed by the generated ids, comma-separated (so \
        `--prompt-ids … --temperature 0` compares directly with transformers' greedy `generate` \
        output). With --hf, generation stops after the model's end-of-sequence token \
        (generation_config.json, else config.json) unless --ignore-eos.")]
    Generate {
        /// A run directory (its best checkpoint, else the newest) or a checkpoint directory.
        #[arg(long, required_unless_present = "hf", conflicts_with = "hf")]
        checkpoint: Option<PathBuf>,
        /// A HuggingFace model directory (config.json, model.safetensors or shards + index).
        #[arg(long, value_name = "DIR")]
        hf: Option<PathBuf>,
        /// The text to continue, printed first (empty: start from a newline; with --hf it must
        /// not be empty and is encoded with DIR/tokenizer.json).
        #[arg(long, default_value = "")]
        prompt: String,
        /// Token ids to continue, `1,2,3`; prints the prompt ids and then the generated ids,
        /// comma-separated, on one line.
        #[arg(long, value_name = "IDS", conflicts_with = "prompt")]
        prompt_ids: Option<String>,
        /// Do not stop at the model's end-of-sequence token (--hf).
        #[arg(long)]
        ignore_eos: bool,
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
    /// Loss, perplexity and bits per byte of a trained model on held-out data, or of a
    /// HuggingFace model (--hf) on a whole data set.
    Eval {
        /// A run directory (its best checkpoint, else the newest) or a checkpoint directory.
        #[arg(long, required_unless_present = "hf", conflicts_with = "hf")]
        checkpoint: Option<PathBuf>,
        /// A HuggingFace model directory (needs its tokenizer.json; requires --data).
        #[arg(long, value_name = "DIR", requires = "data")]
        hf: Option<PathBuf>,
        /// Data set: tinyshakespeare, arithmetic, a text file or a folder (default: the run's).
        #[arg(long)]
        data: Option<String>,
        /// Evaluation batches (default: the run's trainer.eval_steps; 8 with --hf).
        #[arg(long)]
        steps: Option<usize>,
        /// Sequences per batch (--hf only).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Tokens per sequence (--hf only).
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
    },
    /// Write the full no-cache logits of token ids to a safetensors file (`logits`, f32).
    #[command(long_about = "Run token ids through a model without caches and write the logits \
        (batch, seq, vocab) in f32 as the tensor `logits` of a safetensors file, for comparison with \
        other implementations. --ids takes one row `1,2,3` or several of equal length `1,2,3;4,5,6`; \
        every id must be below the vocabulary size.")]
    Logits {
        /// A HuggingFace model directory.
        #[arg(long, value_name = "DIR", required_unless_present = "checkpoint")]
        hf: Option<PathBuf>,
        /// A run or checkpoint directory written by `moeba train`.
        #[arg(long, conflicts_with = "hf")]
        checkpoint: Option<PathBuf>,
        /// Token ids: rows of equal length, `1,2,3;4,5,6`.
        #[arg(long)]
        ids: String,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Layer map, parameter counts, training memory per recompute level and decoding cache size.
    #[command(long_about = "Show what a config or checkpoint describes: each layer's mixer and \
        feed-forward, parameters (total and active per token), the training memory (weights, gradients, \
        AdamW state, and the activations of one step at each recompute level: none, mixer, block) and the \
        decoding cache at a context length. With --measure, one training step per recompute level is run \
        and its peak memory measured.")]
    Inspect {
        /// A TOML config file, a shipped config name, a run / checkpoint directory, or a
        /// HuggingFace model directory (then also the config mapping and the tensors read).
        target: String,
        /// Context length for the decoding cache size (default: model.max_seq_len; 2048 for a
        /// HuggingFace directory).
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
    /// Run a lab: a measured experiment with plots and a report (context-length, selective-scan, …).
    #[command(long_about = "Run one of moeba's labs, measured experiments that each write results.json \
        (every number, the machine, the config), plots (PNG and SVG) and report.md (question, setup, table, \
        pictures, answer) into --out.\n\nLabs: context-length (time, memory and cache of attention, \
        Mamba-1, Mamba-2 and a hybrid block from 1K to 128K tokens), selective-scan (selection against \
        the LTI ablation), expert-patterns (which tokens go where), load-balancing (which settings \
        collapse), architectures (five architectures at matched size and time). --quick runs small \
        sizes in under two minutes.")]
    Lab {
        /// The lab: context-length, selective-scan, expert-patterns, load-balancing, architectures.
        name: String,
        /// Run directory (default: runs/lab-NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Small sizes that finish in under two minutes on a 2-core CPU.
        #[arg(long)]
        quick: bool,
        /// Where the models run: cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Memory budget (context-length stops a mixer before it would pass it), e.g. 8G, 512M.
        #[arg(long, default_value = "8G", value_parser = commands::lab::parse_bytes)]
        mem_budget: u64,
        /// A lab setting, e.g. `--set max_len=65536` (each lab lists its keys); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, out, set, resume, no_progress, hf } => {
            commands::train::run(config.as_deref(), out, &set, resume, no_progress, hf.as_deref())
        }
        Command::Generate {
            checkpoint,
            hf,
            prompt,
            prompt_ids,
            ignore_eos,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        } => {
            use commands::generate::{Prompt, Source};
            let opts = moeba_train::SampleOptions { max_new_tokens, temperature, top_k, top_p, seed };
            let source = match (&hf, &checkpoint) {
                (Some(dir), _) => Source::Hf(dir),
                (None, Some(ck)) => Source::Checkpoint(ck),
                (None, None) => anyhow::bail!("give the model with --checkpoint DIR or --hf DIR"),
            };
            let prompt = match &prompt_ids {
                Some(ids) => Prompt::Ids(ids),
                None => Prompt::Text(&prompt),
            };
            commands::generate::run(source, prompt, &opts, ignore_eos)
        }
        Command::Eval { checkpoint, hf, data, steps, batch_size, seq_len } => match (&hf, &checkpoint) {
            (Some(dir), _) => {
                let data = data.as_deref().ok_or_else(|| anyhow::anyhow!("--hf needs --data FILE"))?;
                commands::eval::run_hf(dir, data, steps.unwrap_or(8), batch_size, seq_len)
            }
            (None, Some(ck)) => commands::eval::run(ck, data.as_deref(), steps),
            (None, None) => anyhow::bail!("give the model with --checkpoint DIR or --hf DIR"),
        },
        Command::Logits { hf, checkpoint, ids, out } => {
            commands::logits::run(hf.as_deref(), checkpoint.as_deref(), &ids, &out)
        }
        Command::Inspect { target, context, measure, set } => {
            commands::inspect::run(&target, context, measure, &set)
        }
        Command::Experts { checkpoint, data, tokens, out } => {
            commands::experts::run(&checkpoint, data.as_deref(), tokens, out)
        }
        Command::Lab { name, out, quick, device, mem_budget, set, no_progress } => {
            commands::lab::run(&name, out, quick, &device, mem_budget, &set, no_progress)
        }
    }
}

/// Restores the default action of SIGPIPE (terminate quietly), which the Rust runtime replaces
/// with "ignore": without it `moeba inspect … | head` makes `println!` panic on the closed pipe
/// instead of ending like any other Unix tool.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: called first in `main`, before any other thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    default_sigpipe();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
