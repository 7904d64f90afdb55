//! The ops that have no CUDA kernel yet. Each returns [`Error::Unsupported`] naming the op and
//! saying how to get the result meanwhile (on the CPU), rather than silently copying to the host.

use moeba_tensor::{Error, Result, Tensor};

fn not_yet(op: &'static str) -> Error {
    Error::Unsupported {
        op,
        msg: format!(
            "`{op}` is not yet implemented on CUDA; HINT: move the operands to the CPU \
             (`tensor.to_device(&Device::Cpu)`) for this op"
        ),
    }
}

/// See [`crate::ops::index_select`]. Not yet on CUDA.
pub fn index_select(_x: &Tensor, _dim: usize, _ids: &Tensor) -> Result<Tensor> {
    Err(not_yet("index_select"))
}

/// See [`crate::ops::gather`]. Not yet on CUDA.
pub fn gather(_x: &Tensor, _dim: usize, _idx: &Tensor) -> Result<Tensor> {
    Err(not_yet("gather"))
}

/// See [`crate::ops::scatter_add`]. Not yet on CUDA.
pub fn scatter_add(_x: &Tensor, _dim: usize, _idx: &Tensor, _src: &Tensor) -> Result<Tensor> {
    Err(not_yet("scatter_add"))
}

/// See [`crate::ops::cross_entropy`]. Not yet on CUDA.
pub fn cross_entropy(_logits: &Tensor, _targets: &Tensor, _ignore_index: Option<i64>) -> Result<Tensor> {
    Err(not_yet("cross_entropy"))
}

/// See [`crate::ops::cross_entropy_backward`]. Not yet on CUDA.
pub fn cross_entropy_backward(
    _logits: &Tensor,
    _targets: &Tensor,
    _ignore_index: Option<i64>,
    _grad: &Tensor,
) -> Result<Tensor> {
    Err(not_yet("cross_entropy_backward"))
}
