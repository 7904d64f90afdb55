//! [`CustomOp`]: the extension point for fused ops that bring their own backward kernels.

use std::sync::Arc;

use moeba_tensor::{Error, Result, Tensor};

/// A fused op recorded as one node by [`Var::apply_custom`](crate::Var::apply_custom).
///
/// The op computes its outputs itself (one fused forward kernel), then hands them to
/// `apply_custom` together with its input Vars. Whatever else the backward needs (the
/// op's parameters, saved intermediates such as per-chunk states, index tensors) lives in the
/// implementing struct.
///
/// An op that has no backward (a forward-only fused kernel) leaves [`CustomOp::backward`] out, or
/// says so with [`CustomOp::has_backward`]: when a gradient has to pass through it,
/// [`Var::backward`](crate::Var::backward) returns an error naming it. It is never skipped
/// quietly (skipping would silently stop the gradient to everything upstream).
///
/// ```
/// use moeba_autograd::{CustomOp, Var};
/// use moeba_kernels::ops;
/// use moeba_tensor::{Device, Result, Tensor};
///
/// /// `y = x * x` as one fused op.
/// struct Square;
/// impl CustomOp for Square {
///     fn name(&self) -> &'static str {
///         "square"
///     }
///     fn backward(&self, inputs: &[Tensor], _outputs: &[Tensor], g: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
///         let Some(g) = &g[0] else { return Ok(vec![None]) };
///         Ok(vec![Some(ops::mul(g, &ops::affine(&inputs[0], 2.0, 0.0)?)?)])
///     }
/// }
///
/// let x = Var::param(Tensor::from_vec(vec![3.0f64], 1, &Device::Cpu)?);
/// let y = ops::mul(x.tensor(), x.tensor())?;
/// let y = Var::apply_custom(Square, &[&x], vec![y]).remove(0);
/// let grads = y.backward()?;
/// assert_eq!(grads.get(&x).unwrap().to_vec::<f64>()?, vec![6.0]);
/// # Ok::<(), moeba_tensor::Error>(())
/// ```
pub trait CustomOp: Send + Sync {
    /// The op's name, used in errors (e.g. `"selective_scan"`).
    fn name(&self) -> &'static str;

    /// Whether the op can compute input gradients. `false` makes any gradient that has to pass
    /// through the op an error naming it. The default is `true`.
    fn has_backward(&self) -> bool {
        true
    }

    /// The gradient of each input (in the order given to `apply_custom`) from the gradient of each
    /// output (`None` for outputs that received no gradient; at least one is `Some`).
    ///
    /// Return one entry per input: `None` where the input gets no gradient (an index input, or
    /// an input that does not require grad; entries for inputs that do not require grad are
    /// ignored). Each gradient must have its input's shape and dtype.
    ///
    /// The default declares that the op has no backward: it returns [`no_backward_error`].
    fn backward(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let _ = (inputs, outputs, grad_outputs);
        Err(no_backward_error(self.name()))
    }
}

/// The error returned when a gradient is asked through an op (named `op`) that has no backward.
pub fn no_backward_error(op: &'static str) -> Error {
    Error::Unsupported {
        op,
        msg: "this op has no backward, but a gradient must flow through it (one of its inputs requires \
              grad and its output reaches the loss). HINT: compute it under `no_grad()` or on detached \
              inputs if no gradient is wanted, or give the op a backward"
            .into(),
    }
}

impl<T: CustomOp + ?Sized> CustomOp for Box<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn has_backward(&self) -> bool {
        (**self).has_backward()
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        (**self).backward(inputs, outputs, grad_outputs)
    }
}

impl<T: CustomOp + ?Sized> CustomOp for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn has_backward(&self) -> bool {
        (**self).has_backward()
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        (**self).backward(inputs, outputs, grad_outputs)
    }
}
