//! `model_type = "deepseek_v2"` (DeepseekV2ForCausalLM): config mapping and weight mapping.
//!
//! Every layer is multi-head latent attention ([`crate::mla::Mla`], HF parameter names, RoPE on
//! interleaved pairs whose output stays interleaved, as transformers' complex-number RoPE does,
//! so no weight permutation) followed by a dense SwiGLU MLP (`intermediate_size`) for the first
//! `first_k_dense_replace` layers (and those off the `moe_layer_freq` period), an MoE layer
//! otherwise: `n_routed_experts` routed experts of width `moe_intermediate_size`, top
//! `num_experts_per_tok` by softmax scores with `topk_method` `greedy` or `group_limited_greedy`
//! ([`RoutingKind::GroupLimited`]), weights the un-renormalised softmax probabilities times
//! `routed_scaling_factor`, plus one ungated shared expert `shared_experts` of width
//! `n_shared_experts · moe_intermediate_size`. HF computes no aux loss for this family, so the
//! moeba aux-loss weights are 0.

use moeba_tensor::{Error, Result};

use super::{HfJson, HfWeights};
use crate::attention::RopeConfig;
use crate::hybrid::{BlockConfig, FfnConfig, MixerConfig};
use crate::mla::MlaConfig;
use crate::moe::{MoeConfig, MoeScoreFn, RoutingKind};
use crate::HybridConfig;

/// Epsilon of `kv_a_layernorm` / `q_a_layernorm`: transformers builds them as
/// `DeepseekV2RMSNorm(rank)` with its default eps, not `rms_norm_eps`.
const LATENT_NORM_EPS: f64 = 1e-6;

fn unsupported(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Msg(format!("HF config (deepseek_v2): `{key}` {msg}"))
}

