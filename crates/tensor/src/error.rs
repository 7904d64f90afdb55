//! The error type shared by every moeba crate below `train`.

use crate::{DType, Shape};

/// Everything that can go wrong in a tensor operation. Every variant names the op.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that had to agree (or broadcast) did not.
    #[error("{op}: shape mismatch, lhs {lhs} vs rhs {rhs}")]
    ShapeMismatch {
        /// The operation that failed.
        op: &'static str,
        /// The first operand's shape.
        lhs: Shape,
        /// The second operand's shape.
        rhs: Shape,
    },
    /// A shape was not what the op expects (wrong rank, wrong size along a dim, ...).
    #[error("{op}: bad shape {shape}: {msg}")]
    BadShape {
        /// The operation that failed.
        op: &'static str,
        /// The offending shape.
        shape: Shape,
        /// What was expected.
        msg: String,
    },
    /// Two operands had different dtypes.
    #[error("{op}: dtype mismatch, lhs {lhs:?} vs rhs {rhs:?}")]
    DTypeMismatch {
        /// The operation that failed.
        op: &'static str,
        /// The first operand's dtype.
        lhs: DType,
        /// The second operand's dtype.
        rhs: DType,
    },
    /// The op does not support this dtype.
    #[error("{op}: unsupported dtype {dtype:?}{hint}")]
    UnsupportedDType {
        /// The operation that failed.
        op: &'static str,
        /// The dtype it was given.
        dtype: DType,
        /// Extra guidance, empty or starting with "; ".
        hint: String,
    },
    /// Operands live on different devices.
    #[error("{op}: device mismatch, lhs on {lhs} vs rhs on {rhs}")]
    DeviceMismatch {
        /// The operation that failed.
        op: &'static str,
        /// The first operand's device.
        lhs: String,
        /// The second operand's device.
        rhs: String,
    },
    /// A dimension index was out of range for the tensor's rank.
    #[error("{op}: dim {dim} out of range for rank {rank}")]
    DimOutOfRange {
        /// The operation that failed.
        op: &'static str,
        /// The requested dimension.
        dim: usize,
        /// The tensor's rank.
        rank: usize,
    },
    /// An argument had an invalid value.
    #[error("{op}: invalid argument `{arg}`: {msg}")]
    InvalidArgument {
        /// The operation that failed.
        op: &'static str,
        /// The argument's name.
        arg: &'static str,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// The operation is not available on this device/dtype/build.
    #[error("{op}: not supported: {msg}")]
    Unsupported {
        /// The operation that failed.
        op: &'static str,
        /// Why, and what to do instead.
        msg: String,
    },
    /// An error from the CUDA driver, cuBLAS or a kernel launch.
    #[error("cuda: {0}")]
    Cuda(String),
    /// An I/O error (reading fixtures, checkpoints, ...).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else, with its message.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, arg: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { op, arg, msg: msg.into() }
    }

    /// Shorthand for [`Error::BadShape`].
    pub fn bad_shape(op: &'static str, shape: &Shape, msg: impl Into<String>) -> Self {
        Error::BadShape { op, shape: shape.clone(), msg: msg.into() }
    }

    /// Shorthand for [`Error::UnsupportedDType`] without a hint.
    pub fn dtype(op: &'static str, dtype: DType) -> Self {
        Error::UnsupportedDType { op, dtype, hint: String::new() }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with an [`Error::Msg`] built from a format string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Msg(format!($($arg)*)))
    };
}
