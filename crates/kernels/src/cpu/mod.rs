//! CPU implementations of the ops. Called through [`crate::ops`], which has already checked
//! dtypes, devices, dims and broadcast compatibility.

pub mod binary;
pub mod concat;
pub mod copy;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod par;
pub mod reduce;
pub mod simd;
pub mod softmax;
pub mod unary;
