//! `moeba experts`: the expert report and its heatmaps.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use moeba_train::data::Dataset;
use moeba_train::experts::{expert_report, plot_report, render};

/// Runs `moeba experts`.
pub fn run(checkpoint: &Path, data: Option<&str>, tokens: usize, out: Option<PathBuf>) -> Result<()> {
    if tokens == 0 {
        anyhow::bail!("--tokens must be > 0");
    }
    let run = super::load(checkpoint, true)?;
    let t = &run.config.trainer;
    let spec = data.unwrap_or(&t.dataset);
    let ds = Dataset::load(spec, &run.tokenizer, t.val_fraction, t.seed)
        .with_context(|| format!("cannot load the data set {spec}"))?;
    let report = expert_report(&run, &ds, tokens).context("cannot build the expert report")?;
    println!("experts of {} (step {}) on {} validation", run.checkpoint.display(), run.step, ds.name);
    print!("{}", render(&report));
    let dir = out.unwrap_or_else(|| super::run_dir_of(&run.checkpoint));
    let maps = plot_report(&report, &dir)
        .with_context(|| format!("cannot write heatmaps into {}", dir.display()))?;
    println!("wrote {} heatmap(s) (PNG and SVG) into {}", maps.len(), dir.display());
    Ok(())
}
