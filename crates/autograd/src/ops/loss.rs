//! Losses.

use moeba_kernels::ops;
use moeba_tensor::{Result, Tensor};

use crate::op_kind::OpKind;
use crate::Var;

impl Var {
    /// Mean cross-entropy of the logits `self (n, vocab)` against `targets (n)` (u32 or i64),
    /// skipping rows whose target is `ignore_index` (see [`ops::cross_entropy`]). A rank-0 result;
    /// the backward is the kernels' fused [`ops::cross_entropy_backward`].
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: Option<i64>) -> Result<Var> {
        let logits = self.tensor().clone();
        let targets = targets.clone();
        let out = ops::cross_entropy(&logits, &targets, ignore_index)?;
        Ok(Var::record(OpKind::CrossEntropy, out, &[self], move |g, _| {
            Ok(vec![Some(ops::cross_entropy_backward(&logits, &targets, ignore_index, g)?)])
        }))
    }
}
