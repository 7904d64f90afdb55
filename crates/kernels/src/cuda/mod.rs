//! CUDA launchers for the ops (the `cuda` feature): one function per op of [`crate::ops`], with
//! the same signature as its CPU twin in [`crate::cpu`].
//!
//! The kernels are `kernels/*.cu` at the repository root, compiled by moeba-build (build.rs) into
//! one fatbin that is embedded in this crate ([`runtime::FATBIN`]) and loaded once per device.
//! Their parameter structs come from `kernels/include/moeba_params.h` through bindgen
//! ([`ffi`]). Matmul goes to cuBLAS.
//!
//! On CUDA now: unary ops and their backward, affine, powf, clamp, binary ops with broadcasting,
//! reductions (sum/mean/max/min over any dims), argmax, softmax, log-softmax, matmul (batched,
//! strided, broadcast), contiguous (strided copy), to_dtype (every pair of dtypes), concat and
//! where_cond (hence masked_fill). Not yet (they return [`moeba_tensor::Error::Unsupported`]):
//! index_select (hence embedding), gather, scatter_add, cross_entropy and its backward.
//!
//! Outputs are fresh contiguous buffers; in debug builds (or with `MOEBA_CUDA_POISON=1`) they are
//! filled with NaN bytes before the kernel runs, so an element a kernel misses shows in tests.

mod copy;
mod elementwise;
pub mod ffi;
mod matmul;
mod reduce;
pub mod runtime;
mod softmax;
mod unsupported;
mod where_cond;

pub use copy::{concat, contiguous, to_dtype};
pub use elementwise::{affine, binary, clamp, powf, unary, unary_backward};
pub use matmul::{gemm_layout, matmul};
pub use reduce::{argmax, reduce};
pub use softmax::{log_softmax, softmax};
pub use unsupported::{cross_entropy, cross_entropy_backward, gather, index_select, scatter_add};
pub use where_cond::where_cond;
