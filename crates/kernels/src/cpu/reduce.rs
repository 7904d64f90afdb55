//! Reductions on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::reduce`].
pub fn reduce(x: &Tensor, dims: &[usize], keepdim: bool, op: ReduceOp) -> Result<Tensor> {
    Err(todo("reduce"))
}
/// See [`crate::ops::argmax`].
pub fn argmax(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    Err(todo("argmax"))
}
