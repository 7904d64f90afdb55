//! moeba-kernels: every op, on the CPU and (with the `cuda` feature) on NVIDIA GPUs.
//!
//! [`ops`] holds one dispatching function per op: it validates the arguments and runs
//! [`cpu`] (rayon, the `gemm` crate, SIMD chosen at run time) or `cuda` (hand-written kernels
//! from ../../kernels/*.cu and cuBLAS) depending on the inputs' device. [`reference`] holds plain,
//! obviously-correct versions of the ops that the fast ones are tested against.
//!
//! May depend on moeba-tensor only (and moeba-build at build time).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ops;
pub mod reference;

pub use ops::{BinaryOp, ReduceOp, UnaryOp};
