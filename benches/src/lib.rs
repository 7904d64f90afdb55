//! moeba-benches: criterion benchmarks of moeba's kernels (`benches/*.rs`: matmul, softmax,
//! elementwise chains), plus the small helpers they share. Run them with
//! `cargo bench -p moeba-benches [--bench NAME]`.
//!
//! Criterion measures one call at a time with statistics across runs; the roofline view (time as
//! a fraction of the machine's FMA peak and copy bandwidth, every variant validated first) is
//! `cargo xtask bench`.
//!
//! Sits on top of the workspace: may depend on every moeba crate, nothing depends on it.

use moeba_tensor::{DType, Device, Result, Tensor};

/// A CPU f32 tensor of `dims` with standard normal entries drawn from `seed`.
pub fn randn(seed: u64, dims: &[usize]) -> Result<Tensor> {
    Tensor::randn(seed, dims, 0.0, 1.0, DType::F32, &Device::Cpu)
}

/// Floating-point operations of an `(m, k) @ (k, n)` matrix product (an FMA counts 2).
pub fn matmul_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * (m * k * n) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() -> Result<()> {
        let x = randn(1, &[2, 3])?;
        assert_eq!((x.dims(), x.dtype()), (&[2usize, 3][..], DType::F32));
        assert_eq!(x.to_vec::<f32>()?, randn(1, &[2, 3])?.to_vec::<f32>()?);
        assert_eq!(matmul_flops(2, 3, 4), 48);
        Ok(())
    }
}
