//! `moeba inspect`: layer map, parameter counts, memory (estimated and measured), cache size; for
//! a HuggingFace model directory also the config mapping and the tensors read.

use std::path::Path;

use anyhow::{bail, Context, Result};
use moeba_tensor::Device;
use moeba_train::hf::{load_hf_model, CONFIG_JSON, INDEX_FILE, WEIGHTS_FILE};
use moeba_train::inspect::{inspect, measure_peaks, render};
use moeba_train::{build_model, RunConfig};

use crate::{alloc, configs};

/// The decoding-cache context of a HuggingFace model when `--context` is not given.
pub const HF_DEFAULT_CONTEXT: usize = 2048;

/// Whether `path` looks like a HuggingFace model directory (a `config.json`, `model.safetensors`
/// or `model.safetensors.index.json`, and neither a checkpoint's `state.json` nor a run's
/// `checkpoints/`).
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir()
        && [CONFIG_JSON, WEIGHTS_FILE, INDEX_FILE].iter().any(|f| path.join(f).is_file())
        && !path.join("state.json").exists()
        && !path.join("checkpoints").exists()
}

/// Runs `moeba inspect`.
pub fn run(target: &str, context: Option<usize>, measure: bool, set: &[String]) -> Result<()> {
    let path = Path::new(target);
    if is_hf_dir(path) {
        return run_hf(path, context, measure, set);
    }
    // A directory is a run or a checkpoint; anything else a config file or a shipped name.
    let (source, cfg, model, _store) = if path.is_dir() {
        if let Some(bad) = set.iter().find(|s| !s.trim_start().starts_with("trainer.")) {
            bail!("--set {bad}: a checkpoint's model is fixed; only trainer.* keys can be overridden");
        }
        let run = super::load(path, false)?;
        let mut cfg: RunConfig = run.config.clone();
        apply_trainer_overrides(&mut cfg, set)?;
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

fn apply_trainer_overrides(cfg: &mut RunConfig, set: &[String]) -> Result<()> {
    for o in set {
        let Some((k, v)) = o.split_once('=') else {
            bail!("--set {o}: expected key=value, e.g. --set trainer.batch_size=4");
        };
        cfg.set(k.trim(), v.trim()).with_context(|| format!("--set {o}"))?;
    }
    Ok(())
}

/// `moeba inspect DIR` of a HuggingFace model directory: the family, the config mapping, the
/// layer map with parameter counts and memory, and every tensor read (shape, stored dtype).
fn run_hf(dir: &Path, context: Option<usize>, measure: bool, set: &[String]) -> Result<()> {
    if let Some(bad) = set.iter().find(|s| !s.trim_start().starts_with("trainer.")) {
        bail!("--set {bad}: a HuggingFace model is fixed by its config.json; only trainer.* keys can be overridden");
    }
    let hf =
        load_hf_model(dir).with_context(|| format!("cannot load the HuggingFace model {}", dir.display()))?;
    let mut cfg = RunConfig::default();
    apply_trainer_overrides(&mut cfg, set)?;
    let context = context.unwrap_or(HF_DEFAULT_CONTEXT);
    let mut ins = inspect(&cfg, &hf.model, context).context("cannot inspect the model")?;
    if measure {
        alloc::enable();
        ins.measured_peak_bytes = measure_peaks(&cfg, &hf.model, &alloc::reset_peak, &alloc::peak_bytes)
            .context("measuring the training step failed")?;
    }
    let arch = serde_json_architectures(&hf.config_text);
    println!("HuggingFace model {} (family {}{arch})", dir.display(), hf.spec.family.model_type());
    println!("config mapping (config.json → moeba):");
    for line in &hf.spec.mapping {
        println!("  {line}");
    }
    if let Some(b) = hf.spec.bos_token_id {
        println!("bos_token_id: {b}");
    }
    if !hf.eos_token_ids.is_empty() {
        let eos: Vec<String> = hf.eos_token_ids.iter().map(u32::to_string).collect();
        println!("eos_token_id: {}", eos.join(", "));
    }
    match &hf.tokenizer {
        Some(t) => println!("tokenizer: {}", t.name()),
        None => println!("tokenizer: none (no tokenizer.json; use token ids)"),
    }
    println!(
        "training shape: batch {} × seq_len {} (trainer.batch_size, trainer.seq_len)",
        cfg.trainer.batch_size, cfg.trainer.seq_len
    );
    print!("{}", render(&ins));
    let files: Vec<String> = hf.files.iter().map(|p| p.display().to_string()).collect();
    println!(
        "tensors read: {} of {} in {} ({} moeba parameters set)",
        hf.report.tensors_read - hf.report.skipped.len(),
        hf.tensors.len(),
        files.join(", "),
        hf.report.params_set
    );
    let skipped: std::collections::HashMap<&str, &str> =
        hf.report.skipped.iter().map(|(n, w)| (n.as_str(), w.as_str())).collect();
    let w = hf.tensors.keys().map(|n| n.chars().count()).max().unwrap_or(0);
    for (name, (shape, dtype)) in &hf.tensors {
        let note = skipped.get(name.as_str()).map(|why| format!("  skipped: {why}")).unwrap_or_default();
        println!("  {name:<w$}  {dtype:<4}  {shape:?}{note}");
    }
    Ok(())
}

/// `, MixtralForCausalLM` from config.json's `architectures`, or nothing.
fn serde_json_architectures(config_text: &str) -> String {
    // A light scan (the CLI has no JSON dependency): the first quoted name after "architectures".
    let Some(at) = config_text.find("\"architectures\"") else { return String::new() };
    let rest = &config_text[at + "\"architectures\"".len()..];
    let Some(open) = rest.find('[') else { return String::new() };
    let Some(close) = rest.find(']') else { return String::new() };
    if close < open {
        return String::new();
    }
    let names: Vec<&str> = rest[open + 1..close]
        .split(',')
        .map(|s| s.trim().trim_matches('"'))
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(", {}", names.join(", "))
    }
}
