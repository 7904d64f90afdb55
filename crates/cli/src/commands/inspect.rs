//! `moeba inspect`: layer map, parameter counts, memory (estimated and measured), cache size.

use anyhow::{bail, Context, Result};
use moeba_tensor::Device;
use moeba_train::inspect::{inspect, measure_peaks, render};
use moeba_train::{build_model, RunConfig};

use crate::{alloc, configs};

/// Runs `moeba inspect`.
pub fn run(target: &str, context: Option<usize>, measure: bool, set: &[String]) -> Result<()> {
    let path = std::path::Path::new(target);
    // A directory is a run or a checkpoint; anything else a config file or a shipped name.
    let (source, cfg, model, _store) = if path.is_dir() {
        if let Some(bad) = set.iter().find(|s| !s.trim_start().starts_with("trainer.")) {
            bail!("--set {bad}: a checkpoint's model is fixed; only trainer.* keys can be overridden");
        }
        let run = super::load(path, false)?;
        let mut cfg: RunConfig = run.config.clone();
        for o in set {
            let Some((k, v)) = o.split_once('=') else {
                bail!("--set {o}: expected key=value, e.g. --set trainer.batch_size=4");
            };
            cfg.set(k.trim(), v.trim()).with_context(|| format!("--set {o}"))?;
        }
        cfg.validate().context("invalid config after --set overrides")?;
        (format!("checkpoint {} (step {})", run.checkpoint.display(), run.step), cfg, run.model, run.store)
    } else {
        let loaded = configs::load(Some(target), set)?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        let cfg = loaded.config;
        let hc = cfg.model.to_hybrid(&cfg.trainer).context("cannot build the model")?;
        let (store, model) =
            build_model(&hc, cfg.trainer.seed, &Device::Cpu).context("cannot build the model")?;
        (loaded.source, cfg, model, store)
    };
    let context = context.unwrap_or(cfg.model.max_seq_len);
    let mut ins = inspect(&cfg, &model, context).context("cannot inspect the model")?;
    if measure {
        alloc::enable();
        ins.measured_peak_bytes = measure_peaks(&cfg, &model, &alloc::reset_peak, &alloc::peak_bytes)
            .context("measuring the training step failed")?;
    }
    println!("{source}");
    println!(
        "training shape: batch {} × seq_len {} (trainer.batch_size, trainer.seq_len)",
        cfg.trainer.batch_size, cfg.trainer.seq_len
    );
    print!("{}", render(&ins));
    Ok(())
}
