//! RoPE frequency scaling for long contexts: YaRN (Peng et al. 2023, "YaRN: Efficient Context
//! Window Extension of Large Language Models"), as DeepSeek-V2 and Qwen checkpoints configure it
//! (HF `rope_scaling` / `rope_parameters` with `rope_type = "yarn"`).
//!
//! Plain RoPE turns pair `i` of a `dim`-wide rotation by `p · θ^(-2i/dim)` at position `p`. YaRN
//! keeps the fast-turning pairs (many turns within the original context) as they are, divides
//! the frequency of the slow ones by `factor` (position interpolation), blends the two on a
//! linear ramp between them, and multiplies cos and sin by an `attention_factor` (the
//! "temperature" correction of the scores).

use moeba_tensor::{Error, Result};

/// YaRN's settings, in the names of HF transformers' `_compute_yarn_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    /// Context extension factor `s` (DeepSeek-V2: 40).
    pub factor: f64,
    /// The context the model was pretrained on (`original_max_position_embeddings`).
    pub original_max_position: usize,
    /// Pairs turning more than this many times within the original context keep their
    /// frequency (`beta_fast`, default 32).
    pub beta_fast: f64,
    /// Pairs turning fewer times than this are fully interpolated (`beta_slow`, default 1).
    pub beta_slow: f64,
    /// Rounds the ramp's ends outwards to whole pairs (`truncate`, default true).
    pub truncate: bool,
    /// Factor on cos and sin (HF `attention_factor`; by default `mscale(factor, mscale) /
    /// mscale(factor, mscale_all_dim)`, or `mscale(factor)` — see [`yarn_mscale`]).
    pub attention_factor: f64,
}

impl YarnScaling {
    /// YaRN with HF's defaults (`beta_fast` 32, `beta_slow` 1, truncated ramp) and
    /// `attention_factor = yarn_mscale(factor, 1)`.
    pub fn new(factor: f64, original_max_position: usize) -> Self {
        YarnScaling {
            factor,
            original_max_position,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: yarn_mscale(factor, 1.0),
        }
    }

    /// The inverse frequency of each of the `dim / 2` pairs of a `dim`-wide rotation with base
    /// `theta`: `θ^(-2i/dim)` blended with `θ^(-2i/dim) / factor` by YaRN's ramp.
    pub fn inv_freqs(&self, dim: usize, theta: f64) -> Vec<f64> {
        let half = dim / 2;
        // The pair index at which a frequency makes `rotations` turns in the original context.
        let pair_at = |rotations: f64| {
            dim as f64 * (self.original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (pair_at(self.beta_fast), pair_at(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        let span = if low == high { 0.001 } else { high - low };
        (0..half)
            .map(|i| {
                let extrapolated = theta.powf(-((2 * i) as f64) / dim as f64);
                let interpolated = extrapolated / self.factor;
                // 0 below the ramp (keep the frequency), 1 above it (interpolate).
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                interpolated * ramp + extrapolated * (1.0 - ramp)
            })
            .collect()
    }

    /// Errors (naming `op` and the field) unless every setting is usable.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let bad =
            |field: &str, v: String| Err(Error::invalid(op, "rope scaling", format!("yarn {field} {v}")));
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return bad("factor", format!("must be finite and >= 1, got {}", self.factor));
        }
        if self.original_max_position == 0 {
            return bad("original_max_position_embeddings", "must be > 0, got 0".into());
        }
        for (name, b) in [("beta_fast", self.beta_fast), ("beta_slow", self.beta_slow)] {
            if !(b.is_finite() && b > 0.0) {
                return bad(name, format!("must be finite and > 0, got {b}"));
            }
        }
        if !(self.attention_factor.is_finite() && self.attention_factor > 0.0) {
            return bad("attention_factor", format!("must be finite and > 0, got {}", self.attention_factor));
        }
        Ok(())
    }
}

/// YaRN's magnitude correction `0.1 · mscale · ln(factor) + 1` (1 when `factor ≤ 1`).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// How RoPE's frequencies are scaled for contexts longer than the pretraining one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// YaRN: ramped position interpolation and a magnitude factor on cos and sin.
    Yarn(YarnScaling),
}

impl RopeScaling {
    /// The inverse frequency of each of the `dim / 2` pairs with base `theta`.
    pub fn inv_freqs(&self, dim: usize, theta: f64) -> Vec<f64> {
        match self {
            RopeScaling::None => (0..dim / 2).map(|i| theta.powf(-((2 * i) as f64) / dim as f64)).collect(),
            RopeScaling::Yarn(y) => y.inv_freqs(dim, theta),
        }
    }

    /// The factor on cos and sin (1 for plain RoPE).
    pub fn amplitude(&self) -> f64 {
        match self {
            RopeScaling::None => 1.0,
            RopeScaling::Yarn(y) => y.attention_factor,
        }
    }

    /// Errors (naming `op`) unless the settings are usable.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        match self {
            RopeScaling::None => Ok(()),
            RopeScaling::Yarn(y) => y.validate(op),
        }
    }
}
