//! Softmax and log-softmax on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::softmax`].
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    Err(todo("softmax"))
}
/// See [`crate::ops::log_softmax`].
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    Err(todo("log_softmax"))
}