/// Maps the family's `config.json` onto a [`HybridConfig`].
pub(super) fn config(c: &mut HfJson) -> Result<HybridConfig> {
    let vocab_size = c.usize("vocab_size")?;
    let d = c.usize("hidden_size")?;
    let layers = c.usize("num_hidden_layers")?;
    let norm_eps = c.f64_or("rms_norm_eps", 1e-6)?;
    let tie = c.bool_or("tie_word_embeddings", false)?;
    c.expect_str("hidden_act", "silu", &["silu"])?;
    if c.bool_or("attention_bias", false)? {
        return Err(unsupported("attention_bias", "= true is not supported; moeba's MLA has no biases"));
    }
    if c.bool_or("mlp_bias", false)? {
        return Err(unsupported(
            "mlp_bias",
            "= true is not supported; moeba's SwiGLU experts have no biases",
        ));
    }
    for key in ["attention_dropout", "max_position_embeddings", "pretraining_tp"] {
        if c.raw(key).is_some() {
            c.opt_f64(key)?;
        }
    }

    // Multi-head latent attention.
    let num_heads = c.usize("num_attention_heads")?;
    if let Some(kv) = c.opt_usize("num_key_value_heads")? {
        c.note(format!("num_key_value_heads = {kv} -> unused: MLA shares one latent across the heads"));
    }
    let q_latent_dim = c.opt_usize("q_lora_rank")?;
    if q_latent_dim.is_none() {
        c.note("q_lora_rank = null -> a plain self_attn.q_proj");
    }
    let kv_latent_dim = c.usize("kv_lora_rank")?;
    let nope = c.usize("qk_nope_head_dim")?;
    let d_rope = c.usize("qk_rope_head_dim")?;
    let v_head_dim = c.usize("v_head_dim")?;
    if let Some(qk) = c.opt_usize("qk_head_dim")? {
        if qk != nope + d_rope {
            return Err(unsupported(
                "qk_head_dim",
                format!(
                    "= {qk}, but qk_nope_head_dim + qk_rope_head_dim = {nope} + {d_rope} = {}",
                    nope + d_rope
                ),
            ));
        }
    }
    if let Some(hd) = c.opt_usize("head_dim")? {
        // transformers sizes the rotary frequencies by `head_dim`, which it sets to qk_rope_head_dim.
        if hd != d_rope {
            return Err(unsupported(
                "head_dim",
                format!(
                    "= {hd} differs from qk_rope_head_dim = {d_rope}; the RoPE frequencies would not match"
                ),
            ));
        }
    }
    let rope = c.rope(10000.0)?;
    let theta = rope.theta;
    // YaRN's mscale_all_dim changes the softmax scale; without it the default 1/√qk_head_dim stays.
    let scale = rope.mscale_all_dim.map(|_| rope.deepseek_softmax_scale(nope + d_rope));
    let mla = MlaConfig {
        d_model: d,
        num_heads,
        q_latent_dim,
        kv_latent_dim,
        qk_nope_head_dim: nope,
        d_rope,
        v_head_dim,
        rope: RopeConfig::interleaved(theta).with_scaling(rope.scaling),
        norm_eps: LATENT_NORM_EPS,
        softmax_scale: scale,
    };
    let scale_note = match scale {
        Some(s) => format!("{s} (1/sqrt({}) times YaRN's mscale_all_dim correction squared)", nope + d_rope),
        None => format!("1/sqrt({})", nope + d_rope),
    };
    c.note(format!(
        "attention -> MLA on every layer: RoPE on interleaved pairs (base {theta}), softmax scale \
         {scale_note}, latent norms eps {LATENT_NORM_EPS}"
    ));

    // Feed-forward: dense MLP layers, then MoE layers.
    let experts = c.opt_usize("n_routed_experts")?.filter(|&e| e > 0);
    let first_dense = c.usize_or("first_k_dense_replace", 0)?;
    let freq = c.usize_or("moe_layer_freq", 1)?;
    if experts.is_some() && freq == 0 {
        return Err(unsupported("moe_layer_freq", "= 0; it must be >= 1"));
    }
    let is_moe = |i: usize| experts.is_some() && i >= first_dense && i.is_multiple_of(freq.max(1));
    let moe = match experts {
        None => {
            c.note("n_routed_experts = null -> every layer has a dense MLP");
            None
        }
        Some(e) => Some(moe_config(c, d, e)?),
    };
    let intermediate_size =
        if (0..layers).any(|i| !is_moe(i)) { Some(c.usize("intermediate_size")?) } else { None };
    let mut blocks = Vec::with_capacity(layers);
    let (mut dense_layers, mut moe_layers) = (Vec::new(), Vec::new());
    for i in 0..layers {
        let ffn = match (&moe, intermediate_size) {
            (Some(m), _) if is_moe(i) => {
                moe_layers.push(i);
                FfnConfig::Moe(m.clone())
            }
            (_, Some(f)) => {
                dense_layers.push(i);
                FfnConfig::Mlp { intermediate_size: f }
            }
            _ => return Err(unsupported("intermediate_size", "is required for the dense MLP layers")),
        };
        blocks.push(BlockConfig { mixer: MixerConfig::Mla(mla), ffn });
    }
    c.note(format!("dense MLP layers {dense_layers:?}, MoE layers {moe_layers:?}"));
    let cfg = HybridConfig { vocab_size, hidden_size: d, blocks, tie_embeddings: tie, norm_eps };
    cfg.validate()?;
    Ok(cfg)
}

