//! [`WindowLm`]: a small neural language model over a fixed window of previous tokens
//! (Bengio et al., 2003, with pre-norm SwiGLU residual blocks). It predicts the next token from
//! the last `context` tokens only; it is the first end-to-end model of moeba, built from the
//! foundation layers alone, until the Mamba/attention mixers take over.

use moeba_autograd::Var;
use moeba_tensor::{Error, Result, Tensor};

use crate::{Embedding, Linear, ParamPath, RmsNorm, SwiGluMlp};

/// Sizes of a [`WindowLm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLmConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab: usize,
    /// How many previous tokens the model sees.
    pub context: usize,
    /// Width of each token embedding.
    pub embed_dim: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width inside each SwiGLU block.
    pub intermediate: usize,
    /// Number of residual blocks.
    pub layers: usize,
}

/// `embed (each of the context tokens) → concat → in_proj → layers × (x + mlp(norm(x))) → norm →
/// lm_head`. Parameter names: `embed_tokens.weight`, `in_proj.weight`, `layers.{i}.norm.weight`,
/// `layers.{i}.mlp.{gate,up,down}_proj.weight`, `norm.weight`, `lm_head.weight`.
#[derive(Debug, Clone)]
pub struct WindowLm {
    cfg: WindowLmConfig,
    embed: Embedding,
    in_proj: Linear,
    blocks: Vec<(RmsNorm, SwiGluMlp)>,
    norm: RmsNorm,
    lm_head: Linear,
}

impl WindowLm {
    /// Creates (or finds) every parameter under `path`.
    pub fn new(path: &ParamPath, cfg: WindowLmConfig) -> Result<Self> {
        for (name, v) in [
            ("vocab", cfg.vocab),
            ("context", cfg.context),
            ("embed_dim", cfg.embed_dim),
            ("hidden", cfg.hidden),
            ("intermediate", cfg.intermediate),
        ] {
            if v == 0 {
                return Err(Error::invalid("WindowLm::new", "config", format!("`{name}` must be > 0")));
            }
        }
        let blocks = (0..cfg.layers)
            .map(|i| {
                let p = path.pp("layers").pp(i);
                Ok((
                    RmsNorm::new(&p.pp("norm"), cfg.hidden, 1e-5)?,
                    SwiGluMlp::new(&p.pp("mlp"), cfg.hidden, cfg.intermediate)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WindowLm {
            cfg,
            embed: Embedding::new(&path.pp("embed_tokens"), cfg.vocab, cfg.embed_dim)?,
            in_proj: Linear::new(&path.pp("in_proj"), cfg.context * cfg.embed_dim, cfg.hidden, true)?,
            blocks,
            norm: RmsNorm::new(&path.pp("norm"), cfg.hidden, 1e-5)?,
            lm_head: Linear::new(&path.pp("lm_head"), cfg.hidden, cfg.vocab, false)?,
        })
    }

    /// The sizes.
    pub fn config(&self) -> WindowLmConfig {
        self.cfg
    }

    /// `windows (batch, context)` token ids → next-token logits `(batch, vocab)`.
    pub fn forward(&self, windows: &Tensor) -> Result<Var> {
        if windows.rank() != 2 || windows.dims()[1] != self.cfg.context {
            return Err(Error::bad_shape(
                "WindowLm::forward",
                windows.shape(),
                format!("expected (batch, {}) token ids", self.cfg.context),
            ));
        }
        let batch = windows.dims()[0];
        let e = self.embed.forward(windows)?.reshape((batch, self.cfg.context * self.cfg.embed_dim))?;
        let mut x = self.in_proj.forward(&e)?;
        for (norm, mlp) in &self.blocks {
            x = x.add(&mlp.forward(&norm.forward(&x)?)?)?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)
    }
}
