//! [`Embedding`]: a lookup table from token ids to vectors (`weight (vocab, dim)`).

use moeba_autograd::Var;
use moeba_tensor::{Result, Tensor};

use crate::params::{Init, Param, ParamPath};

/// A token embedding table, `weight (vocab, dim)`, initialised N(0, 1) like torch.
#[derive(Clone, Debug)]
pub struct Embedding {
    /// `(vocab, dim)`.
    pub weight: Param,
    dim: usize,
}

impl Embedding {
    /// Creates (or finds) `path.weight`.
    pub fn new(path: &ParamPath, vocab: usize, dim: usize) -> Result<Self> {
        Self::with_std(path, vocab, dim, 1.0)
    }

    /// Creates (or finds) `path.weight`, initialised N(0, std²) (GPT-2 / HF `initializer_range`
    /// 0.02 for an embedding shared with the LM head, so the first logits are near zero).
    pub fn with_std(path: &ParamPath, vocab: usize, dim: usize, std: f64) -> Result<Self> {
        Ok(Embedding { weight: path.get("weight", (vocab, dim), Init::Normal { std })?, dim })
    }

    /// The vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `ids (any shape, u32 or i64) → ids.shape + [dim]`. An id outside the vocabulary is an error.
    pub fn forward(&self, ids: &Tensor) -> Result<Var> {
        self.weight.var().embedding(ids)
    }
}
