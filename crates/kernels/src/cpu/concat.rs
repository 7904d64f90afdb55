//! Concatenation on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::concat`].
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    Err(todo("concat"))
}
