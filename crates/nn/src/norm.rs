//! [`RmsNorm`]: `y = weight · x / √(mean(x², last dim) + eps)`.

use moeba_autograd::{CustomOp, Var};
use moeba_tensor::{DType, Error, Result, Tensor};

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
///
/// On the CPU in f32/f64 with `weight (d)` this is one fused node (one pass per row forward and
/// backward, [`moeba_kernels::cpu::norm`]); otherwise, and as the reference the tests compare
/// it with, [`rms_norm_composite`].
pub fn rms_norm(x: &Var, weight: &Var, eps: f64) -> Result<Var> {
    let fused = x.rank() >= 1
        && weight.dims() == [x.dims()[x.rank() - 1]]
        && x.dtype() == weight.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().is_cpu()
        && weight.device().is_cpu();
    if !fused {
        return rms_norm_composite(x, weight, eps);
    }
    let y = moeba_kernels::cpu::norm::rms_norm(x.tensor(), weight.tensor(), eps)?;
    Ok(Var::apply_custom(RmsNormOp { eps }, &[x, weight], vec![y]).remove(0))
}

/// The composite RMSNorm (sqr, mean, affine, powf, two muls, each with its own backward): any
/// dtype, device and broadcastable `weight`. The reference for the fused [`rms_norm`].
pub fn rms_norm_composite(x: &Var, weight: &Var, eps: f64) -> Result<Var> {
    let last = x.rank().checked_sub(1).ok_or_else(|| Error::bad_shape("rms_norm", x.shape(), "rank 0"))?;
    let inv = x.sqr()?.mean(&[last], true)?.affine(1.0, eps)?.powf(-0.5)?;
    x.mul(&inv)?.mul(weight)
}

/// The fused RMSNorm's tape node (recomputes the per-row scale in the backward).
struct RmsNormOp {
    eps: f64,
}

impl CustomOp for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &grad_outputs[0] else { return Ok(vec![None, None]) };
        let (gx, gw) = moeba_kernels::cpu::norm::rms_norm_backward(&inputs[0], &inputs[1], self.eps, g)?;
        Ok(vec![Some(gx), Some(gw)])
    }
}
