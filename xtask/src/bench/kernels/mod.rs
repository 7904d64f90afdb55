//! The benchmarked kernels, one file per op family. To add one, implement
//! [`Kernel`](super::harness::Kernel) in a new file here and list it in [`all`].

use anyhow::Result;
use moeba_tensor::{DType, Device, Tensor};

pub mod attention;
pub mod copy;
pub mod elementwise;
pub mod matmul;
pub mod moe;
pub mod reduce;
pub mod selective_scan;
pub mod softmax;
pub mod ssd;

use super::harness::Kernel;

/// Every kernel, in the order the table lists them.
pub fn all() -> Vec<Box<dyn Kernel>> {
    vec![
        Box::new(matmul::Matmul),
        Box::new(elementwise::Add),
        Box::new(elementwise::Unary::exp()),
        Box::new(elementwise::Unary::silu()),
        Box::new(softmax::Softmax),
        Box::new(reduce::Sum),
        Box::new(copy::Copy),
        Box::new(attention::Attention),
        Box::new(attention::AttentionDecode::default()),
        Box::new(selective_scan::SelectiveScan),
        Box::new(ssd::Ssd),
        Box::new(moe::MoeGating),
        Box::new(moe::GroupedGemm),
        Box::new(moe::MoeLayerBench::new()),
    ]
}

/// Standard normal samples of `dims` (seeded, on the CPU).
pub fn randn(seed: u64, dims: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::randn(seed, dims, 0.0, 1.0, dtype, &Device::Cpu)?)
}

/// Uniform samples in `[lo, hi)` of `dims` (seeded, on the CPU).
pub fn uniform(seed: u64, dims: &[usize], lo: f64, hi: f64, dtype: DType) -> Result<Tensor> {
    Ok(Tensor::rand(seed, dims, lo, hi, dtype, &Device::Cpu)?)
}

/// The tensors copied to `device` (views are made contiguous on the way).
pub fn on_device(xs: &[Tensor], device: &Device) -> Result<Vec<Tensor>> {
    Ok(xs.iter().map(|x| x.to_device(device)).collect::<moeba_tensor::Result<Vec<_>>>()?)
}

/// `(rows, cols)` of a two-dim case.
pub fn rows_cols(kernel: &str, case: &super::harness::Case) -> Result<(usize, usize)> {
    Ok((case.dim(kernel, 0)?, case.dim(kernel, 1)?))
}
