//! `moeba eval`: loss, perplexity and bits per byte on held-out data.

use std::path::Path;

use anyhow::{Context, Result};
use moeba_tensor::Device;
use moeba_train::data::{eval_batches, Dataset};
use moeba_train::evaluate;

/// Runs `moeba eval`.
pub fn run(checkpoint: &Path, data: Option<&str>, steps: Option<usize>) -> Result<()> {
    let run = super::load(checkpoint, true)?;
    let t = &run.config.trainer;
    let spec = data.unwrap_or(&t.dataset);
    let steps = steps.unwrap_or(t.eval_steps);
    if steps == 0 {
        anyhow::bail!("--steps must be > 0");
    }
    let ds = Dataset::load(spec, &run.tokenizer, t.val_fraction, t.seed)
        .with_context(|| format!("cannot load the data set {spec}"))?;
    let batches =
        eval_batches(&ds.val, ds.val_tasks.as_deref(), t.batch_size, t.seq_len, steps, &Device::Cpu)
            .with_context(|| format!("cannot make evaluation batches from {spec}"))?;
    let r = evaluate(&run.model, &batches, ds.bytes_per_token).context("evaluation failed")?;
    let tokens = batches.len() * t.batch_size * t.seq_len;
    println!(
        "eval {} (step {}) on {} validation ({} batches, {} tokens)",
        run.checkpoint.display(),
        run.step,
        ds.name,
        batches.len(),
        tokens
    );
    println!("loss {:.4} nats/token  ppl {:.3}  bpb {:.4}", r.loss, r.ppl, r.bpb);
    Ok(())
}
