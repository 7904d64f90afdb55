//! [`Linear`]: `y = x Wᵀ + b`, with the HuggingFace layout (`weight` is `(out, in)`).

use moeba_autograd::Var;
use moeba_tensor::{Error, Result};

use crate::params::{Init, Param, ParamPath};

/// A fully connected layer. `weight (out_features, in_features)`, optional `bias (out_features)`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `(out_features, in_features)`.
    pub weight: Param,
    /// `(out_features)`, if the layer has a bias.
    pub bias: Option<Param>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Creates (or finds) `path.weight` and, with `bias`, `path.bias`. Weights are initialised
    /// U(-1/√in, 1/√in) like torch's default; biases to zero.
    pub fn new(path: &ParamPath, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (in_features.max(1) as f64).sqrt();
        let weight = path.get("weight", (out_features, in_features), Init::Uniform { bound })?;
        let bias = if bias { Some(path.get("bias", out_features, Init::Zeros)?) } else { None };
        Ok(Linear { weight, bias, in_features, out_features })
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x (..., in) → (..., out)`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let dims = x.dims().to_vec();
        match dims.last() {
            Some(&d) if d == self.in_features => {}
            _ => {
                return Err(Error::bad_shape(
                    "Linear::forward",
                    x.shape(),
                    format!("expected a last dim of {} ({})", self.in_features, self.weight.name()),
                ))
            }
        }
        let rows = x.elem_count() / self.in_features.max(1);
        let flat = x.reshape((rows, self.in_features))?;
        let mut y = flat.matmul(&self.weight.var().t()?)?;
        if let Some(b) = &self.bias {
            y = y.add(&b.var())?;
        }
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.out_features;
        y.reshape(out)
    }
}
