//! `model_type = "mamba"` (MambaForCausalLM): config mapping and weight mapping.
//!
//! The model is `backbone.embeddings` → N × `x + mixer(norm(x))` → `backbone.norm_f` → LM head
//! (tied to the embedding by default): no feed-forward, so every block is
//! [`FfnConfig::None`]. The mixer's tensors have moeba's names already
//! (`in_proj`, `conv1d (d_inner, 1, K)`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`); the
//! layer norm `backbone.layers.{i}.norm` becomes `model.layers.{i}.input_layernorm`.
//!
//! The helpers shared with `mamba2` (the common keys, the embedding / final norm / head mapping)
//! live here.

use moeba_tensor::{Error, Result};
use serde_json::Value;

use super::{HfJson, HfWeights};
use crate::mamba::MambaConfig;
use crate::{BlockConfig, FfnConfig, HybridConfig, MixerConfig};

/// The keys both Mamba families share: `(vocab_size, hidden_size, num_hidden_layers,
/// layer_norm_epsilon)`. Checks `hidden_act` (SiLU only) and records `residual_in_fp32` and the
/// keys that only matter for initialising a fresh model.
pub(super) fn common_keys(c: &mut HfJson) -> Result<(usize, usize, usize, f64)> {
    let vocab = c.usize("vocab_size")?;
    let hidden = c.usize("hidden_size")?;
    let layers = c.usize("num_hidden_layers")?;
    let eps = c.f64_or("layer_norm_epsilon", 1e-5)?;
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::Msg(format!("HF config: `layer_norm_epsilon` = {eps} must be finite and > 0")));
    }
    c.note(format!("-> RMSNorm epsilon {eps} (block norms, final norm and Mamba-2's gated norm)"));
    // transformers' ACT2FN maps both names to SiLU.
    c.expect_str("hidden_act", "silu", &["silu", "swish"])?;
    // moeba's residual stream is in the model dtype: fp32 models keep it in fp32 as HF does.
    if c.bool_or("residual_in_fp32", true)? {
        c.note("-> residual stream kept in the model dtype (fp32 when loaded in f32)");
    }
    for key in ["initializer_range", "rescale_prenorm_residual", "time_step_scale", "time_step_init_scheme"] {
        if let Some(v) = c.raw(key) {
            c.note(format!("{key} = {v} -> initialisation only, no effect on a loaded model"));
        }
    }
    for key in ["use_mambapy", "use_associative_scan", "use_cache"] {
        if let Some(v) = c.raw(key) {
            c.note(format!("{key} = {v} -> implementation choice of transformers (same values)"));
        }
    }
    Ok((vocab, hidden, layers, eps))
}

/// `time_step_min`, `time_step_max`, `time_step_floor` (initialisation of `dt_proj.bias` /
/// `dt_bias`; they must describe a valid range).
pub(super) fn time_step_init(c: &mut HfJson) -> Result<(f64, f64, f64)> {
    let lo = c.f64_or("time_step_min", 0.001)?;
    let hi = c.f64_or("time_step_max", 0.1)?;
    let floor = c.f64_or("time_step_floor", 1e-4)?;
    if !(lo > 0.0 && lo <= hi && floor >= 0.0) {
        return Err(Error::Msg(format!(
            "HF config: `time_step_min` = {lo}, `time_step_max` = {hi}, `time_step_floor` = {floor}: need \
             0 < time_step_min <= time_step_max and time_step_floor >= 0"
        )));
    }
    c.note("-> time_step_min/max/floor: initial dt range (initialisation only)");
    Ok((lo, hi, floor))
}

/// The model config around the blocks: the head is tied unless `tie_word_embeddings` is false
/// (`tie_default` when absent).
pub(super) fn hybrid(
    c: &mut HfJson,
    vocab: usize,
    hidden: usize,
    eps: f64,
    mixers: Vec<MixerConfig>,
    tie_default: bool,
) -> Result<HybridConfig> {
    let tie = c.bool_or("tie_word_embeddings", tie_default)?;
    c.note(format!(
        "-> {} blocks `x + mixer(norm(x))`, no feed-forward; lm_head {}",
        mixers.len(),
        if tie { "tied to the embedding" } else { "untied" }
    ));
    let blocks = mixers.into_iter().map(|mixer| BlockConfig { mixer, ffn: FfnConfig::None }).collect();
    let cfg =
        HybridConfig { vocab_size: vocab, hidden_size: hidden, blocks, tie_embeddings: tie, norm_eps: eps };
    cfg.validate()?;
    Ok(cfg)
}

