//! Plain, obviously-correct implementations of the ops, written for clarity over speed, in f64
//! over logical indices. Tests (and `cargo xtask bench`'s validation step) check the fast paths
//! against them; they are never on a hot path.

pub mod attention;
pub mod conv1d;
pub mod elementwise;
pub mod index;
pub mod matmul;
pub mod moe;
pub mod reduce;
pub mod selective_scan;
pub mod ssd;

/// Row-major multi-index of flat index `i` in `dims`.
fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        idx[d] = i % dims[d];
        i /= dims[d];
    }
    idx
}

/// Flat row-major index of multi-index `idx` in `dims`.
fn ravel(idx: &[usize], dims: &[usize]) -> usize {
    idx.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
}
