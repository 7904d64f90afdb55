//! Plain, obviously-correct implementations of the ops, written for clarity over speed, in f64
//! over logical indices. Tests (and `cargo xtask bench`'s validation step) check the fast paths
//! against them; they are never on a hot path.

pub mod elementwise;
pub mod index;
pub mod matmul;
pub mod reduce;
