//! [`RmsNorm`]: `y = weight · x / √(mean(x², last dim) + eps)`.

use moeba_autograd::Var;
use moeba_tensor::{Error, Result};

use crate::params::{Init, Param, ParamPath};

/// Root-mean-square normalisation over the last dim (HF Llama/Mixtral `RMSNorm`), `weight (dim)`.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// `(dim)`, initialised to ones.
    pub weight: Param,
    eps: f64,
    dim: usize,
}

impl RmsNorm {
    /// Creates (or finds) `path.weight`.
    pub fn new(path: &ParamPath, dim: usize, eps: f64) -> Result<Self> {
        if eps.is_nan() || eps <= 0.0 {
            return Err(Error::invalid("RmsNorm::new", "eps", format!("must be > 0, got {eps}")));
        }
        Ok(RmsNorm { weight: path.get("weight", dim, Init::Ones)?, eps, dim })
    }

    /// `x (..., dim) → (..., dim)`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        if x.dims().last() != Some(&self.dim) {
            return Err(Error::bad_shape(
                "RmsNorm::forward",
                x.shape(),
                format!("expected a last dim of {} ({})", self.dim, self.weight.name()),
            ));
        }
        rms_norm(x, &self.weight.var(), self.eps)
    }
}

/// The RMSNorm function on Vars: `weight · x · (mean(x², -1) + eps)^(-1/2)`.
pub fn rms_norm(x: &Var, weight: &Var, eps: f64) -> Result<Var> {
    let last = x.rank().checked_sub(1).ok_or_else(|| Error::bad_shape("rms_norm", x.shape(), "rank 0"))?;
    let inv = x.sqr()?.mean(&[last], true)?.affine(1.0, eps)?.powf(-0.5)?;
    x.mul(&inv)?.mul(weight)
}
