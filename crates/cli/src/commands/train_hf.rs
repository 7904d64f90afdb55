//! `moeba train --hf DIR`: a fine-tuning run of a HuggingFace model.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::configs::Loaded;

/// Makes the loaded run config a fine-tuning run of the HuggingFace model in `dir` (see
/// `moeba_train::hf::configure_run`): the `[model]` table becomes the directory's config.json,
/// the weights start from its safetensors and the data is tokenized with its tokenizer.json
/// (unless `--set trainer.tokenizer=…` was given); the aux-loss weights default to the HF
/// model's, and `--set trainer.*` keys are applied again after. `--set model.*` keys other than
/// `model.max_seq_len` are refused: the model is fixed by config.json.
pub fn configure(loaded: &mut Loaded, dir: &Path, set: &[String]) -> Result<()> {
    let key = |s: &str| s.split_once('=').map(|(k, _)| k.trim().to_string()).unwrap_or_default();
    if let Some(bad) = set.iter().find(|s| key(s).starts_with("model.") && key(s) != "model.max_seq_len") {
        bail!("--set {bad}: with --hf the model is fixed by {}/config.json", dir.display());
    }
    let keep_tokenizer = set.iter().any(|s| key(s) == "trainer.tokenizer");
    let spec = moeba_train::hf::configure_run(&mut loaded.config, dir, keep_tokenizer)
        .with_context(|| format!("cannot fine-tune the HuggingFace model {}", dir.display()))?;
    // The HF model set the aux-loss weights; explicit trainer overrides still win.
    for o in set.iter().filter(|s| key(s).starts_with("trainer.")) {
        if let Some((k, v)) = o.split_once('=') {
            loaded.config.set(k.trim(), v.trim()).with_context(|| format!("--set {o}"))?;
        }
    }
    loaded.warnings = loaded.config.validate().context("invalid config for fine-tuning")?;
    loaded.source = format!("{} fine-tuning {} ({})", loaded.source, dir.display(), spec.family.model_type());
    Ok(())
}
