//! Matrix product.

use moeba_kernels::ops;
use moeba_tensor::Result;

use crate::op_kind::OpKind;
use crate::util::{grad_if, reduce_to_shape};
use crate::Var;

impl Var {
    /// `self (..., m, k) @ rhs (..., k, n) -> (..., m, n)`, batch dims broadcasting.
    /// Backward: `ga = g @ bᵀ`, `gb = aᵀ @ g` (transposes are strided views, not copies), each
    /// summed back over the batch dims its operand was broadcast along.
    pub fn matmul(&self, rhs: &Var) -> Result<Var> {
        let (a, b) = (self.tensor().clone(), rhs.tensor().clone());
        let out = ops::matmul(&a, &b)?;
        Ok(Var::record(OpKind::Matmul, out, &[self, rhs], move |g, need| {
            let ga = grad_if(need[0], || reduce_to_shape(&ops::matmul(g, &b.t()?)?, a.shape()))?;
            let gb = grad_if(need[1], || reduce_to_shape(&ops::matmul(&a.t()?, g)?, b.shape()))?;
            Ok(vec![ga, gb])
        }))
    }
}
