//! `model_type = "jamba"` (JambaForCausalLM): config mapping and weight mapping.
//!
//! Layer `i` mixes with attention iff `i % attn_layer_period == attn_layer_offset` (GQA with NO
//! positional encoding, no biases), else with a Mamba-1 mixer carrying Jamba's RMSNorms on dt,
//! B and C (`dt_layernorm`, `b_layernorm`, `c_layernorm`); its feed-forward is an MoE iff
//! `i % expert_layer_period == expert_layer_offset` (softmax top-k, weights NOT renormalised;
//! a dense MLP when `num_experts` is 1), else a dense SwiGLU MLP. HF names the mixer `mamba`
//! (moeba `mixer`), the router `feed_forward.router` (moeba `feed_forward.gate`).

use moeba_tensor::{Error, Result};

use super::mixtral::{attention, aux_alpha, head, hidden_act, mlp, no_dropout};
use super::{HfJson, HfWeights};
use crate::attention::AttentionConfig;
use crate::mamba::MambaConfig;
use crate::moe::MoeConfig;
use crate::{BlockConfig, FfnConfig, HybridConfig, MixerConfig};

/// Maps the family's `config.json` onto a [`HybridConfig`].
pub(super) fn config(c: &mut HfJson) -> Result<HybridConfig> {
    hidden_act(c)?;
    no_dropout(c, "attention_dropout")?;
    let vocab_size = c.usize("vocab_size")?;
    let d = c.usize("hidden_size")?;
    let f = c.usize("intermediate_size")?;
    let layers = c.usize("num_hidden_layers")?;
    let heads = c.usize("num_attention_heads")?;
    let kv_heads = c.usize_or("num_key_value_heads", heads)?;
    if heads == 0 || !d.is_multiple_of(heads) {
        return Err(Error::Msg(format!(
            "HF config: `hidden_size` {d} is not a multiple of `num_attention_heads` {heads}"
        )));
    }
    let head_dim = d / heads;
    let norm_eps = c.f64_or("rms_norm_eps", 1e-6)?;
    let tie = c.bool_or("tie_word_embeddings", false)?;
    if let Some(v) = c.raw("sliding_window") {
        return Err(Error::Msg(format!(
            "HF config: `sliding_window` = {v} is not supported for jamba; moeba loads full-attention Jamba only"
        )));
    }
    let attn_period = c.usize_or("attn_layer_period", 8)?;
    let attn_offset = c.usize_or("attn_layer_offset", 4)?;
    let expert_period = c.usize_or("expert_layer_period", 2)?;
    let expert_offset = c.usize_or("expert_layer_offset", 1)?;
    for (key, period, offset) in [
        ("attn_layer_offset", attn_period, attn_offset),
        ("expert_layer_offset", expert_period, expert_offset),
    ] {
        if period == 0 || offset >= period {
            return Err(Error::Msg(format!(
                "HF config: `{key}` = {offset} must be below its period {period} (and the period >= 1)"
            )));
        }
    }
    let experts = c.usize_or("num_experts", 16)?;
    let k = c.usize_or("num_experts_per_tok", 2)?;

    let mut mamba = MambaConfig::new(d);
    mamba.d_state = c.usize_or("mamba_d_state", 16)?;
    mamba.d_conv = c.usize_or("mamba_d_conv", 4)?;
    mamba.expand = c.usize_or("mamba_expand", 2)?;
    mamba.dt_rank = match c.raw("mamba_dt_rank") {
        Some(v) if v.as_str() == Some("auto") => {
            let r = d.div_ceil(16);
            c.note(format!("mamba_dt_rank = \"auto\" -> ceil(hidden_size / 16) = {r}"));
            r
        }
        _ => c.usize_or("mamba_dt_rank", d.div_ceil(16))?,
    };
    mamba.conv_bias = c.bool_or("mamba_conv_bias", true)?;
    mamba.bias = c.bool_or("mamba_proj_bias", false)?;
    mamba.extra_norms = true;
    mamba.norm_eps = norm_eps;

    let is_attn = |i: usize| i % attn_period == attn_offset;
    let is_moe = |i: usize| experts > 1 && i % expert_period == expert_offset;
    let moe_layers = (0..layers).filter(|&i| is_moe(i)).count();
    let lb_alpha = aux_alpha(c, k, moe_layers)?;

    let mut blocks = Vec::with_capacity(layers);
    let mut kinds = Vec::with_capacity(layers);
    for i in 0..layers {
        let mixer = if is_attn(i) {
            let mut a = AttentionConfig::new(d, heads, kv_heads, head_dim);
            a.rope = None;
            MixerConfig::Attention(a)
        } else {
            MixerConfig::Mamba(mamba.clone())
        };
        let ffn = if is_moe(i) {
            let mut moe = MoeConfig::new(d, f, experts, k);
            moe.normalize_topk = false;
            moe.lb_loss_alpha = lb_alpha;
            FfnConfig::Moe(moe)
        } else {
            FfnConfig::Mlp { intermediate_size: f }
        };
        kinds.push(format!(
            "{}+{}",
            if is_attn(i) { "attention" } else { "mamba" },
            if is_moe(i) { "moe" } else { "mlp" }
        ));
        blocks.push(BlockConfig { mixer, ffn });
    }
    c.note(format!(
        "jamba -> layers [{}]; attention without RoPE; Mamba with dt/B/C RMSNorms; MoE top-{k} of {experts} \
         (not renormalised)",
        kinds.join(", ")
    ));
    Ok(HybridConfig { vocab_size, hidden_size: d, blocks, tie_embeddings: tie, norm_eps })
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    w.copy("model.embed_tokens.weight", "model.embed_tokens.weight")?;
    for (i, block) in cfg.blocks.iter().enumerate() {
        let (hf, me) = (format!("model.layers.{i}"), format!("model.layers.{i}"));
        w.copy(&format!("{hf}.input_layernorm.weight"), &format!("{me}.input_layernorm.weight"))?;
        match &block.mixer {
            MixerConfig::Mamba(m) => mamba(w, m, &format!("{hf}.mamba"), &format!("{me}.mixer"))?,
            MixerConfig::Attention(_) => attention(w, &block.mixer, &hf, &me)?,
            _ => return Err(Error::Msg(format!("HF jamba: block {i} has a mixer Jamba lacks"))),
        }
        w.copy(&format!("{hf}.pre_ff_layernorm.weight"), &format!("{me}.pre_ff_layernorm.weight"))?;
        let (src, dst) = (format!("{hf}.feed_forward"), format!("{me}.feed_forward"));
        match &block.ffn {
            FfnConfig::Moe(moe) => {
                w.copy(&format!("{src}.router.weight"), &format!("{dst}.gate.weight"))?;
                w.experts(&src, &dst, moe.num_experts, ["gate_proj", "up_proj", "down_proj"])?;
            }
            FfnConfig::Mlp { .. } => mlp(w, &src, &dst)?,
            #[allow(unreachable_patterns)]
            _ => return Err(Error::Msg(format!("HF jamba: block {i} has a feed-forward Jamba lacks"))),
        }
    }
    w.copy("model.final_layernorm.weight", "model.final_layernorm.weight")?;
    head(w, cfg)
}

/// Copies one Mamba mixer `{hf}.*` (HF `mamba`) to `{me}.*` (moeba `mixer`).
fn mamba(w: &mut HfWeights, m: &MambaConfig, hf: &str, me: &str) -> Result<()> {
    let mut names = vec![
        "in_proj.weight",
        "conv1d.weight",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        "D",
        "out_proj.weight",
        "dt_layernorm.weight",
        "b_layernorm.weight",
        "c_layernorm.weight",
    ];
    if m.conv_bias {
        names.push("conv1d.bias");
    }
    if m.bias {
        names.extend(["in_proj.bias", "out_proj.bias"]);
    }
    for n in names {
        w.copy(&format!("{hf}.{n}"), &format!("{me}.{n}"))?;
    }
    Ok(())
}
