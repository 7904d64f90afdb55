//! [`SwiGluMlp`]: the gated feed-forward block of Llama/Mixtral, `down(silu(gate(x)) · up(x))`.

use moeba_autograd::Var;
use moeba_tensor::Result;

use crate::linear::Linear;
use crate::params::ParamPath;

/// SwiGLU MLP with HF names `gate_proj`, `up_proj`, `down_proj` (no biases).
#[derive(Clone, Debug)]
pub struct SwiGluMlp {
    /// `(intermediate, hidden)`.
    pub gate_proj: Linear,
    /// `(intermediate, hidden)`.
    pub up_proj: Linear,
    /// `(hidden, intermediate)`.
    pub down_proj: Linear,
}

impl SwiGluMlp {
    /// Creates (or finds) the three projections under `path`.
    pub fn new(path: &ParamPath, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(SwiGluMlp {
            gate_proj: Linear::new(&path.pp("gate_proj"), hidden, intermediate, false)?,
            up_proj: Linear::new(&path.pp("up_proj"), hidden, intermediate, false)?,
            down_proj: Linear::new(&path.pp("down_proj"), intermediate, hidden, false)?,
        })
    }

    /// `x (..., hidden) → (..., hidden)`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let h = self.gate_proj.forward(x)?.silu()?.mul(&self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}
