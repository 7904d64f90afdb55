//! Top-k gating, grouped expert GEMM against a dense GEMM of equal FLOPs, the MoE layer.
