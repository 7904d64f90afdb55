//! moeba-autograd: reverse-mode automatic differentiation over moeba-kernels' ops.
//!
//! A [`Var`] is a [`Tensor`](moeba_tensor::Tensor) plus its place on the tape. Ops on `Var`s
//! compute with [`moeba_kernels::ops`] and, when an input requires a gradient and no
//! [`no_grad`] scope is active, record a node that holds the inputs and what the backward rule
//! needs (define-by-run: the tape is the graph of nodes reachable from a result).
//! [`Var::backward`] walks that graph in reverse topological order (iteratively: graphs can be
//! deep), accumulates the gradient of every variable that was used more than once, and returns
//! the gradients of the leaves in [`Grads`].
//!
//! Every differentiable op of the kernels has a backward rule here; [`DIFFERENTIABLE_OPS`] lists them and the
//! test suite gradient-checks each one against central differences ([`gradcheck`]). Fused ops
//! added by later crates (selective scan, SSD, attention, ...) plug in through [`CustomOp`] and
//! [`Var::apply_custom`], with any number of outputs. An op that has no backward is never
//! skipped quietly: asking for a gradient through it is an error naming it.
//!
//! Backward rules compute on plain tensors, so gradients are not themselves on the tape (no
//! double backward). The no-grad flag is per thread.
//!
//! ```
//! use moeba_autograd::Var;
//! use moeba_tensor::{Device, Tensor};
//! let x = Var::param(Tensor::from_vec(vec![1.0f64, 2.0, 3.0], 3, &Device::Cpu)?);
//! let y = x.mul(&x)?.sum_all()?; // Σ x²
//! let grads = y.backward()?;
//! assert_eq!(grads.get(&x).unwrap().to_vec::<f64>()?, vec![2.0, 4.0, 6.0]);
//! # Ok::<(), moeba_tensor::Error>(())
//! ```
//!
//! May depend on moeba-tensor and moeba-kernels only.

mod backward;
pub mod checkpoint;
mod custom;
pub mod fused;
mod grad_mode;
pub mod gradcheck;
mod op_kind;
mod ops;
mod util;
mod var;

pub use backward::{set_backward_profiling, take_backward_profile, Grads};
pub use checkpoint::checkpoint;
pub use custom::{no_backward_error, CustomOp};
pub use grad_mode::{is_grad_enabled, no_grad, with_no_grad, NoGradGuard};
pub use gradcheck::{check_gradients, GradCheckOptions, GradCheckReport, InputReport};
pub use op_kind::{OpKind, DIFFERENTIABLE_OPS};
pub use util::reduce_to_shape;
pub use var::{Var, VarId};
