//! `moeba eval`: loss, perplexity and bits per byte on held-out data (a trained checkpoint) or
//! on a whole text file (a HuggingFace model directory, `--hf`).

use std::path::Path;

use anyhow::{Context, Result};
use moeba_tensor::Device;
use moeba_train::data::{eval_batches, Dataset};
use moeba_train::evaluate;
use moeba_train::hf::load_hf_model;

/// Runs `moeba eval` on a checkpoint.
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

/// Runs `moeba eval --hf DIR --data FILE`: the whole data set, tokenized with the directory's
/// `tokenizer.json`, in up to `steps` batches of `batch_size` windows of `seq_len` tokens spread
/// evenly over it.
pub fn run_hf(dir: &Path, data: &str, steps: usize, batch_size: usize, seq_len: usize) -> Result<()> {
    if steps == 0 || batch_size == 0 || seq_len == 0 {
        anyhow::bail!("--steps, --batch-size and --seq-len must be > 0");
    }
    let hf =
        load_hf_model(dir).with_context(|| format!("cannot load the HuggingFace model {}", dir.display()))?;
    let tok = hf.tokenizer.as_ref().ok_or_else(|| {
        anyhow::anyhow!("{} has no tokenizer.json, which is needed to tokenize --data {data}", dir.display())
    })?;
    let ds = Dataset::load(data, tok, 0.0, 0).with_context(|| format!("cannot load the data set {data}"))?;
    let vocab = hf.spec.config.vocab_size;
    if let Some(&id) = ds.train.iter().find(|&&id| id as usize >= vocab) {
        anyhow::bail!(
            "{data}: the tokenizer gives id {id}, which is not below the model's vocab_size {vocab}"
        );
    }
    let batches = eval_batches(&ds.train, None, batch_size, seq_len, steps, &Device::Cpu)
        .with_context(|| format!("cannot make evaluation batches from {data}"))?;
    let r = evaluate(&hf.model, &batches, ds.bytes_per_token).context("evaluation failed")?;
    let rows: usize = batches.iter().map(|b| b.ids.dims()[0]).sum();
    println!(
        "eval {} ({}) on {} ({} batches, {} tokens of {})",
        dir.display(),
        hf.spec.family.model_type(),
        ds.name,
        batches.len(),
        rows * seq_len,
        ds.train.len()
    );
    println!("loss {:.4} nats/token  ppl {:.3}  bpb {:.4}", r.loss, r.ppl, r.bpb);
    Ok(())
}
