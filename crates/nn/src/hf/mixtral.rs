//! `model_type = "mixtral"` (MixtralForCausalLM): config mapping and weight mapping.

use moeba_tensor::{Error, Result};

use super::{HfJson, HfWeights};
use crate::HybridConfig;

/// Maps the family's `config.json` onto a [`HybridConfig`].
pub(super) fn config(c: &mut HfJson) -> Result<HybridConfig> {
    let _ = c;
    Err(Error::Msg("HF: mixtral is not implemented yet".into()))
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    let _ = (cfg, w);
    Err(Error::Msg("HF: mixtral is not implemented yet".into()))
}
