//! [`Storage`]: the flat buffer behind a tensor, on the CPU or (with `cuda`) on a GPU.

use crate::{DType, WithDType};
use half::{bf16, f16};

/// A flat, typed, host-memory buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f64 elements.
    F64(Vec<f64>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
    /// i64 elements.
    I64(Vec<i64>),
    /// u32 elements.
    U32(Vec<u32>),
}

/// Calls `$body` with `$v` bound to the inner `Vec<T>` of a [`CpuStorage`], whatever `T` is.
#[macro_export]
macro_rules! map_cpu_storage {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            $crate::CpuStorage::F32($v) => $body,
            $crate::CpuStorage::F64($v) => $body,
            $crate::CpuStorage::BF16($v) => $body,
            $crate::CpuStorage::F16($v) => $body,
            $crate::CpuStorage::I64($v) => $body,
            $crate::CpuStorage::U32($v) => $body,
        }
    };
}

impl CpuStorage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        map_cpu_storage!(self, v => v.len())
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as a typed slice, if `T` matches the dtype.
    pub fn as_slice<T: WithDType>(&self) -> Option<&[T]> {
        T::cpu_slice(self)
    }

    /// The raw bytes (little-endian on every supported target).
    pub fn as_bytes(&self) -> &[u8] {
        map_cpu_storage!(self, v => bytemuck::cast_slice(v.as_slice()))
    }

    /// `len` elements of `dtype`, all equal to `value` (converted with `as`-like rounding).
    pub fn full(value: f64, len: usize, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![value as f32; len]),
            DType::F64 => CpuStorage::F64(vec![value; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(value); len]),
            DType::F16 => CpuStorage::F16(vec![f16::from_f64(value); len]),
            DType::I64 => CpuStorage::I64(vec![value as i64; len]),
            DType::U32 => CpuStorage::U32(vec![value as u32; len]),
        }
    }

    /// Converts every element to `dtype` (through f64 for the odd pairs, exactly where possible).
    pub fn to_dtype(&self, dtype: DType) -> CpuStorage {
        fn conv<S: WithDType, D: WithDType>(v: &[S]) -> Vec<D> {
            v.iter().map(|&x| D::from_f64(x.to_f64())).collect()
        }
        if self.dtype() == dtype {
            return self.clone();
        }
        // Fast paths for the conversions training uses.
        match (self, dtype) {
            (CpuStorage::BF16(v), DType::F32) => {
                return CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect())
            }
            (CpuStorage::F16(v), DType::F32) => {
                return CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect())
            }
            (CpuStorage::F32(v), DType::BF16) => {
                return CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (CpuStorage::F32(v), DType::F16) => {
                return CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            _ => {}
        }
        map_cpu_storage!(self, v => match dtype {
            DType::F32 => CpuStorage::F32(conv(v)),
            DType::F64 => CpuStorage::F64(conv(v)),
            DType::BF16 => CpuStorage::BF16(conv(v)),
            DType::F16 => CpuStorage::F16(conv(v)),
            DType::I64 => CpuStorage::I64(conv(v)),
            DType::U32 => CpuStorage::U32(conv(v)),
        })
    }
}

/// A tensor's buffer: host memory, or device memory with the `cuda` feature.
#[derive(Debug)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// GPU memory.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

impl Storage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The host storage, if this is on the CPU.
    pub fn as_cpu(&self) -> Option<&CpuStorage> {
        match self {
            Storage::Cpu(s) => Some(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }
}
