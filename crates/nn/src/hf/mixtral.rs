//! `model_type = "mixtral"` (MixtralForCausalLM): config mapping and weight mapping.
//!
//! A Llama-style decoder: `x + attn(input_layernorm(x))` with GQA and rotate-half RoPE, then
//! `x + moe(post_attention_layernorm(x))` with a softmax top-k router whose chosen weights are
//! renormalised. On-disk names (`block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2`)
//! and the transformers-5 in-memory ones (`mlp.gate`, fused `mlp.experts.gate_up_proj /
//! down_proj`) are both accepted.
//!
//! The helpers shared with the other Llama-like families (`qwen2_moe`, `jamba`) live here.

use moeba_tensor::{Error, Result};

use super::{HfJson, HfWeights};
use crate::attention::{AttentionConfig, RopeConfig};
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
    let head_dim = head_dim(c, d, heads)?;
    let experts = c.usize_or("num_local_experts", 8)?;
    let k = c.usize_or("num_experts_per_tok", 2)?;
    let norm_eps = c.f64_or("rms_norm_eps", 1e-5)?;
    let rope = c.rope(1e6)?;
    let window = c.opt_usize("sliding_window")?.filter(|&w| w > 0);
    match window {
        Some(w) => c.note(format!(
            "sliding_window = {w} -> every attention layer sees itself and the {} before",
            w - 1
        )),
        None => c.note("sliding_window = null -> full causal attention"),
    }
    let tie = c.bool_or("tie_word_embeddings", false)?;
    let jitter = c.f64_or("router_jitter_noise", 0.0)?;
    if !(0.0..1.0).contains(&jitter) {
        return Err(Error::Msg(format!(
            "HF config: `router_jitter_noise` = {jitter} is not supported; moeba needs a value in [0, 1)"
        )));
    }
    if jitter > 0.0 {
        c.note(format!(
            "router_jitter_noise = {jitter} -> MoE jitter_noise in training only (moeba scales the router input; \
             HF also scales the experts' input)"
        ));
    }
    let lb_alpha = aux_alpha(c, k, layers)?;
    c.note(format!("mixtral -> {layers} x (attention + MoE top-{k} of {experts}, renormalised)"));

    let mut attn = AttentionConfig::new(d, heads, kv_heads, head_dim);
    attn.rope = Some(RopeConfig::rotate_half(rope.theta).with_scaling(rope.scaling));
    attn.window = window;
    let mut moe = MoeConfig::new(d, f, experts, k);
    moe.normalize_topk = true;
    moe.jitter_noise = jitter;
    moe.lb_loss_alpha = lb_alpha;
    let block = BlockConfig { mixer: MixerConfig::Attention(attn), ffn: FfnConfig::Moe(moe) };
    Ok(HybridConfig {
        vocab_size,
        hidden_size: d,
        blocks: vec![block; layers],
        tie_embeddings: tie,
        norm_eps,
    })
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    w.copy("model.embed_tokens.weight", "model.embed_tokens.weight")?;
    for (i, block) in cfg.blocks.iter().enumerate() {
        let (hf, me) = (format!("model.layers.{i}"), format!("model.layers.{i}"));
        w.copy(&format!("{hf}.input_layernorm.weight"), &format!("{me}.input_layernorm.weight"))?;
        attention(w, &block.mixer, &hf, &me)?;
        w.copy(&format!("{hf}.post_attention_layernorm.weight"), &format!("{me}.pre_ff_layernorm.weight"))?;
        let FfnConfig::Moe(moe) = &block.ffn else {
            return Err(Error::Msg(format!("HF mixtral: block {i} of the config has no MoE feed-forward")));
        };
        // On disk `block_sparse_moe`, in memory (transformers 5) `mlp`.
        let ffn =
            if w.has(&format!("{hf}.mlp.gate.weight")) || w.has(&format!("{hf}.mlp.experts.gate_up_proj")) {
                format!("{hf}.mlp")
            } else {
                format!("{hf}.block_sparse_moe")
            };
        w.copy(&format!("{ffn}.gate.weight"), &format!("{me}.feed_forward.gate.weight"))?;
        w.experts(&ffn, &format!("{me}.feed_forward"), moe.num_experts, ["w1", "w3", "w2"])?;
    }
    w.copy("model.norm.weight", "model.final_layernorm.weight")?;
    head(w, cfg)
}

/// `hidden_act` (default `silu`) must be SiLU: moeba's MLPs and experts are SwiGLU.
pub(super) fn hidden_act(c: &mut HfJson) -> Result<()> {
    c.expect_str("hidden_act", "silu", &["silu", "swish"]).map(|_| ())
}

