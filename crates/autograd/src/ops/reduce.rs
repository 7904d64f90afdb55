//! Reductions (sum, mean, max, min over dims; sum of all) and softmax / log-softmax.

use moeba_kernels::ops::{self, ReduceOp};
use moeba_tensor::{Result, Tensor};

use crate::op_kind::OpKind;
use crate::util::{dim_flags, keepdim_view, where_positive};
use crate::Var;

impl Var {
    /// Reduces over `dims` (any subset; with `keepdim` they stay as size 1). The gradient of
    /// sum/mean is the output gradient broadcast back (divided by the count for mean); for max/min
    /// it goes to the elements equal to the result, split evenly among ties.
    pub fn reduce(&self, dims: &[usize], keepdim: bool, op: ReduceOp) -> Result<Var> {
        let x = self.tensor().clone();
        let out = ops::reduce(&x, dims, keepdim, op)?;
        let red = dim_flags(x.rank(), dims);
        let kind = match op {
            ReduceOp::Sum => OpKind::Sum,
            ReduceOp::Mean => OpKind::Mean,
            ReduceOp::Max => OpKind::Max,
            ReduceOp::Min => OpKind::Min,
        };
        let y = out.clone();
        Ok(Var::record(kind, out, &[self], move |g, _| {
            let g = keepdim_view(g, x.shape(), &red, keepdim)?;
            let gx = match op {
                ReduceOp::Sum => g.broadcast_as(x.shape().clone())?,
                ReduceOp::Mean => {
                    let count: usize =
                        x.dims().iter().zip(&red).filter(|(_, &r)| r).map(|(&n, _)| n).product();
                    ops::affine(&g, 1.0 / count as f64, 0.0)?.broadcast_as(x.shape().clone())?
                }
                ReduceOp::Max | ReduceOp::Min => {
                    let y = keepdim_view(&y, x.shape(), &red, keepdim)?;
                    // d >= 0 everywhere and 0 exactly at the elements that were picked.
                    let d = if op == ReduceOp::Max { ops::sub(&y, &x)? } else { ops::sub(&x, &y)? };
                    let ones = Tensor::ones(x.shape(), x.dtype(), x.device())?;
                    let picked = ops::affine(&where_positive(&d, &ones)?, -1.0, 1.0)?;
                    let dims: Vec<usize> = (0..x.rank()).filter(|&i| red[i]).collect();
                    let count = ops::sum(&picked, &dims, true)?;
                    ops::mul(&picked, &ops::div(&g, &count)?)?
                }
            };
            Ok(vec![Some(gx)])
        }))
    }

    /// Sum over `dims`.
    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Result<Var> {
        self.reduce(dims, keepdim, ReduceOp::Sum)
    }

    /// Mean over `dims`.
    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Result<Var> {
        self.reduce(dims, keepdim, ReduceOp::Mean)
    }

    /// Max over `dims` (the gradient is split evenly among tied maxima).
    pub fn max(&self, dims: &[usize], keepdim: bool) -> Result<Var> {
        self.reduce(dims, keepdim, ReduceOp::Max)
    }

    /// Min over `dims` (the gradient is split evenly among tied minima).
    pub fn min(&self, dims: &[usize], keepdim: bool) -> Result<Var> {
        self.reduce(dims, keepdim, ReduceOp::Min)
    }

    /// Mean of every element: a rank-0 result.
    pub fn mean_all(&self) -> Result<Var> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.mean(&dims, false)
    }

    /// Sum of every element: a rank-0 result.
    pub fn sum_all(&self) -> Result<Var> {
        let x_shape = self.shape().clone();
        let out = ops::sum_all(self.tensor())?;
        Ok(Var::record(OpKind::SumAll, out, &[self], move |g, _| {
            Ok(vec![Some(g.broadcast_as(x_shape.clone())?)])
        }))
    }

    /// Softmax along `dim`. Backward: `y ⊙ (g - Σ_dim g ⊙ y)`.
    pub fn softmax(&self, dim: usize) -> Result<Var> {
        let out = ops::softmax(self.tensor(), dim)?;
        let y = out.clone();
        Ok(Var::record(OpKind::Softmax, out, &[self], move |g, _| {
            let dot = ops::sum(&ops::mul(g, &y)?, &[dim], true)?;
            Ok(vec![Some(ops::mul(&y, &ops::sub(g, &dot)?)?)])
        }))
    }

    /// Log-softmax along `dim`. Backward: `g - softmax ⊙ Σ_dim g`.
    pub fn log_softmax(&self, dim: usize) -> Result<Var> {
        let out = ops::log_softmax(self.tensor(), dim)?;
        let y = out.clone();
        Ok(Var::record(OpKind::LogSoftmax, out, &[self], move |g, _| {
            let total = ops::sum(g, &[dim], true)?;
            Ok(vec![Some(ops::sub(g, &ops::mul(&ops::exp(&y)?, &total)?)?)])
        }))
    }
}
