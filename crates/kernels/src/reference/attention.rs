//! Plain RoPE and materialised causal attention.
