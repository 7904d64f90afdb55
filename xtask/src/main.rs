//! `cargo xtask`: kernel microbenchmarks and GPU helpers (filled in by the bench work).
fn main() {}