/// The MoE layer of the config (`n_routed_experts = e`).
fn moe_config(c: &mut HfJson, d: usize, e: usize) -> Result<MoeConfig> {
    let f = c.usize("moe_intermediate_size")?;
    let k = c.usize("num_experts_per_tok")?;
    if k == 0 || k > e {
        return Err(unsupported(
            "num_experts_per_tok",
            format!("= {k} must be in 1..={e} (n_routed_experts)"),
        ));
    }
    c.expect_str("scoring_func", "softmax", &["softmax"])?;
    let method = c.expect_str("topk_method", "greedy", &["greedy", "group_limited_greedy"])?;
    let n_group = c.opt_usize("n_group")?;
    let topk_group = c.opt_usize("topk_group")?;
    let strategy = if method == "group_limited_greedy" {
        let g = n_group
            .ok_or_else(|| unsupported("n_group", "is required by topk_method group_limited_greedy"))?;
        let tg = topk_group
            .ok_or_else(|| unsupported("topk_group", "is required by topk_method group_limited_greedy"))?;
        if g == 0 || !e.is_multiple_of(g) {
            return Err(unsupported(
                "n_group",
                format!("= {g} must be >= 1 and divide n_routed_experts = {e}"),
            ));
        }
        if tg == 0 || tg > g {
            return Err(unsupported("topk_group", format!("= {tg} must be in 1..={g} (n_group)")));
        }
        if k > tg * (e / g) {
            return Err(unsupported(
                "num_experts_per_tok",
                format!(
                    "= {k} exceeds the {} experts of topk_group = {tg} groups of {}",
                    tg * (e / g),
                    e / g
                ),
            ));
        }
        c.note(format!(
            "topk_method = group_limited_greedy -> group-limited routing: {g} groups of {} experts, \
             keep the {tg} best (max softmax prob), then top-{k}",
            e / g
        ));
        RoutingKind::GroupLimited { num_groups: g, topk_groups: tg }
    } else {
        c.note(format!("topk_method = greedy -> top-{k} of the softmax probabilities"));
        RoutingKind::TopK
    };
    let scaling = c.f64_or("routed_scaling_factor", 1.0)?;
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(unsupported("routed_scaling_factor", format!("= {scaling} must be finite and > 0")));
    }
    if c.bool_or("norm_topk_prob", false)? {
        c.note("norm_topk_prob = true -> ignored, as transformers' DeepseekV2 router ignores it");
    }
    c.note(format!("routed weights = softmax probs (not renormalised) * routed_scaling_factor {scaling}"));
    for key in ["aux_loss_alpha", "seq_aux"] {
        if c.raw(key).is_some() {
            c.note(format!("{key} -> unused: transformers computes no aux loss for deepseek_v2"));
        }
    }
    let shared = c.usize_or("n_shared_experts", 0)?;
    let mut m = MoeConfig::new(d, f, e, k).with_strategy(strategy);
    m.score = MoeScoreFn::Softmax;
    m.normalize_topk = false;
    m.routed_scaling = scaling;
    m.lb_loss_alpha = 0.0;
    m.z_loss_alpha = 0.0;
    m.usage_var_alpha = 0.0;
    if shared > 0 {
        m = m.with_shared_expert(shared * f, false);
        m.shared_expert_name = "shared_experts".into();
        c.note(format!(
            "n_shared_experts = {shared} -> one ungated shared expert `shared_experts` of width {shared} * {f} = {}",
            shared * f
        ));
    }
    c.note(format!("MoE: {e} experts of width {f}, top-{k}, no aux loss"));
    Ok(m)
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    w.copy("model.embed_tokens.weight", "model.embed_tokens.weight")?;
    for (i, b) in cfg.blocks.iter().enumerate() {
        let (hf, mo) = (format!("model.layers.{i}"), format!("model.layers.{i}"));
        w.copy(&format!("{hf}.input_layernorm.weight"), &format!("{mo}.input_layernorm.weight"))?;
        w.copy(&format!("{hf}.post_attention_layernorm.weight"), &format!("{mo}.pre_ff_layernorm.weight"))?;
        let MixerConfig::Mla(mla) = &b.mixer else {
            return Err(Error::Msg(format!("HF deepseek_v2: block {i} is not MLA")));
        };
        let (a, am) = (format!("{hf}.self_attn"), format!("{mo}.self_attn"));
        w.skip(&format!("{a}.rotary_emb.inv_freq"), "non-persistent RoPE buffer, recomputed by moeba");
        let q: &[&str] =
            if mla.q_latent_dim.is_some() { &["q_a_proj", "q_a_layernorm", "q_b_proj"] } else { &["q_proj"] };
        for p in q.iter().chain(&["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]) {
            w.copy(&format!("{a}.{p}.weight"), &format!("{am}.{p}.weight"))?;
        }
        let (m, fm) = (format!("{hf}.mlp"), format!("{mo}.feed_forward"));
        match &b.ffn {
            FfnConfig::Mlp { .. } => {
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    w.copy(&format!("{m}.{p}.weight"), &format!("{fm}.{p}.weight"))?;
                }
            }
            FfnConfig::Moe(mc) => {
                w.copy(&format!("{m}.gate.weight"), &format!("{fm}.gate.weight"))?;
                w.experts(&m, &fm, mc.num_experts, ["gate_proj", "up_proj", "down_proj"])?;
                if mc.shared_expert_enabled {
                    for p in ["gate_proj", "up_proj", "down_proj"] {
                        w.copy(
                            &format!("{m}.shared_experts.{p}.weight"),
                            &format!("{fm}.shared_experts.{p}.weight"),
                        )?;
                    }
                }
            }
            FfnConfig::None => {}
        }
    }
    w.copy("model.norm.weight", "model.final_layernorm.weight")?;
    if cfg.tie_embeddings {
        w.skip("lm_head.weight", "tied to model.embed_tokens.weight (tie_word_embeddings = true)");
    } else {
        w.copy("lm_head.weight", "lm_head.weight")?;
    }
    Ok(())
}
