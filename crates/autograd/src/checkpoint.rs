//! Activation checkpointing ("recompute"): run a piece of the graph without keeping its
//! intermediates, and run it again inside the backward to get its gradients.
//!
//! [`checkpoint`] records one [`CustomOp`] node (named `"checkpoint"`) whose inputs are the
//! piece's inputs and parameters and whose outputs are the piece's outputs. Only those are kept
//! alive by the tape; the intermediates of the first run are dropped as soon as it returns. The
//! node's backward re-runs the piece with recording on, on fresh leaves holding the saved inputs,
//! and back-propagates the output gradients through that short-lived sub-tape with a nested
//! [`Var::backward`] (the engine holds no lock during a sweep, so this is re-entrant, and
//! checkpoints nest).

use std::collections::HashMap;
use std::sync::Arc;

use moeba_tensor::{Error, Result, Shape, Tensor};

use crate::custom::CustomOp;
use crate::grad_mode::{enable_grad, is_grad_enabled, no_grad};
use crate::{Var, VarId};

/// The recompute closure with its by-product erased.
type RecomputeFn = dyn Fn(&[Var]) -> Result<Vec<Var>> + Send + Sync;

/// Runs `f(inputs)` without recording its internals on the tape, and records one node whose
/// backward runs `f` again (with gradients on) to get the gradients of `inputs` and of `params`
/// (every trainable Var that `f` reads besides its inputs: the layer's parameters).
///
/// `f` returns the outputs and a by-product `T` (statistics, caches); the by-product of the first
/// (forward) call is returned, those of the recompute calls are dropped. `f` must be
/// deterministic (same outputs when called again on the same inputs); outputs that do not require
/// grad are returned as constants. When gradients are off (`no_grad`) or nothing requires grad,
/// this is just `f(inputs)`.
///
/// Shapes: any; the returned Vars have the shapes `f` gives.
///
/// Details:
/// - The first call runs under [`no_grad`](crate::no_grad) on detached copies of the inputs, so
///   nothing inside `f` is recorded. Integer outputs (indices) are returned as constants; float
///   outputs are the node's outputs and require grad (like any fused op's). A float output that
///   turns out not to depend on any input or param (the recompute gives it no tape) passes no
///   gradient.
/// - `f` receives the inputs as Vars (in the backward: fresh leaves holding the same tensors) and
///   reads the params by capture. `params` must be leaves (e.g. [`Var::param`]): the same Var
///   objects `f` captures. The gradient of every param `f` reaches is returned to the outer
///   backward; a param that `f` does not reach, or that does not require grad, gets none.
/// - If `f` reads a Var that requires grad but is neither among `inputs` nor in `params` (a
///   forgotten parameter, or a value computed outside `f`: pass that as an input), the backward
///   fails with an error naming it, rather than silently dropping its gradient. For nested
///   checkpoints, list the inner checkpoint's params in the outer one's too.
/// - Each backward through the node calls `f` once more (with recording on, even when the outer
///   backward runs inside a no-grad scope); a nested checkpoint inside `f` adds its own recompute.
///
/// Errors: those of `f`; a param that is not a leaf; in the backward, a recompute whose outputs
/// differ in number, shape or dtype from the first call's (`f` is not deterministic), and a
/// Var read by `f` that requires grad but is not listed.
///
/// ```
/// use moeba_autograd::{checkpoint, Var};
/// use moeba_tensor::{DType, Device, Tensor};
/// let dev = Device::Cpu;
/// let w1 = Var::param(Tensor::randn(1, (4, 8), 0.0, 0.5, DType::F64, &dev)?);
/// let w2 = Var::param(Tensor::randn(2, (8, 4), 0.0, 0.5, DType::F64, &dev)?);
/// let x = Var::param(Tensor::randn(3, (2, 4), 0.0, 1.0, DType::F64, &dev)?);
///
/// // A residual MLP block, y = x + silu(x w1) w2, without keeping silu's input or output.
/// let (w1c, w2c) = (w1.clone(), w2.clone());
/// let block = move |xs: &[Var]| {
///     let h = xs[0].matmul(&w1c)?.silu()?.matmul(&w2c)?;
///     Ok((vec![xs[0].add(&h)?], ()))
/// };
/// let (ys, ()) = checkpoint(&[&x], &[w1.clone(), w2.clone()], block)?;
/// let grads = ys[0].sqr()?.sum_all()?.backward()?;
///
/// // The same gradients as without checkpointing.
/// let y = x.add(&x.matmul(&w1)?.silu()?.matmul(&w2)?)?;
/// let plain = y.sqr()?.sum_all()?.backward()?;
/// for v in [&x, &w1, &w2] {
///     assert_eq!(grads.get(v).unwrap().to_vec::<f64>()?, plain.get(v).unwrap().to_vec::<f64>()?);
/// }
/// # Ok::<(), moeba_tensor::Error>(())
/// ```
pub fn checkpoint<T, F>(inputs: &[&Var], params: &[Var], f: F) -> Result<(Vec<Var>, T)>
where
    F: Fn(&[Var]) -> Result<(Vec<Var>, T)> + Send + Sync + 'static,
{
    let wants_grad = inputs.iter().any(|v| v.requires_grad()) || params.iter().any(Var::requires_grad);
    if !(is_grad_enabled() && wants_grad) {
        let xs: Vec<Var> = inputs.iter().map(|v| (*v).clone()).collect();
        return f(&xs);
    }
    if let Some((i, p)) = params.iter().enumerate().find(|(_, p)| !p.is_leaf()) {
        return Err(Error::invalid(
            "checkpoint",
            "params",
            format!(
                "params[{i}] ({p:?}) is the result of an op; params must be leaves (the trainable Vars \
                 that f captures, e.g. Var::param). HINT: pass a value computed outside f as an input"
            ),
        ));
    }

    // First run: nothing inside f is recorded.
    let (outputs, extra) = {
        let _guard = no_grad();
        let detached: Vec<Var> = inputs.iter().map(|v| v.detach()).collect();
        f(&detached)?
    };
    let tensors: Vec<Tensor> = outputs.iter().map(|v| v.tensor().clone()).collect();
    drop(outputs);

    let op = Checkpoint {
        recompute: Arc::new(move |xs: &[Var]| f(xs).map(|(outs, _)| outs)),
        input_requires_grad: inputs.iter().map(|v| v.requires_grad()).collect(),
        params: params.iter().map(Var::id).collect(),
    };
    let mut node_inputs: Vec<&Var> = inputs.to_vec();
    node_inputs.extend(params);
    Ok((Var::apply_custom(op, &node_inputs, tensors), extra))
}

