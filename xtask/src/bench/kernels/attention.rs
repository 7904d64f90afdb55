//! RoPE and causal GQA attention (forward, forward+backward), MLA vs GQA decode.
