//! Causal depthwise conv1d on [`Var`](crate::Var)s.
