//! moeba-tensor: the data types every other moeba crate builds on.
//!
//! [`DType`], [`Shape`], [`Layout`] (strides and views), [`Storage`] (CPU buffers; CUDA buffers
//! behind the `cuda` feature), [`Device`], [`Tensor`] and [`Error`]. No compute lives here beyond
//! moving and converting data: the ops are in `moeba-kernels`.
//!
//! Dependencies: `half`, `bytemuck`, `thiserror` (and `cudarc` with `cuda`). No other moeba crate.
//!
//! ```
//! use moeba_tensor::{DType, Device, Tensor};
//! let t = Tensor::arange(0, 6, DType::F32, &Device::Cpu)?.reshape((2, 3))?;
//! let tt = t.t()?; // a view: no copy
//! assert_eq!(tt.dims(), &[3, 2]);
//! assert_eq!(tt.to_vec::<f32>()?, vec![0., 3., 1., 4., 2., 5.]);
//! # Ok::<(), moeba_tensor::Error>(())
//! ```

mod device;
mod dtype;
mod error;
mod layout;
mod rng;
pub mod safetensors_io;
mod shape;
mod storage;
mod tensor;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layout::{Layout, StridedBlocks, StridedIndex};
pub use rng::Rng;
pub use shape::Shape;
pub use storage::{CpuStorage, Storage};
pub use tensor::{gather, gather_into, Tensor};
