//! Indexing ops: index_select, embedding, gather, scatter_add, where_cond, masked_fill. Index
//! and mask arguments are plain tensors (not differentiable).

use moeba_kernels::ops;
use moeba_tensor::{Result, Shape, Tensor};

use crate::op_kind::OpKind;
use crate::util::{grad_if, reduce_to_shape, reshape};
use crate::Var;

/// Zeros of `shape` with the rows of `g` added at `ids` along `dim` (repeated ids accumulate):
/// the backward of `index_select(x, dim, ids)` for `x` of `shape`.
fn index_add_into_zeros(shape: &Shape, dim: usize, ids: &Tensor, g: &Tensor) -> Result<Tensor> {
    let mut idx_dims = vec![1; shape.rank()];
    idx_dims[dim] = ids.elem_count();
    let idx = reshape(ids, idx_dims)?.broadcast_as(g.shape().clone())?;
    let zeros = Tensor::zeros(shape, g.dtype(), g.device())?;
    ops::scatter_add(&zeros, dim, &idx, g)
}

impl Var {
    /// The entries of `self` at `ids` (1-d, u32 or i64) along `dim`. Backward: the gradient
    /// scatter-added into zeros at `ids` (deterministic; repeated ids accumulate).
    pub fn index_select(&self, dim: usize, ids: &Tensor) -> Result<Var> {
        let x_shape = self.shape().clone();
        let ids = ids.clone();
        let out = ops::index_select(self.tensor(), dim, &ids)?;
        Ok(Var::record(OpKind::IndexSelect, out, &[self], move |g, _| {
            Ok(vec![Some(index_add_into_zeros(&x_shape, dim, &ids, g)?)])
        }))
    }

    /// Embedding lookup in the table `self (vocab, d)`: `ids` of any shape → `ids.shape + [d]`.
    /// Backward: the gradient rows added into a zero table at `ids`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Var> {
        let table_shape = self.shape().clone();
        let ids = ids.clone();
        let out = ops::embedding(self.tensor(), &ids)?;
        Ok(Var::record(OpKind::Embedding, out, &[self], move |g, _| {
            let n = ids.elem_count();
            let rows = reshape(g, (n, table_shape.dims()[1]))?;
            Ok(vec![Some(index_add_into_zeros(&table_shape, 0, &reshape(&ids, n)?, &rows)?)])
        }))
    }

    /// torch.gather along `dim` with `idx` (see [`ops::gather`]). Backward: the gradient
    /// scatter-added into zeros at `idx`.
    pub fn gather(&self, dim: usize, idx: &Tensor) -> Result<Var> {
        let x_shape = self.shape().clone();
        let idx = idx.clone();
        let out = ops::gather(self.tensor(), dim, &idx)?;
        Ok(Var::record(OpKind::Gather, out, &[self], move |g, _| {
            let zeros = Tensor::zeros(&x_shape, g.dtype(), g.device())?;
            Ok(vec![Some(ops::scatter_add(&zeros, dim, &idx, g)?)])
        }))
    }

    /// torch.scatter_add out of place: `self` with `src` added at `idx` along `dim` (see
    /// [`ops::scatter_add`]). Backward: the gradient itself for `self`, and the gradient gathered
    /// at `idx` for `src`.
    pub fn scatter_add(&self, dim: usize, idx: &Tensor, src: &Var) -> Result<Var> {
        let idx = idx.clone();
        let out = ops::scatter_add(self.tensor(), dim, &idx, src.tensor())?;
        Ok(Var::record(OpKind::ScatterAdd, out, &[self, src], move |g, need| {
            let gx = grad_if(need[0], || Ok(g.clone()))?;
            let gsrc = grad_if(need[1], || ops::gather(g, dim, &idx))?;
            Ok(vec![gx, gsrc])
        }))
    }

    /// `cond ? a : b` elementwise, broadcasting all three (`cond` any dtype, nonzero = true).
    /// Backward: the gradient where `cond` holds to `a`, elsewhere to `b`, each summed back to
    /// its operand's shape.
    pub fn where_cond(cond: &Tensor, a: &Var, b: &Var) -> Result<Var> {
        let cond = cond.clone();
        let (a_shape, b_shape) = (a.shape().clone(), b.shape().clone());
        let out = ops::where_cond(&cond, a.tensor(), b.tensor())?;
        Ok(Var::record(OpKind::WhereCond, out, &[a, b], move |g, need| {
            let zero = Tensor::zeros((), g.dtype(), g.device())?;
            let ga = grad_if(need[0], || reduce_to_shape(&ops::where_cond(&cond, g, &zero)?, &a_shape))?;
            let gb = grad_if(need[1], || reduce_to_shape(&ops::where_cond(&cond, &zero, g)?, &b_shape))?;
            Ok(vec![ga, gb])
        }))
    }

    /// `self` with `value` wherever `mask` (broadcast to self's shape; nonzero = true) is set.
    /// Backward: the gradient with the masked positions zeroed.
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Var> {
        let mask = mask.clone();
        let out = ops::masked_fill(self.tensor(), &mask, value)?;
        Ok(Var::record(OpKind::MaskedFill, out, &[self], move |g, _| {
            let zero = Tensor::zeros((), g.dtype(), g.device())?;
            Ok(vec![Some(ops::where_cond(&mask, &zero, g)?)])
        }))
    }
}