/// A dropout key must be absent or 0: moeba has no dropout (it would change fine-tuning only).
pub(super) fn no_dropout(c: &mut HfJson, key: &str) -> Result<()> {
    let p = c.f64_or(key, 0.0)?;
    if p != 0.0 {
        return Err(Error::Msg(format!(
            "HF config: `{key}` = {p} is not supported; moeba has no dropout (set it to 0.0)"
        )));
    }
    Ok(())
}

/// `head_dim` (absent or null: `hidden_size / num_attention_heads`).
pub(super) fn head_dim(c: &mut HfJson, d: usize, heads: usize) -> Result<usize> {
    match c.opt_usize("head_dim")? {
        Some(h) => Ok(h),
        None => {
            if heads == 0 || !d.is_multiple_of(heads) {
                return Err(Error::Msg(format!(
                    "HF config: `head_dim` is absent and `hidden_size` {d} is not a multiple of \
                     `num_attention_heads` {heads}"
                )));
            }
            c.note(format!("head_dim = hidden_size / num_attention_heads = {}", d / heads));
            Ok(d / heads)
        }
    }
}

/// The MoE load-balancing weight from `router_aux_loss_coef` and `output_router_logits`.
///
/// HF adds `router_aux_loss_coef · E · Σ_e f_e P_e` (its `load_balancing_loss_func`, `Σ f = k`,
/// pooled over the tokens of every MoE layer) to the training loss only when
/// `output_router_logits` is true. moeba sums one Switch-convention loss (`Σ f = 1`) per MoE
/// layer, so the weight is `coef · k / moe_layers`: the mean of the per-layer HF-convention
/// losses (HF's pooled value when the layers route alike).
pub(super) fn aux_alpha(c: &mut HfJson, k: usize, moe_layers: usize) -> Result<f64> {
    let coef = c.f64_or("router_aux_loss_coef", 0.001)?;
    let on = c.bool_or("output_router_logits", false)?;
    if !(coef.is_finite() && coef >= 0.0) {
        return Err(Error::Msg(format!(
            "HF config: `router_aux_loss_coef` = {coef} must be finite and >= 0"
        )));
    }
    if !on || moe_layers == 0 {
        c.note(
            "load balancing: lb_loss_alpha = 0 (HF adds its aux loss only with output_router_logits = true)",
        );
        return Ok(0.0);
    }
    let alpha = coef * k as f64 / moe_layers as f64;
    c.note(format!(
        "router_aux_loss_coef = {coef} -> lb_loss_alpha = coef * k / moe_layers = {alpha} per MoE layer"
    ));
    Ok(alpha)
}

/// Copies one attention mixer: `{hf}.self_attn.{q,k,v,o}_proj.weight` and the biases the
/// config has, skipping an old exporter's `rotary_emb.inv_freq` buffer.
pub(super) fn attention(w: &mut HfWeights, mixer: &MixerConfig, hf: &str, me: &str) -> Result<()> {
    let MixerConfig::Attention(a) = mixer else {
        return Err(Error::Msg(format!("HF checkpoint: `{me}` is not an attention layer in the config")));
    };
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        w.copy(&format!("{hf}.self_attn.{p}.weight"), &format!("{me}.self_attn.{p}.weight"))?;
        let bias = if p == "o_proj" { a.o_bias } else { a.bias };
        if bias {
            w.copy(&format!("{hf}.self_attn.{p}.bias"), &format!("{me}.self_attn.{p}.bias"))?;
        }
    }
    w.skip(&format!("{hf}.self_attn.rotary_emb.inv_freq"), "non-persistent RoPE buffer, recomputed by moeba");
    Ok(())
}

/// Copies a dense SwiGLU MLP `{hf}.{gate,up,down}_proj.weight` to `{me}.…`.
pub(super) fn mlp(w: &mut HfWeights, hf: &str, me: &str) -> Result<()> {
    for p in ["gate_proj", "up_proj", "down_proj"] {
        w.copy(&format!("{hf}.{p}.weight"), &format!("{me}.{p}.weight"))?;
    }
    Ok(())
}

/// The LM head: `lm_head.weight` when untied; when tied, an exported copy is skipped.
pub(super) fn head(w: &mut HfWeights, cfg: &HybridConfig) -> Result<()> {
    if cfg.tie_embeddings {
        w.skip("lm_head.weight", "tied to model.embed_tokens.weight (tie_word_embeddings)");
        Ok(())
    } else {
        w.copy("lm_head.weight", "lm_head.weight")
    }
}
