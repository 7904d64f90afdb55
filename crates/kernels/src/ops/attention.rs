//! Attention ops: RoPE and causal (GQA, sliding-window) attention, forward and backward.
