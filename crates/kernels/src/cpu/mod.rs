//! CPU implementations of the ops. Called through [`crate::ops`], which has already checked
//! dtypes, devices, dims and broadcast compatibility.

pub mod attention;
pub mod binary;
pub mod concat;
pub mod conv1d;
pub mod copy;
pub mod gating;
pub mod grouped_gemm;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod par;
pub mod permute;
pub mod reduce;
pub mod selective_scan;
pub mod simd;
pub mod softmax;
pub mod ssd;
pub mod unary;
