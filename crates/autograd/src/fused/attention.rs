//! RoPE and causal attention on [`Var`](crate::Var)s.
