//! Every shipped config (configs/*.toml) parses, validates and trains 3 steps at a shrunken size
//! with a finite loss; `--set`-style overrides name bad keys; bad configs and broken checkpoints
//! are refused with errors that name what is wrong.

mod common;

use std::path::PathBuf;

use common::{config, tmpdir, TINY_HYBRID};
use moeba_train::config::{FfnKind, MixerKind};
use moeba_train::{load_run, train, RunConfig, TrainOptions, DEFAULT_CONFIG};

fn shipped() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (p.file_stem().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

const SHRINK: &[&str] = &[
    "model.hidden_size=32",
    "model.max_seq_len=32",
    "model.intermediate_size=64",
    "trainer.seq_len=16",
    "trainer.batch_size=2",
    "trainer.max_steps=3",
    "trainer.warmup_steps=1",
    "trainer.eval_every=3",
    "trainer.eval_steps=1",
    "trainer.log_every=1",
];

#[test]
fn every_shipped_config_parses_validates_and_trains() {
    let configs = shipped();
    let names: Vec<&str> = configs.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "tiny-hybrid",
        "mamba-only",
        "transformer-only",
        "moe-transformer",
        "jamba-like",
        "mla-moe",
        "mamba2-hybrid",
    ] {
        assert!(names.contains(&want), "configs/{want}.toml is missing: {names:?}");
    }
    for (name, text) in &configs {
        assert!(text.trim_start().starts_with('#'), "{name}: starts with a header comment");
        let (full, warnings) = RunConfig::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        full.model.to_hybrid(&full.trainer).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cfg = config(text, SHRINK);
        let dir = tmpdir(&format!("cfg-{name}"));
        let opts = TrainOptions { out: dir.clone(), resume: false, progress: false };
        let mut logs = Vec::new();
        let s = train(&cfg, &opts, |l| logs.push(l.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.steps, 3, "{name}");
        assert_eq!(logs.len(), 3, "{name}");
        assert!(logs.iter().all(|l| l.loss.is_finite() && l.grad_norm.is_finite()), "{name}: {logs:?}");
        let ev = s.final_eval.unwrap();
        assert!(ev.loss.is_finite() && ev.loss > 0.0, "{name}: {ev:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn the_default_config_is_the_tiny_hybrid() {
    let (cfg, warnings) = RunConfig::from_toml(DEFAULT_CONFIG).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let plan = cfg.model.layers().unwrap();
    assert!(plan.iter().any(|l| l.mixer == MixerKind::Mamba));
    assert!(plan.iter().any(|l| l.mixer == MixerKind::Attention));
    assert!(plan.iter().any(|l| l.ffn == FfnKind::Moe));
    assert_eq!(cfg.model.vocab_size, 256);
    assert_eq!(cfg.trainer.dataset, "tinyshakespeare");
    assert_eq!(cfg.trainer.tokenizer, "byte");
    assert!(cfg.trainer.max_seconds.is_some());
}

#[test]
fn overrides_set_dotted_keys_and_name_bad_ones() {
    let (mut cfg, _) = RunConfig::from_toml(TINY_HYBRID).unwrap();
    cfg.apply_overrides(&[
        "trainer.max_steps=100",
        "trainer.learning_rate=1",
        "trainer.dataset=arithmetic",
        "trainer.recompute=block",
        "trainer.max_seconds=60",
        "model.routing.jitter_noise=0.05",
        "model.mamba_layers=[0]",
        "model.tie_embeddings=false",
        "trainer.betas=[0.8, 0.99]",
    ])
    .unwrap();
    let t = &cfg.trainer;
    assert_eq!(t.max_steps, 100);
    assert_eq!(t.learning_rate, 1.0);
    assert_eq!(t.dataset, "arithmetic");
    assert_eq!(t.recompute, moeba_train::RecomputeLevel::Block);
    assert_eq!(t.max_seconds, Some(60.0));
    assert_eq!(t.betas, [0.8, 0.99]);
    assert_eq!(cfg.model.routing.jitter_noise, 0.05);
    assert_eq!(cfg.model.mamba_layers, Some(vec![0]));
    assert!(!cfg.model.tie_embeddings);

    let before = cfg.clone();
    for (o, key) in [
        ("trainer.max_stepz=3", "trainer.max_stepz"),
        ("modle.hidden_size=3", "modle.hidden_size"),
        ("model.hidden_size=abc", "model.hidden_size"),
        ("trainer.recompute=sometimes", "trainer.recompute"),
        ("model.hidden_size.x=1", "model.hidden_size.x"),
    ] {
        let e = cfg.apply_overrides(&[o]).unwrap_err().to_string();
        assert!(e.contains(key), "{o}: {e}");
    }
    let e = cfg.apply_overrides(&["trainer.max_steps"]).unwrap_err().to_string();
    assert!(e.contains("key=value"), "{e}");
    assert_eq!(cfg, before, "a failed override changes nothing");
}

#[test]
fn bad_configs_name_the_key() {
    let bad = |text: &str, key: &str| {
        let e = RunConfig::from_toml(text).unwrap_err().to_string();
        assert!(e.contains(key), "expected `{key}` in: {e}");
    };
    bad("[trainer]\nval_fraction = 1.5", "trainer.val_fraction");
    bad("[trainer]\nkeep_last = 0", "trainer.keep_last");
    bad("[trainer]\nlog_every = 0", "trainer.log_every");
    bad("[trainer]\nmax_seconds = -1.0", "trainer.max_seconds");
    bad("[trainer]\nrecompute = \"all\"", "all");
    bad("[trainer]\ntokenizer = \"\"", "trainer.tokenizer");
    bad("[model]\nvocab_size = 100", "model.vocab_size");
    bad("[trainer]\nvocab = 3", "vocab");
    // A tokenizer file that does not exist is named when the run starts.
    let mut cfg = config(TINY_HYBRID, &["trainer.max_steps=1", "trainer.eval_every=1"]);
    cfg.set("trainer.tokenizer", "/nonexistent/tokenizer.json").unwrap();
    let dir = tmpdir("cfg-badtok");
    let e = train(&cfg, &TrainOptions { out: dir.clone(), resume: false, progress: false }, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
    // A dataset too short for the sequence length names seq_len.
    let tiny = dir.join("tiny.txt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&tiny, "to be or not to be").unwrap();
    let mut cfg = config(TINY_HYBRID, &["trainer.max_steps=1", "trainer.eval_every=1"]);
    cfg.set("trainer.dataset", tiny.to_str().unwrap()).unwrap();
    let e = train(&cfg, &TrainOptions { out: dir.join("run"), resume: false, progress: false }, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("seq_len"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_checkpoints_are_refused_naming_the_file() {
    let cfg = config(TINY_HYBRID, &["trainer.max_steps=2", "trainer.eval_every=2"]);
    let dir = tmpdir("cfg-broken");
    let s = train(&cfg, &TrainOptions { out: dir.clone(), resume: false, progress: false }, |_| {}).unwrap();
    load_run(&s.checkpoint, false).unwrap();
    // Truncated weights.
    let weights = s.checkpoint.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_run(&dir, false).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&weights, &bytes).unwrap();
    load_run(&dir, false).unwrap();
    // A config edited after the fact no longer matches the manifest.
    let config_file = s.checkpoint.join("config.toml");
    let text = std::fs::read_to_string(&config_file).unwrap();
    std::fs::write(&config_file, text.replace("hidden_size = 32", "hidden_size = 48")).unwrap();
    let e = load_run(&s.checkpoint, false).unwrap_err().to_string();
    assert!(e.contains("config.toml"), "{e}");
    // Nothing there at all.
    let e = load_run(&dir.join("nope"), false).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
