//! `moeba generate`: stream sampled text to stdout, or print token ids (`--prompt-ids`), from a
//! trained checkpoint or a HuggingFace model directory (`--hf`).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use moeba_nn::HybridModel;
use moeba_train::hf::{generate_until, load_hf_model, parse_ids};
use moeba_train::{generate, SampleOptions, Tokenizer};

/// Where the model comes from.
pub enum Source<'a> {
    /// A run or checkpoint directory written by `moeba train`.
    Checkpoint(&'a Path),
    /// A HuggingFace model directory.
    Hf(&'a Path),
}

/// What to continue.
pub enum Prompt<'a> {
    /// Text, encoded with the model's tokenizer.
    Text(&'a str),
    /// Token ids, `1,2,3`.
    Ids(&'a str),
}

fn check_options(opts: &SampleOptions) -> Result<()> {
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        anyhow::bail!("--temperature must be ≥ 0, got {}", opts.temperature);
    }
    if let Some(p) = opts.top_p {
        if !(p > 0.0 && p.is_finite()) {
            anyhow::bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    Ok(())
}

/// Runs `moeba generate`. Text prompts print the prompt, then each piece of text as soon as it
/// decodes; `--prompt-ids` prints one line: the prompt ids followed by the generated ones,
/// comma-separated. With `--hf`, generation stops after an end-of-sequence token of the model
/// (`generation_config.json` / `config.json`) unless `ignore_eos`.
pub fn run(source: Source, prompt: Prompt, opts: &SampleOptions, ignore_eos: bool) -> Result<()> {
    check_options(opts)?;
    match source {
        Source::Checkpoint(checkpoint) => {
            let run = super::load(checkpoint, true)?;
            let what = run.checkpoint.display().to_string();
            match prompt {
                Prompt::Text(text) => stream_text(&run.model, &run.tokenizer, text, opts, &[], &what, true),
                Prompt::Ids(ids) => print_ids(&run.model, ids, opts, &[], &what),
            }
        }
        Source::Hf(dir) => {
            let hf = load_hf_model(dir)
                .with_context(|| format!("cannot load the HuggingFace model {}", dir.display()))?;
            let what = dir.display().to_string();
            let stop: &[u32] = if ignore_eos { &[] } else { &hf.eos_token_ids };
            match prompt {
                Prompt::Text(text) => {
                    let tok = hf.tokenizer.as_ref().ok_or_else(|| {
                        anyhow::anyhow!(
                            "{} has no tokenizer.json, so a text --prompt cannot be encoded \
                             (HINT: pass token ids with --prompt-ids 1,2,3)",
                            dir.display()
                        )
                    })?;
                    stream_text(&hf.model, tok, text, opts, stop, &what, false)
                }
                Prompt::Ids(ids) => print_ids(&hf.model, ids, opts, stop, &what),
            }
        }
    }
}

/// `--prompt-ids`: one line, prompt ids then generated ids, comma-separated.
fn print_ids(model: &HybridModel, ids: &str, opts: &SampleOptions, stop: &[u32], what: &str) -> Result<()> {
    let prompt = parse_ids(ids, "--prompt-ids")?;
    let new = generate_until(model, &prompt, opts, stop, |_| {})
        .with_context(|| format!("generating from {what}"))?;
    let all: Vec<String> = prompt.iter().chain(&new).map(u32::to_string).collect();
    println!("{}", all.join(","));
    Ok(())
}

/// A text prompt: print it, then stream the generated text. `plain` keeps the trained-model
/// behaviour (an empty prompt starts from a newline, no stop tokens).
fn stream_text(
    model: &HybridModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &SampleOptions,
    stop: &[u32],
    what: &str,
    plain: bool,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    let mut io_err = None;
    let mut write = |piece: &str| {
        if io_err.is_none() {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                io_err = Some(e);
            }
        }
    };
    if plain {
        generate(model, tokenizer, prompt, opts, &mut write)
            .with_context(|| format!("generating from {what}"))?;
    } else {
        if prompt.is_empty() {
            anyhow::bail!("--prompt is empty: give some text to continue");
        }
        let ids = tokenizer
            .encode(prompt)
            .with_context(|| format!("encoding --prompt with {}", tokenizer.name()))?;
        let mut decoder = tokenizer.stream_decoder();
        let mut dec_err = None;
        generate_until(model, &ids, opts, stop, |id| {
            if dec_err.is_some() || stop.contains(&id) {
                return;
            }
            match decoder.push(id) {
                Ok(piece) => write(&piece),
                Err(e) => dec_err = Some(e),
            }
        })
        .with_context(|| format!("generating from {what}"))?;
        if let Some(e) = dec_err {
            return Err(e).context("decoding the generated tokens");
        }
        let rest = decoder.finish().context("decoding the generated tokens")?;
        write(&rest);
    }
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out)?;
    Ok(())
}
