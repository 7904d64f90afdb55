//! Index ops on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::index_select`].
pub fn index_select(x: &Tensor, dim: usize, ids: &Tensor) -> Result<Tensor> {
    Err(todo("index_select"))
}
/// See [`crate::ops::gather`].
pub fn gather(x: &Tensor, dim: usize, idx: &Tensor) -> Result<Tensor> {
    Err(todo("gather"))
}
/// See [`crate::ops::scatter_add`].
pub fn scatter_add(x: &Tensor, dim: usize, idx: &Tensor, src: &Tensor) -> Result<Tensor> {
    Err(todo("scatter_add"))
}
/// See [`crate::ops::where_cond`].
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Err(todo("where_cond"))
}
