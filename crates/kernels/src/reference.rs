//! Plain, obviously-correct implementations of the ops, written for clarity over speed. Used by
//! tests (and `cargo xtask bench`'s validation) to check the fast paths; never on a hot path.
