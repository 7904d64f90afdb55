//! The Mamba-2 SSD scan on [`Var`](crate::Var)s.
