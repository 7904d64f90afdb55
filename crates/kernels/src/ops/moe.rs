//! Mixture-of-Experts ops: top-k gating, token permutation, grouped expert GEMM.
