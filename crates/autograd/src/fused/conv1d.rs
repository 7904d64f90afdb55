//! Causal depthwise conv1d on [`Var`](crate::Var)s: one tape node whose backward is
//! [`ops::causal_conv1d_backward`].

use moeba_kernels::ops;
use moeba_tensor::{Result, Tensor};

use crate::{CustomOp, Var};

/// The tape node: the activation flag, whether a bias was given, the document ids.
struct Conv1dOp {
    silu: bool,
    has_bias: bool,
    seq_idx: Option<Tensor>,
}

impl CustomOp for Conv1dOp {
    fn name(&self) -> &'static str {
        "causal_conv1d"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &grad_outputs[0] else {
            return Ok(vec![None; inputs.len()]);
        };
        let bias = if self.has_bias { inputs.get(2) } else { None };
        let grads =
            ops::causal_conv1d_backward(&inputs[0], &inputs[1], bias, self.silu, self.seq_idx.as_ref(), g)?;
        let mut out = vec![Some(grads.x), Some(grads.weight)];
        if self.has_bias {
            out.push(grads.bias);
        }
        Ok(out)
    }
}

/// Causal depthwise conv1d (see [`ops::causal_conv1d`]): `x (b, d, l)`, `weight (d, k)`,
/// `bias (d)` → `(b, d, l)`, SiLU when `silu`; `seq_idx (b, l)` restarts the window at document
/// boundaries. Records one node whose backward is the fused conv backward.
pub fn causal_conv1d(
    x: &Var,
    weight: &Var,
    bias: Option<&Var>,
    silu: bool,
    seq_idx: Option<&Tensor>,
) -> Result<Var> {
    let out = ops::causal_conv1d(x.tensor(), weight.tensor(), bias.map(|b| b.tensor()), silu, seq_idx)?;
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    let op = Conv1dOp { silu, has_bias: bias.is_some(), seq_idx: seq_idx.cloned() };
    Ok(Var::apply_custom(op, &inputs, vec![out]).remove(0))
}
