//! Elementwise unary ops on the CPU.
#![allow(unused_variables)]

use crate::ops::*;
use moeba_tensor::{Error, Result, Tensor};

fn todo(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "not implemented yet".into() }
}

/// See [`crate::ops::unary`].
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    Err(todo("unary"))
}
/// See [`crate::ops::unary_backward`].
pub fn unary_backward(x: &Tensor, dy: &Tensor, op: UnaryOp) -> Result<Tensor> {
    Err(todo("unary_backward"))
}
/// See [`crate::ops::affine`].
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    Err(todo("affine"))
}
/// See [`crate::ops::powf`].
pub fn powf(x: &Tensor, e: f64) -> Result<Tensor> {
    Err(todo("powf"))
}
/// See [`crate::ops::clamp`].
pub fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    Err(todo("clamp"))
}
