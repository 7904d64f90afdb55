//! CPU RoPE and memory-efficient (tiled online-softmax) causal attention.
