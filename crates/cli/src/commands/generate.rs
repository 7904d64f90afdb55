//! `moeba generate`: stream sampled text to stdout.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use moeba_train::{generate, SampleOptions};

/// Runs `moeba generate`: prints the prompt, then each piece of text as soon as it decodes.
pub fn run(checkpoint: &Path, prompt: &str, opts: &SampleOptions) -> Result<()> {
    if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
        anyhow::bail!("--temperature must be ≥ 0, got {}", opts.temperature);
    }
    if let Some(p) = opts.top_p {
        if !(p > 0.0 && p.is_finite()) {
            anyhow::bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    let run = super::load(checkpoint, true)?;
    let mut out = std::io::stdout().lock();
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    let mut io_err = None;
    generate(&run.model, &run.tokenizer, prompt, opts, |piece| {
        if io_err.is_none() {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                io_err = Some(e);
            }
        }
    })
    .with_context(|| format!("generating from {}", run.checkpoint.display()))?;
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out)?;
    Ok(())
}
