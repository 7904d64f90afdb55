//! Top-k gating, token permutation and grouped expert GEMM on [`Var`](crate::Var)s.
