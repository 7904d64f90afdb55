//! Helpers shared by the training tests: tiny configs and temporary run directories.

#![allow(dead_code)]

use std::path::PathBuf;

use moeba_train::RunConfig;

/// A fresh temporary directory for one test (removed first if a previous run left it).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `base` TOML with `key=value` overrides applied, validated.
pub fn config(base: &str, overrides: &[&str]) -> RunConfig {
    let (mut cfg, _) = RunConfig::from_toml(base).expect("base config parses");
    cfg.apply_overrides(overrides).expect("overrides apply");
    cfg.validate().expect("config validates");
    cfg
}

/// A tiny hybrid: Mamba + attention mixers, an MoE feed-forward (4 experts, top-2) on layer 1,
/// byte vocabulary, tiny Shakespeare, seq 16, batch 4.
pub const TINY_HYBRID: &str = r#"
[model]
vocab_size = 256
hidden_size = 32
num_layers = 2
max_seq_len = 32
layer_mixers = ["mamba", "attention"]
num_heads = 2
kv_heads = 2
d_state = 8
expand = 2
intermediate_size = 64
num_experts = 4
experts_per_tok = 2
moe_intermediate_size = 32
moe_layers = [1]

[trainer]
dataset = "tinyshakespeare"
seq_len = 16
batch_size = 4
learning_rate = 1e-2
min_lr = 1e-3
warmup_steps = 3
max_steps = 30
eval_every = 15
eval_steps = 2
log_every = 5
seed = 7
"#;
