//! Element types: the [`DType`] tag and the [`WithDType`] trait that ties it to Rust types.

use half::{bf16, f16};

/// The element type of a tensor.
///
/// Float types are for data; `I64` and `U32` are for indices (token ids, expert ids, gathers).
/// `F64` exists for reference computations and numerical gradient checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float: the default compute type.
    F32,
    /// 64-bit IEEE float: references, gradient checks, fixtures.
    F64,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// IEEE half precision.
    F16,
    /// 64-bit signed integer (indices).
    I64,
    /// 32-bit unsigned integer (indices).
    U32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Whether this is a floating point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }

    /// Whether this is an integer (index) type.
    pub fn is_int(self) -> bool {
        !self.is_float()
    }

    /// The lowercase name used in safetensors headers and messages (`f32`, `bf16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::U32 => "u32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => DType::F32,
            "f64" | "float64" | "double" => DType::F64,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" | "half" => DType::F16,
            "i64" | "int64" | "long" => DType::I64,
            "u32" | "uint32" => DType::U32,
            _ => {
                return Err(crate::Error::invalid(
                    "DType::from_str",
                    "dtype",
                    format!("unknown dtype `{s}` (expected f32, f64, bf16, f16, i64 or u32)"),
                ))
            }
        })
    }
}

/// A Rust element type that a tensor can hold. Implemented for `f32`, `f64`, `bf16`, `f16`,
/// `i64` and `u32`.
pub trait WithDType: Copy + Send + Sync + std::fmt::Debug + PartialOrd + bytemuck::Pod + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts from f64 (rounding / truncating as `as` does).
    fn from_f64(v: f64) -> Self;
    /// Converts to f64.
    fn to_f64(self) -> f64;
    /// Wraps a vector into CPU storage.
    fn into_cpu_storage(v: Vec<Self>) -> crate::CpuStorage;
    /// Borrows the matching vector out of CPU storage, if the dtype matches.
    fn cpu_slice(s: &crate::CpuStorage) -> Option<&[Self]>;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident, $from:expr, $to:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            #[inline]
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
            #[inline]
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn into_cpu_storage(v: Vec<Self>) -> crate::CpuStorage {
                crate::CpuStorage::$variant(v)
            }
            fn cpu_slice(s: &crate::CpuStorage) -> Option<&[Self]> {
                match s {
                    crate::CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

with_dtype!(f32, F32, |v: f64| v as f32, |v: f32| v as f64);
with_dtype!(f64, F64, |v: f64| v, |v: f64| v);
with_dtype!(bf16, BF16, bf16::from_f64, |v: bf16| v.to_f64());
with_dtype!(f16, F16, f16::from_f64, |v: f16| v.to_f64());
with_dtype!(i64, I64, |v: f64| v as i64, |v: i64| v as f64);
with_dtype!(u32, U32, |v: f64| v as u32, |v: u32| v as f64);
