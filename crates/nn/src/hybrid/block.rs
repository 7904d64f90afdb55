//! One block of the hybrid model: `x + mixer(input_layernorm(x))`, then
//! `x + ffn(pre_ff_layernorm(x))`, at each recompute level.

use std::sync::Arc;

use moeba_autograd::{checkpoint, Var};
use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Tensor};

use super::{MixerConfig, Recompute};
use crate::attention::Attention;
use crate::mamba::MambaBlock;
use crate::mamba2::Mamba2Block;
use crate::mla::Mla;
use crate::moe::{MoeContext, MoeLayer, RoutingStats};
use crate::params::Param;
use crate::{ParamPath, RmsNorm, SwiGluMlp};

/// The mixer of one built block.
#[derive(Debug)]
pub(super) enum Mixer {
    Mamba(MambaBlock),
    Mamba2(Mamba2Block),
    Attention(Attention),
    Mla(Mla),
}

/// The feed-forward of one built block.
#[derive(Debug)]
pub(super) enum Ffn {
    Mlp(SwiGluMlp),
    Moe(Box<MoeLayer>),
    /// No feed-forward (and no `pre_ff_layernorm`).
    None,
}

/// What a block's feed-forward reports besides its output (MoE layers only).
#[derive(Debug, Default)]
pub(super) struct FfnExtras {
    /// The weighted aux loss of the layer (rank 0), if any.
    pub(super) aux: Option<Var>,
    /// The routing statistics.
    pub(super) stats: Option<RoutingStats>,
    /// The first expert of every token `(T)` U32.
    pub(super) assignment: Option<Tensor>,
}

/// One built block. Held in an `Arc` so that a checkpointed forward can capture it.
#[derive(Debug)]
pub(super) struct Block {
    pub(super) index: usize,
    pub(super) input_layernorm: RmsNorm,
    pub(super) mixer: Mixer,
    /// `None` exactly when the block has no feed-forward ([`Ffn::None`]).
    pub(super) pre_ff_layernorm: Option<RmsNorm>,
    pub(super) ffn: Ffn,
    /// The parameters read by `mixer(input_layernorm(x))` (for [`Recompute::Mixer`]).
    pub(super) mixer_params: Vec<Param>,
    /// Every parameter of the block (for [`Recompute::Block`]).
    pub(super) params: Vec<Param>,
}

impl Block {
    /// `mixer(input_layernorm(x))` for `x (b, l, d)`.
    pub(super) fn mix(&self, x: &Var) -> Result<Var> {
        let h = self.input_layernorm.forward(x)?;
        match &self.mixer {
            Mixer::Mamba(m) => m.forward(&h, None),
            Mixer::Mamba2(m) => m.forward(&h, None),
            Mixer::Attention(a) => a.forward(&h),
            Mixer::Mla(m) => m.forward(&h),
        }
    }

    /// `x + ffn(pre_ff_layernorm(x))` and what an MoE layer reports (`x` itself without FFN).
    pub(super) fn ffn_residual(&self, x: &Var, ctx: &MoeContext) -> Result<(Var, FfnExtras)> {
        let Some(norm) = &self.pre_ff_layernorm else {
            return Ok((x.clone(), FfnExtras::default()));
        };
        let h = norm.forward(x)?;
        match &self.ffn {
            Ffn::None => Ok((x.clone(), FfnExtras::default())),
            Ffn::Mlp(mlp) => Ok((x.add(&mlp.forward(&h)?)?, FfnExtras::default())),
            Ffn::Moe(layer) => {
                let out = layer.forward(&h, ctx)?;
                let aux = out.aux.weighted_total(layer.config())?;
                let assignment = match &out.assignment {
                    Some(a) if a.rank() == 2 => {
                        let t = a.dims()[0];
                        Some(ops::contiguous(&a.narrow(1, 0, 1)?)?.reshape(t)?)
                    }
                    _ => None,
                };
                Ok((x.add(&out.out)?, FfnExtras { aux, stats: Some(out.stats), assignment }))
            }
        }
    }

