//! moeba-nn: layers with HuggingFace-style dotted parameter names, and the hybrid model.
//!
//! May depend on moeba-tensor, moeba-kernels and moeba-autograd. Knows nothing of files or configs
//! beyond safetensors payloads.
