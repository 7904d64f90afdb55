//! `moeba logits`: the full no-cache logits of token ids, written to a safetensors file for
//! comparison with other implementations.

use std::path::Path;

use anyhow::{Context, Result};
use moeba_train::hf::{load_hf_model, logits_of, parse_id_rows, write_safetensors};

/// Runs `moeba logits`: `ids` are rows `1,2,3;4,5,6` of equal length; writes `logits`
/// `(batch, seq, vocab)` f32 into `out`. The model is the HuggingFace directory `hf`, or the
/// run / checkpoint directory `checkpoint`.
pub fn run(hf: Option<&Path>, checkpoint: Option<&Path>, ids: &str, out: &Path) -> Result<()> {
    let rows = parse_id_rows(ids, "--ids")?;
    let (model, what) = match (hf, checkpoint) {
        (Some(dir), _) => {
            let m = load_hf_model(dir)
                .with_context(|| format!("cannot load the HuggingFace model {}", dir.display()))?;
            (m.model, dir.display().to_string())
        }
        (None, Some(ck)) => {
            let run = super::load(ck, true)?;
            (run.model, run.checkpoint.display().to_string())
        }
        (None, None) => anyhow::bail!("give the model with --hf DIR or --checkpoint DIR"),
    };
    let logits = logits_of(&model, &rows).with_context(|| format!("running {what}"))?;
    let dims = logits.dims().to_vec();
    write_safetensors(out, vec![("logits".to_string(), logits)])?;
    println!("wrote logits {dims:?} (f32) of {what} to {}", out.display());
    Ok(())
}