    /// The whole block on the tape.
    pub(super) fn forward(&self, x: &Var, ctx: &MoeContext) -> Result<(Var, FfnExtras)> {
        let x = x.add(&self.mix(x)?)?;
        self.ffn_residual(&x, ctx)
    }

    /// The block at a recompute level.
    pub(super) fn forward_at(
        self: &Arc<Self>,
        x: &Var,
        ctx: &MoeContext,
        level: Recompute,
    ) -> Result<(Var, FfnExtras)> {
        match level {
            Recompute::None => self.forward(x, ctx),
            Recompute::Mixer => {
                let params: Vec<Var> = self.mixer_params.iter().map(Param::var).collect();
                let blk = Arc::clone(self);
                let (outs, ()) = checkpoint(&[x], &params, move |inp| Ok((vec![blk.mix(&inp[0])?], ())))?;
                let mixed = outs.into_iter().next().ok_or_else(|| missing_output("mixer"))?;
                self.ffn_residual(&x.add(&mixed)?, ctx)
            }
            Recompute::Block => {
                let params: Vec<Var> = self.params.iter().map(Param::var).collect();
                let (blk, ctx) = (Arc::clone(self), ctx.clone());
                let (outs, (stats, assignment)) = checkpoint(&[x], &params, move |inp| {
                    let (y, ex) = blk.forward(&inp[0], &ctx)?;
                    let mut outs = vec![y];
                    outs.extend(ex.aux);
                    Ok((outs, (ex.stats, ex.assignment)))
                })?;
                let mut outs = outs.into_iter();
                let y = outs.next().ok_or_else(|| missing_output("block"))?;
                Ok((y, FfnExtras { aux: outs.next(), stats, assignment }))
            }
        }
    }

    /// Mixer params and sizes as cache bytes per sequence at `context` tokens (in numbers).
    pub(super) fn cache_numbers(&self, context: usize) -> usize {
        match &self.mixer {
            Mixer::Mamba(m) => {
                let c = m.config();
                c.d_inner() * (c.d_conv + c.d_state)
            }
            Mixer::Mamba2(m) => {
                let c = m.config();
                c.conv_dim() * c.d_conv + c.num_heads * c.head_dim * c.d_state
            }
            Mixer::Attention(a) => {
                let c = a.config();
                2 * c.kv_heads * c.head_dim * context
            }
            Mixer::Mla(m) => m.config().cache_numbers_per_token() * context,
        }
    }
}

fn missing_output(what: &str) -> Error {
    Error::invalid("HybridModel::forward", "recompute", format!("the checkpointed {what} returned no output"))
}

/// Every parameter of the store whose name starts with `path`'s prefix.
pub(super) fn params_under(path: &ParamPath) -> Vec<Param> {
    let prefix = path.name("");
    path.store().params().into_iter().filter(|p| p.name().starts_with(&prefix)).collect()
}

pub(super) fn elems(params: &[Param]) -> usize {
    params.iter().map(|p| p.var().elem_count()).sum()
}

/// The MoE context of block `index`: the caller's, with the token ids, marked causal, and the
/// jitter seed salted by the block index (so that layers draw different noise).
pub(super) fn layer_context(base: &MoeContext, ids: &Tensor, index: usize) -> MoeContext {
    let mut ctx = base.clone();
    ctx.token_ids = Some(ids.clone());
    ctx.causal = true;
    ctx.seed = base.seed ^ (index as u64).wrapping_mul(0xA076_1D64_78BD_642F);
    ctx
}

pub(super) fn mixer_name(m: &MixerConfig) -> &'static str {
    match m {
        MixerConfig::Mamba(_) => "mamba",
        MixerConfig::Mamba2(_) => "mamba2",
        MixerConfig::Attention(_) => "attention",
        MixerConfig::Mla(_) => "mla",
    }
}
