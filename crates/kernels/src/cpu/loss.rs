//! Losses on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::cross_entropy`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<i64>) -> Result<Tensor> {
    Err(todo("cross_entropy"))
}
/// See [`crate::ops::cross_entropy_backward`].
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
    grad: &Tensor,
) -> Result<Tensor> {
    Err(todo("cross_entropy_backward"))
}
