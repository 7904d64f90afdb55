//! One module per subcommand; each `run` prints to stdout and returns errors with context.

pub mod eval;
pub mod experts;
pub mod generate;
pub mod inspect;
pub mod lab;
pub mod logits;
pub mod train;
pub mod train_hf;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use moeba_train::LoadedRun;

/// Loads a run or checkpoint directory (the best checkpoint of a run when `prefer_best`).
pub fn load(path: &Path, prefer_best: bool) -> Result<LoadedRun> {
    if !path.exists() {
        anyhow::bail!(
            "{}: no such run or checkpoint directory (HINT: train one with `moeba train --out {}`)",
            path.display(),
            path.display()
        );
    }
    moeba_train::load_run(path, prefer_best)
        .with_context(|| format!("cannot load a model from {}", path.display()))
}

/// The run directory a checkpoint belongs to: `<run>` for `<run>/checkpoints/<name>`, else the
/// checkpoint directory itself.
pub fn run_dir_of(checkpoint: &Path) -> PathBuf {
    let parent = checkpoint.parent();
    match parent {
        Some(p) if p.file_name().is_some_and(|n| n == "checkpoints") => {
            p.parent().map(Path::to_path_buf).unwrap_or_else(|| checkpoint.to_path_buf())
        }
        _ => checkpoint.to_path_buf(),
    }
}
