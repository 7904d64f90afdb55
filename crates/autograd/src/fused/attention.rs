//! RoPE and causal attention on [`Var`](crate::Var)s: one tape node each, whose backward is
//! [`ops::rope_backward`] (the transposed rotation) or [`ops::attention_backward`] (the tiled
//! FlashAttention-2 backward, recomputing the probabilities from the saved log-sum-exp).

use moeba_kernels::ops::{self, AttentionOptions, AttentionOutput, RopeOptions};
use moeba_tensor::{Result, Tensor};

use crate::{CustomOp, Var};

/// The RoPE tape node.
struct RopeOp {
    opts: RopeOptions,
}

impl CustomOp for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn backward(
        &self,
        _inputs: &[Tensor],
        _outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &grad_outputs[0] else { return Ok(vec![None]) };
        Ok(vec![Some(ops::rope_backward(g, &self.opts)?)])
    }
}

/// Rotary position embedding of `x (b, h, l, dim)` (any strides); see [`ops::rope`]. Output:
/// `(b, h, l, dim)`; its gradient is the inverse rotation of the output's.
pub fn rope(x: &Var, opts: &RopeOptions) -> Result<Var> {
    let y = ops::rope(x.tensor(), opts)?;
    Ok(Var::apply_custom(RopeOp { opts: *opts }, &[x], vec![y]).remove(0))
}

/// The attention tape node: the options and the forward's log-sum-exp.
struct AttentionOp {
    opts: AttentionOptions,
    lse: Tensor,
}

impl CustomOp for AttentionOp {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &grad_outputs[0] else { return Ok(vec![None, None, None]) };
        let fwd = AttentionOutput { out: outputs[0].clone(), lse: self.lse.clone() };
        let (dq, dk, dv) = ops::attention_backward(&inputs[0], &inputs[1], &inputs[2], &fwd, g, &self.opts)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

/// Memory-efficient attention of `q (b, hq, lq, dk)`, `k (b, hkv, lk, dk)`, `v (b, hkv, lk, dv)`
/// (GQA, bottom-right causal mask, optional window; see [`ops::attention`]). Output
/// `(b, hq, lq, dv)`. One tape node; the backward keeps only the output and the `(b, hq, lq)`
/// log-sum-exp, so memory stays `O(l)`.
pub fn attention(q: &Var, k: &Var, v: &Var, opts: &AttentionOptions) -> Result<Var> {
    let fwd = ops::attention(q.tensor(), k.tensor(), v.tensor(), opts)?;
    let op = AttentionOp { opts: *opts, lse: fwd.lse };
    Ok(Var::apply_custom(op, &[q, k, v], vec![fwd.out]).remove(0))
}
