//! The selective scan on [`Var`](crate::Var)s.
