//! Decoding with the hybrid model: per-layer caches, prefill and one-token steps (no tape).

use moeba_autograd::{no_grad, Var};
use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Tensor};

use super::block::{Ffn, Mixer};
use super::{HybridCache, HybridModel, LayerCache};
use crate::mamba::MambaCache;
use crate::mamba2::Mamba2Cache;
use crate::moe::MoeContext;

impl HybridModel {
    /// An empty decoding cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<HybridCache> {
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                Ok(match &b.mixer {
                    Mixer::Mamba(m) => LayerCache::Mamba(m.empty_cache(batch)?),
                    Mixer::Mamba2(m) => LayerCache::Mamba2(m.empty_cache(batch)?),
                    Mixer::Attention(a) => LayerCache::Attention(a.new_cache(batch, capacity)?),
                    Mixer::Mla(m) => LayerCache::Mla(m.new_cache(batch, capacity)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HybridCache { layers, pos: 0 })
    }

    /// Runs `ids (b, l)` through the model, appending to `cache`; returns the logits of the last
    /// position `(b, V)`. Equal (to rounding) to the last position of [`HybridModel::forward`] on
    /// everything seen so far.
    pub fn prefill(&self, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        self.run_cached("HybridModel::prefill", ids, cache)
    }

    /// One decoding step: `ids (b)` → logits `(b, V)`, updating `cache` in O(1) for Mamba layers.
    pub fn forward_step(&self, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        const OP: &str = "HybridModel::forward_step";
        if ids.rank() != 1 {
            return Err(Error::invalid(
                OP,
                "ids",
                format!("one token per sequence, (batch), got {}", ids.shape()),
            ));
        }
        let b = ids.dims()[0];
        self.run_cached(OP, &ids.reshape((b, 1))?, cache)
    }

    /// The decoding forward (no tape) of `ids (b, l)` at positions `cache.pos..`.
    fn run_cached(&self, op: &'static str, ids: &Tensor, cache: &mut HybridCache) -> Result<Tensor> {
        let (b, l) = self.check_ids(op, ids)?;
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::invalid(
                op,
                "cache",
                format!(
                    "the cache has {} layers, the model {}. HINT: make it with HybridModel::new_cache",
                    cache.layers.len(),
                    self.blocks.len()
                ),
            ));
        }
        // Refuse before touching any layer, so a failed call leaves the cache as it was.
        for (i, lc) in cache.layers.iter().enumerate() {
            let (len, cap) = match lc {
                LayerCache::Attention(c) => (c.len(), c.capacity()),
                LayerCache::Mla(c) => (c.len(), c.capacity()),
                LayerCache::Mamba(_) | LayerCache::Mamba2(_) => continue,
            };
            if len != cache.pos {
                return Err(Error::invalid(
                    op,
                    "cache",
                    format!("layer {i} holds {len} tokens but the cache is at position {}", cache.pos),
                ));
            }
            if len + l > cap {
                return Err(Error::invalid(
                    op,
                    "cache",
                    format!(
                        "{l} more tokens after {len} would pass the cache capacity of {cap} tokens. HINT: make \
                         the cache with a larger capacity (new_cache)"
                    ),
                ));
            }
        }
        let _guard = no_grad();
        let d = self.cfg.hidden_size;
        let fresh = cache.pos == 0;
        let mut x = Var::constant(ops::embedding(&self.embed.weight.tensor(), ids)?);
        for (block, lc) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = block.input_layernorm.forward(&x)?.tensor().clone();
            let mixed = match (&block.mixer, lc) {
                (Mixer::Mamba(m), LayerCache::Mamba(c)) => ssm_cached(
                    &h,
                    fresh,
                    |h| m.prefill(h),
                    |xt, c: &mut MambaCache| m.forward_step(xt, c),
                    c,
                )?,
                (Mixer::Mamba2(m), LayerCache::Mamba2(c)) => ssm_cached(
                    &h,
                    fresh,
                    |h| m.prefill(h),
                    |xt, c: &mut Mamba2Cache| m.forward_step(xt, c),
                    c,
                )?,
                (Mixer::Attention(a), LayerCache::Attention(c)) => a.forward_step(&h, c)?,
                (Mixer::Mla(m), LayerCache::Mla(c)) => m.forward_step(&h, c)?,
                (m, c) => {
                    return Err(Error::invalid(
                        op,
                        "cache",
                        format!(
                            "layer {} has a {} mixer but its cache is for {}. HINT: make the cache with this \
                             model's new_cache",
                            block.index,
                            match m {
                                Mixer::Mamba(_) => "mamba",
                                Mixer::Mamba2(_) => "mamba2",
                                Mixer::Attention(_) => "attention",
                                Mixer::Mla(_) => "mla",
                            },
                            match c {
                                LayerCache::Mamba(_) => "mamba",
                                LayerCache::Mamba2(_) => "mamba2",
                                LayerCache::Attention(_) => "attention",
                                LayerCache::Mla(_) => "mla",
                            }
                        ),
                    ))
                }
            };
            let x1 = x.add(&Var::constant(mixed))?;
            let ctx = match block.ffn {
                Ffn::Moe(_) => MoeContext::default().with_token_ids(ids.clone()).with_causal(true),
                Ffn::Mlp(_) | Ffn::None => MoeContext::default(),
            };
            x = block.ffn_residual(&x1, &ctx)?.0;
        }
        cache.pos += l;
        let last = x.narrow(1, l - 1, 1)?;
        let h = self.final_norm.forward(&last)?.reshape((b, d))?;
        Ok(self.head(&h)?.tensor().clone())
    }

    /// Bytes of decoding state per sequence at `context` tokens: fixed for Mamba layers, growing
    /// with the context for attention (K and V) and MLA (latent + rope key), in the model dtype.
    pub fn cache_bytes(&self, context: usize) -> usize {
        let size = self.embed.weight.var().dtype().size_in_bytes();
        self.blocks.iter().map(|b| b.cache_numbers(context)).sum::<usize>() * size
    }
}

/// A state-space mixer over `h (b, l, d)` with its fixed-size cache: the block's prefill on a
/// fresh cache, else one O(1) step per token.
fn ssm_cached<C>(
    h: &Tensor,
    fresh: bool,
    prefill: impl Fn(&Tensor) -> Result<(Tensor, C)>,
    step: impl Fn(&Tensor, &mut C) -> Result<Tensor>,
    cache: &mut C,
) -> Result<Tensor> {
    let l = h.dims()[1];
    if fresh && l > 1 {
        let (out, c) = prefill(h)?;
        *cache = c;
        return Ok(out);
    }
    let outs = (0..l)
        .map(|t| step(&h.narrow(1, t, 1)?.squeeze(1)?, cache)?.unsqueeze(1))
        .collect::<Result<Vec<_>>>()?;
    if outs.len() == 1 {
        return Ok(outs.into_iter().next().expect("one step"));
    }
    ops::concat(&outs.iter().collect::<Vec<_>>(), 1)
}
