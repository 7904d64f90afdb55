//! Matrix multiplication on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::matmul`].
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Err(todo("matmul"))
}
