//! The built-in ops on [`Var`](crate::Var), each with its backward rule next to its forward.
//!
//! Every op computes with `moeba_kernels::ops` on the tensors, then calls `Var::record` with a
//! closure that maps the output gradient to the input gradients (computing only those whose
//! input requires grad). Non-differentiable arguments (indices, masks, targets) are plain tensors.

mod elementwise;
mod index;
mod linalg;
mod loss;
mod reduce;
mod shape;
