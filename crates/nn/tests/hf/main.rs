//! HF checkpoints against the transformers-made fixtures in ../shared/fixtures/hf: logits,
//! per-layer outputs, losses, caches and greedy generation, one module per family, plus the
//! loader's errors on malformed checkpoints.

mod common;

mod deepseek_v2;
mod jamba;
mod mamba;
mod mamba2;
mod mixtral;
mod qwen2_moe;
