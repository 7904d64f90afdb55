//! `model_type = "mamba2"` (Mamba2ForCausalLM): config mapping and weight mapping.
//!
//! Same outer structure as `mamba` (no feed-forward, `backbone.*` names), with Mamba-2 mixers:
//! `in_proj` split `[z | xBC | dt]`, `conv1d (conv_dim, 1, K)` over xBC, `dt_bias (H)`,
//! `A_log (H)`, `D (H)`, the gated RMSNorm `norm.weight (d_inner)` (gate before the norm,
//! `n_groups` groups of `d_inner / n_groups`) and `out_proj`; all have moeba's names already.
//! The head is untied unless `tie_word_embeddings` is true (transformers' default is false).

use moeba_tensor::{Error, Result};
use serde_json::Value;

use super::mamba::{common_keys, hybrid, load_layer, load_outer, time_step_init};
use super::{HfJson, HfWeights};
use crate::mamba2::Mamba2Config;
use crate::{HybridConfig, MixerConfig};

/// One bound of `time_step_limit`: a number, or a non-finite float as transformers 5 writes it
/// (`{"__float__": "Infinity"}`) or as a string.
fn limit_value(v: &Value) -> Option<f64> {
    let text = |s: &str| match s.to_ascii_lowercase().as_str() {
        "infinity" | "inf" | "+infinity" | "+inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        "nan" => Some(f64::NAN),
        other => other.parse().ok(),
    };
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => text(s),
        Value::Object(o) => o.get("__float__").and_then(Value::as_str).and_then(text),
        _ => None,
    }
}

/// Checks `time_step_limit`: dt = softplus(·) is always > 0, so only a limit that clamps
/// nothing (lower bound <= 0, upper bound +inf: transformers' default `(0, inf)`) is accepted.
fn time_step_limit(c: &mut HfJson) -> Result<()> {
    let Some(v) = c.raw("time_step_limit") else {
        c.note("time_step_limit absent -> (0, inf): no clamp");
        return Ok(());
    };
    let bounds =
        v.as_array().filter(|a| a.len() == 2).and_then(|a| Some((limit_value(&a[0])?, limit_value(&a[1])?)));
    match bounds {
        Some((lo, hi)) if lo <= 0.0 && hi == f64::INFINITY => {
            c.note(format!("time_step_limit = ({lo}, inf) -> no clamp (softplus(dt) > 0 always)"));
            Ok(())
        }
        Some((lo, hi)) => Err(Error::Msg(format!(
            "HF config: `time_step_limit` = ({lo}, {hi}) is not supported; moeba does not clamp dt and \
             supports only (0, inf)"
        ))),
        None => Err(Error::Msg(format!("HF config: `time_step_limit` is {v}, expected a pair of numbers"))),
    }
}

/// Maps the family's `config.json` onto a [`HybridConfig`].
pub(super) fn config(c: &mut HfJson) -> Result<HybridConfig> {
    let (vocab, hidden, layers, eps) = common_keys(c)?;
    let d_state = c.usize_or("state_size", 128)?;
    let d_conv = c.usize_or("conv_kernel", 4)?;
    let expand = c.usize_or("expand", 2)?;
    let head_dim = c.usize_or("head_dim", 64)?;
    let num_heads = c.usize_or("num_heads", 128)?;
    let n_groups = c.usize_or("n_groups", 8)?;
    let chunk_size = c.usize_or("chunk_size", 256)?;
    let bias = c.bool_or("use_bias", false)?;
    let conv_bias = c.bool_or("use_conv_bias", true)?;
    if !c.bool_or("rms_norm", true)? {
        return Err(Error::Msg(
            "HF config: `rms_norm` = false is not supported; moeba's Mamba-2 always applies the gated \
             RMSNorm (`mixer.norm`)"
                .into(),
        ));
    }
    if c.bool_or("norm_before_gate", false)? {
        return Err(Error::Msg(
            "HF config: `norm_before_gate` = true is not supported; moeba (as transformers' Mamba2Mixer) \
             gates before the norm"
                .into(),
        ));
    }
    time_step_limit(c)?;
    if let Some(v) = c.raw("time_step_rank") {
        c.note(format!("time_step_rank = {v} -> unused by Mamba-2 (dt comes from in_proj)"));
    }
    let (dt_min, dt_max, dt_init_floor) = time_step_init(c)?;
    let d_inner = expand * hidden;
    if num_heads * head_dim != d_inner {
        return Err(Error::Msg(format!(
            "HF config: `num_heads` = {num_heads} × `head_dim` = {head_dim} must equal `expand` = {expand} × \
             `hidden_size` = {hidden} = {d_inner}"
        )));
    }
    if n_groups == 0 || !num_heads.is_multiple_of(n_groups) {
        return Err(Error::Msg(format!(
            "HF config: `n_groups` = {n_groups} must divide `num_heads` = {num_heads}"
        )));
    }
    if chunk_size == 0 {
        return Err(Error::Msg("HF config: `chunk_size` = 0 must be at least 1".into()));
    }
    let m = Mamba2Config {
        d_model: hidden,
        d_state,
        d_conv,
        expand,
        head_dim,
        num_heads,
        n_groups,
        chunk_size,
        conv_bias,
        bias,
        dt_min,
        dt_max,
        dt_init_floor,
        norm_eps: eps,
    };
    m.validate().map_err(|e| Error::Msg(format!("HF config: the Mamba-2 mixer sizes are invalid: {e}")))?;
    c.note(format!(
        "-> mamba2 mixer: {num_heads} heads × {head_dim}, d_state {d_state}, {n_groups} group(s) (gated \
         norm groups of {}), d_conv {d_conv}, chunk {chunk_size}, in/out_proj bias {bias}, conv bias {conv_bias}",
        d_inner / n_groups
    ));
    hybrid(c, vocab, hidden, eps, vec![MixerConfig::Mamba2(m); layers], false)
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    load_outer(cfg, w)?;
    for (i, b) in cfg.blocks.iter().enumerate() {
        let MixerConfig::Mamba2(m) = &b.mixer else {
            return Err(Error::Msg(format!("HF mamba2: block {i} is not a Mamba-2 block")));
        };
        let mut names = vec!["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight"];
        names.push("out_proj.weight");
        if m.bias {
            names.extend(["in_proj.bias", "out_proj.bias"]);
        }
        if m.conv_bias {
            names.push("conv1d.bias");
        }
        load_layer(w, i, &names)?;
    }
    Ok(())
}
