//! moeba-nn: layers with HuggingFace-style dotted parameter names, and (as the project grows)
//! the Mamba, attention and MoE mixers and the hybrid model.
//!
//! Parameters live in a [`ParamStore`]; layers are built from a [`ParamPath`] into it, so a layer
//! built under `model.layers.0.mlp` owns `model.layers.0.mlp.gate_proj.weight` and so on, the
//! names HF checkpoints use. Forward passes take and return [`moeba_autograd::Var`]s.
//!
//! May depend on moeba-tensor, moeba-kernels and moeba-autograd. Knows nothing of files or
//! configs: it reads and writes safetensors payloads as bytes.

pub mod attention;
mod embedding;
pub mod hf;
pub mod hybrid;
pub mod kv_cache;
mod linear;
pub mod mamba;
pub mod mamba2;
pub mod mla;
mod mlp;
pub mod moe;
mod norm;
mod params;
mod window_lm;

pub use attention::{Attention, AttentionConfig, KvCache, RopeConfig};
pub use embedding::Embedding;
pub use hybrid::{
    BlockConfig, FfnConfig, ForwardOptions, HybridCache, HybridConfig, HybridModel, HybridOutput, LayerCache,
    MixerConfig, ParamCounts, Recompute,
};
pub use linear::Linear;
pub use mlp::SwiGluMlp;
/// Reading and writing safetensors payloads (re-exported from moeba-tensor).
pub use moeba_tensor::safetensors_io;
pub use norm::{rms_norm, rms_norm_composite, RmsNorm};
pub use params::{Init, Param, ParamPath, ParamStore};
pub use window_lm::{WindowLm, WindowLmConfig};
