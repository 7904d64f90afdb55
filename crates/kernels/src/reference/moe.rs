//! Plain top-k gating, permutation and per-expert GEMM.
