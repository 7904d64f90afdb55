//! The GQA attention layer with RoPE, and its KV cache.