/// The node recorded by [`checkpoint`]: its inputs are the checkpoint's inputs, then its params.
struct Checkpoint {
    recompute: Arc<RecomputeFn>,
    /// Per checkpoint input: whether it required grad when recorded.
    input_requires_grad: Vec<bool>,
    /// Per param: its id (to find its gradient in the nested backward's results).
    params: Vec<VarId>,
}

impl CustomOp for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let n = self.input_requires_grad.len();
        if inputs.len() != n + self.params.len() {
            return Err(Error::Msg(format!(
                "backward of checkpoint: got {} input tensors for {n} inputs and {} params",
                inputs.len(),
                self.params.len()
            )));
        }
        // The engine may run inside a no-grad scope: the recompute must record.
        let _guard = enable_grad();
        let leaves: Vec<Var> = inputs[..n]
            .iter()
            .zip(&self.input_requires_grad)
            .map(|(t, &requires_grad)| Var::new(t.clone(), requires_grad))
            .collect();
        let recomputed = (self.recompute)(&leaves)?;
        if recomputed.len() != outputs.len() {
            return Err(Error::invalid(
                "checkpoint",
                "f",
                format!(
                    "the recompute returned {} outputs, the first call {}: f must be deterministic",
                    recomputed.len(),
                    outputs.len()
                ),
            ));
        }
        let mut roots: Vec<(Var, Tensor)> = Vec::new();
        for (i, ((out, first), g)) in recomputed.iter().zip(outputs).zip(grad_outputs).enumerate() {
            if out.shape() != first.shape() || out.dtype() != first.dtype() {
                return Err(Error::invalid(
                    "checkpoint",
                    "f",
                    format!(
                        "output {i} of the recompute is {:?} {}, of the first call {:?} {}: f must be \
                         deterministic",
                        out.shape(),
                        out.dtype(),
                        first.shape(),
                        first.dtype()
                    ),
                ));
            }
            if let Some(g) = g {
                if out.requires_grad() {
                    roots.push((out.clone(), g.clone()));
                }
            }
        }
        drop(recomputed);

        let mut result: Vec<Option<Tensor>> = vec![None; inputs.len()];
        let grads = match roots.len() {
            0 => return Ok(result),
            1 => {
                let (root, g) = roots.remove(0);
                root.backward_with(g)?
            }
            _ => {
                // Join the roots into one scalar whose backward hands each root its gradient.
                let (vars, grads): (Vec<Var>, Vec<Tensor>) = roots.into_iter().unzip();
                let first = &vars[0];
                let scalar = Tensor::zeros(Shape::scalar(), first.dtype(), first.device())?;
                let refs: Vec<&Var> = vars.iter().collect();
                let join = Var::apply_custom(SeedJoin { grads }, &refs, vec![scalar]).remove(0);
                drop(refs);
                drop(vars);
                join.backward()?
            }
        };
        let mut by_id: HashMap<VarId, Tensor> = grads.into_iter().collect();
        for (slot, leaf) in result.iter_mut().zip(&leaves) {
            *slot = by_id.remove(&leaf.id());
        }
        for (slot, id) in result[n..].iter_mut().zip(&self.params) {
            *slot = by_id.remove(id);
        }
        if let Some((id, g)) = by_id.iter().next() {
            return Err(Error::invalid(
                "checkpoint",
                "params",
                format!(
                    "f reads a Var ({id}, gradient {:?} {}) that requires grad but is neither an input nor \
                     in params ({} listed), so its gradient would be lost. HINT: list every trainable Var \
                     that f captures in params (for nested checkpoints, the inner params too), and pass \
                     values computed outside f as inputs",
                    g.shape(),
                    g.dtype(),
                    self.params.len()
                ),
            ));
        }
        Ok(result)
    }
}

/// Joins several recomputed outputs into one scalar: its backward gives each output the gradient
/// the outer backward brought for it (a multi-root backward through the ordinary engine).
struct SeedJoin {
    grads: Vec<Tensor>,
}

impl CustomOp for SeedJoin {
    fn name(&self) -> &'static str {
        "checkpoint_seed"
    }

    fn backward(
        &self,
        _inputs: &[Tensor],
        _outputs: &[Tensor],
        _grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(self.grads.iter().cloned().map(Some).collect())
    }
}
