//! Shape ops: views (reshape, transpose, permute, narrow, broadcast, unsqueeze, squeeze), the
//! contiguous copy, and concat / stack.

use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Shape, Tensor};

use crate::op_kind::OpKind;
use crate::util::{reduce_to_shape, reshape};
use crate::Var;

impl Var {
    /// Same elements, new shape (a view when the value is contiguous). Backward: the gradient
    /// reshaped back.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Var> {
        let x_shape = self.shape().clone();
        let out = reshape(self.tensor(), shape)?;
        Ok(Var::record(OpKind::Reshape, out, &[self], move |g, _| {
            Ok(vec![Some(reshape(g, x_shape.clone())?)])
        }))
    }

    /// Merges all dims into one.
    pub fn flatten_all(&self) -> Result<Var> {
        self.reshape(self.elem_count())
    }

    /// Swaps dims `d0` and `d1` (a view). Backward: the same swap.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Var> {
        let out = self.tensor().transpose(d0, d1)?;
        Ok(Var::record(OpKind::Transpose, out, &[self], move |g, _| Ok(vec![Some(g.transpose(d0, d1)?)])))
    }

    /// Swaps the last two dims (a view). Errors below rank 2.
    pub fn t(&self) -> Result<Var> {
        let r = self.rank();
        if r < 2 {
            return Err(Error::bad_shape("t", self.shape(), "needs rank >= 2"));
        }
        self.transpose(r - 2, r - 1)
    }

    /// Reorders dims: output dim `i` is input dim `perm[i]` (a view). Backward: the inverse
    /// permutation.
    pub fn permute(&self, perm: &[usize]) -> Result<Var> {
        let out = self.tensor().permute(perm)?;
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(Var::record(OpKind::Permute, out, &[self], move |g, _| Ok(vec![Some(g.permute(&inverse)?)])))
    }

    /// Elements `start..start + len` of dim `dim` (a view). Backward: the gradient padded with
    /// zeros back to the full size.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Var> {
        let x = self.tensor().clone();
        let out = x.narrow(dim, start, len)?;
        Ok(Var::record(OpKind::Narrow, out, &[self], move |g, _| {
            let size = x.dims()[dim];
            let zeros = |n: usize| -> Result<Tensor> {
                let mut dims = x.dims().to_vec();
                dims[dim] = n;
                Tensor::zeros(dims, g.dtype(), g.device())
            };
            let (before, after) = (zeros(start)?, zeros(size - start - len)?);
            let parts: Vec<&Tensor> =
                [&before, g, &after].into_iter().filter(|t| t.dims()[dim] > 0).collect();
            let gx = match parts.as_slice() {
                [only] => (*only).clone(),
                _ => ops::concat(&parts, dim)?,
            };
            Ok(vec![Some(gx)])
        }))
    }

    /// Broadcasts to `shape` (numpy rules; a view). Backward: summed back to the input's shape.
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Var> {
        let x_shape = self.shape().clone();
        let out = self.tensor().broadcast_as(shape)?;
        Ok(Var::record(OpKind::BroadcastAs, out, &[self], move |g, _| {
            Ok(vec![Some(reduce_to_shape(g, &x_shape)?)])
        }))
    }

    /// Inserts a size-1 dim at `dim` (0..=rank).
    pub fn unsqueeze(&self, dim: usize) -> Result<Var> {
        let out = self.tensor().unsqueeze(dim)?;
        Ok(Var::record(OpKind::Unsqueeze, out, &[self], move |g, _| Ok(vec![Some(g.squeeze(dim)?)])))
    }

    /// Removes dim `dim`, which must have size 1.
    pub fn squeeze(&self, dim: usize) -> Result<Var> {
        let out = self.tensor().squeeze(dim)?;
        Ok(Var::record(OpKind::Squeeze, out, &[self], move |g, _| Ok(vec![Some(g.unsqueeze(dim)?)])))
    }

    /// A contiguous copy (the value itself when already contiguous). Backward: identity.
    pub fn contiguous(&self) -> Result<Var> {
        let out = ops::contiguous(self.tensor())?;
        Ok(Var::record(OpKind::Contiguous, out, &[self], |g, _| Ok(vec![Some(g.clone())])))
    }

    /// Joins `xs` along `dim` (other dims must agree). Backward: each input's slice of the
    /// gradient.
    pub fn concat(xs: &[&Var], dim: usize) -> Result<Var> {
        let ts: Vec<&Tensor> = xs.iter().map(|v| v.tensor()).collect();
        let out = ops::concat(&ts, dim)?;
        let sizes: Vec<usize> = ts.iter().map(|t| t.dims()[dim]).collect();
        Ok(Var::record(OpKind::Concat, out, xs, move |g, need| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for (&n, &need) in sizes.iter().zip(need) {
                grads.push(if need { Some(g.narrow(dim, start, n)?) } else { None });
                start += n;
            }
            Ok(grads)
        }))
    }

    /// Stacks same-shaped `xs` along a new dim `dim` (0..=rank). Backward: each input's slice of
    /// the gradient.
    pub fn stack(xs: &[&Var], dim: usize) -> Result<Var> {
        let ts: Vec<&Tensor> = xs.iter().map(|v| v.tensor()).collect();
        let out = ops::stack(&ts, dim)?;
        Ok(Var::record(OpKind::Stack, out, xs, move |g, need| {
            need.iter()
                .enumerate()
                .map(|(i, &need)| if need { Ok(Some(g.narrow(dim, i, 1)?.squeeze(dim)?)) } else { Ok(None) })
                .collect()
        }))
    }
}