/// Maps the family's `config.json` onto a [`HybridConfig`].
pub(super) fn config(c: &mut HfJson) -> Result<HybridConfig> {
    let (vocab, hidden, layers, eps) = common_keys(c)?;
    let d_state = c.usize_or("state_size", 16)?;
    let d_conv = c.usize_or("conv_kernel", 4)?;
    let expand = c.usize_or("expand", 2)?;
    // transformers' MambaMixer uses `intermediate_size` (default expand · hidden_size); moeba's
    // d_inner is expand · d_model, so it must be a multiple of hidden_size.
    let d_inner = c.usize_or("intermediate_size", expand * hidden)?;
    if hidden == 0 || d_inner == 0 || !d_inner.is_multiple_of(hidden) {
        return Err(Error::Msg(format!(
            "HF config: `intermediate_size` = {d_inner} must be a positive multiple of `hidden_size` = \
             {hidden} (moeba's d_inner is expand · hidden_size)"
        )));
    }
    let dt_rank = match c.raw("time_step_rank") {
        Some(Value::String(s)) if s == "auto" => {
            let r = hidden.div_ceil(16);
            c.note(format!("time_step_rank = \"auto\" -> dt_rank ceil(hidden_size / 16) = {r}"));
            r
        }
        _ => c.usize_or("time_step_rank", hidden.div_ceil(16))?,
    };
    let bias = c.bool_or("use_bias", false)?;
    let conv_bias = c.bool_or("use_conv_bias", true)?;
    let (dt_min, dt_max, dt_init_floor) = time_step_init(c)?;
    let m = MambaConfig {
        d_model: hidden,
        d_state,
        d_conv,
        expand: d_inner / hidden,
        dt_rank,
        conv_bias,
        bias,
        dt_min,
        dt_max,
        dt_init_floor,
        extra_norms: false,
        norm_eps: eps,
    };
    m.validate().map_err(|e| Error::Msg(format!("HF config: the Mamba mixer sizes are invalid: {e}")))?;
    c.note(format!(
        "-> mamba mixer: d_inner {d_inner}, d_state {d_state}, d_conv {d_conv}, dt_rank {dt_rank}, \
         in/out_proj bias {bias}, conv bias {conv_bias}"
    ));
    hybrid(c, vocab, hidden, eps, vec![MixerConfig::Mamba(m); layers], true)
}

/// The embedding (`backbone.embeddings.weight`, or `backbone.embedding.weight` as the original
/// `mamba_ssm` checkpoints name it), the final norm and the head.
pub(super) fn load_outer(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    let embed = if !w.has("backbone.embeddings.weight") && w.has("backbone.embedding.weight") {
        "backbone.embedding.weight"
    } else {
        "backbone.embeddings.weight"
    };
    let e = w.take(embed)?;
    w.set("model.embed_tokens.weight", e.clone(), embed)?;
    w.copy("backbone.norm_f.weight", "model.final_layernorm.weight")?;
    const HEAD: &str = "lm_head.weight";
    if !cfg.tie_embeddings {
        return w.copy(HEAD, HEAD);
    }
    if w.has(HEAD) {
        let h = w.take(HEAD)?;
        if h.dims() != e.dims() {
            return Err(Error::Msg(format!(
                "HF checkpoint: tensor `{HEAD}` has shape {:?} but the tied head is `{embed}` {:?}",
                h.dims(),
                e.dims()
            )));
        }
        let (hv, ev) = (h.to_vec_f64()?, e.to_vec_f64()?);
        let diff = hv.iter().zip(&ev).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        if hv != ev {
            return Err(Error::Msg(format!(
                "HF checkpoint: `{HEAD}` differs from `{embed}` (max |difference| {diff:e}) but \
                 `tie_word_embeddings` is true. HINT: set tie_word_embeddings to false in config.json"
            )));
        }
        w.skip(HEAD, "tied: equal to the embedding");
    }
    Ok(())
}

/// Copies `names` from `backbone.layers.{i}.mixer.*` to `model.layers.{i}.mixer.*` and the
/// layer norm; a missing one is an error naming the HF tensor.
pub(super) fn load_layer(w: &mut HfWeights, i: usize, names: &[&str]) -> Result<()> {
    w.copy(&format!("backbone.layers.{i}.norm.weight"), &format!("model.layers.{i}.input_layernorm.weight"))?;
    for n in names {
        w.copy(&format!("backbone.layers.{i}.mixer.{n}"), &format!("model.layers.{i}.mixer.{n}"))?;
    }
    Ok(())
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    load_outer(cfg, w)?;
    for (i, b) in cfg.blocks.iter().enumerate() {
        let MixerConfig::Mamba(m) = &b.mixer else {
            return Err(Error::Msg(format!("HF mamba: block {i} is not a Mamba block")));
        };
        let mut names =
            vec!["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"];
        names.extend(["A_log", "D", "out_proj.weight"]);
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
