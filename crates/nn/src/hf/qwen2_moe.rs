//! `model_type = "qwen2_moe"` (Qwen2MoeForCausalLM): config mapping and weight mapping.
//!
//! A Qwen2 decoder (q/k/v biases, o_proj without) whose feed-forward is, per layer, either a
//! dense SwiGLU MLP (`mlp_only_layers`, or off the `decoder_sparse_step` grid) or a softmax
//! top-k MoE (renormalised only with `norm_topk_prob`) plus a shared SwiGLU expert scaled by
//! `sigmoid(shared_expert_gate(x))`. Names: `mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`
//! (or the fused `mlp.experts.gate_up_proj / down_proj`), `mlp.shared_expert.*`,
//! `mlp.shared_expert_gate.weight`.

use moeba_tensor::{Error, Result};

use super::mixtral::{attention, aux_alpha, head, head_dim, hidden_act, mlp, no_dropout};
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
    let norm_eps = c.f64_or("rms_norm_eps", 1e-6)?;
    let rope = c.rope(10000.0)?;
    let qkv_bias = c.bool_or("qkv_bias", true)?;
    let tie = c.bool_or("tie_word_embeddings", false)?;

    let experts = c.usize_or("num_experts", 60)?;
    let k = c.usize_or("num_experts_per_tok", 4)?;
    let moe_f = c.usize_or("moe_intermediate_size", 1408)?;
    let shared_f = c.usize_or("shared_expert_intermediate_size", 5632)?;
    let norm_topk = c.bool_or("norm_topk_prob", false)?;
    let step = c.usize_or("decoder_sparse_step", 1)?;
    let mlp_only = c.usize_list("mlp_only_layers")?;
    if let Some(&bad) = mlp_only.iter().find(|&&i| i >= layers) {
        return Err(Error::Msg(format!(
            "HF config: `mlp_only_layers` names layer {bad}, but `num_hidden_layers` is {layers}"
        )));
    }
    if experts > 0 && step == 0 {
        return Err(Error::Msg(
            "HF config: `decoder_sparse_step` = 0 is not supported (must be >= 1)".into(),
        ));
    }
    if experts > 0 && shared_f == 0 {
        return Err(Error::Msg(
            "HF config: `shared_expert_intermediate_size` = 0 is not supported; Qwen2-MoE's shared expert needs a \
             width >= 1"
                .into(),
        ));
    }
    // Qwen2-MoE: layer i is sparse iff it is not in mlp_only_layers and (i + 1) % step == 0.
    let sparse: Vec<bool> =
        (0..layers).map(|i| experts > 0 && !mlp_only.contains(&i) && (i + 1).is_multiple_of(step)).collect();
    let moe_layers = sparse.iter().filter(|&&s| s).count();
    let lb_alpha = aux_alpha(c, k, moe_layers)?;
    let windows = sliding_windows(c, layers)?;

    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let mut attn = AttentionConfig::new(d, heads, kv_heads, head_dim);
        attn.rope = Some(RopeConfig::rotate_half(rope.theta).with_scaling(rope.scaling));
        attn.bias = qkv_bias;
        attn.o_bias = false;
        attn.window = windows[i];
        let ffn = if sparse[i] {
            let mut moe = MoeConfig::new(d, moe_f, experts, k).with_shared_expert(shared_f, true);
            moe.normalize_topk = norm_topk;
            moe.lb_loss_alpha = lb_alpha;
            FfnConfig::Moe(moe)
        } else {
            FfnConfig::Mlp { intermediate_size: f }
        };
        blocks.push(BlockConfig { mixer: MixerConfig::Attention(attn), ffn });
    }
    let kinds: Vec<&str> = sparse.iter().map(|&s| if s { "moe" } else { "mlp" }).collect();
    c.note(format!(
        "qwen2_moe -> {layers} x attention (qkv bias {qkv_bias}), FFN per layer [{}]: MoE top-{k} of {experts} \
         ({}) + sigmoid-gated shared expert {shared_f}, dense MLP {f}",
        kinds.join(", "),
        if norm_topk { "renormalised" } else { "not renormalised" }
    ));
    Ok(HybridConfig { vocab_size, hidden_size: d, blocks, tie_embeddings: tie, norm_eps })
}

/// Each layer's sliding window, as transformers 5 derives it: `layer_types` when present
/// (`sliding_attention` gets `sliding_window`), else layer `i` slides iff `use_sliding_window`,
/// `i` is even and `i < max_window_layers`. Without `use_sliding_window` the window is 0, so a
/// `sliding_attention` layer is then an error.
fn sliding_windows(c: &mut HfJson, layers: usize) -> Result<Vec<Option<usize>>> {
    let use_sw = c.bool_or("use_sliding_window", false)?;
    let max_window_layers = c.usize_or("max_window_layers", 28)?;
    let types: Option<Vec<String>> = match c.raw("layer_types") {
        None => None,
        Some(v) => {
            let arr = v.as_array().filter(|a| a.len() == layers).ok_or_else(|| {
                Error::Msg(format!("HF config: `layer_types` = {v} must be a list of {layers} strings"))
            })?;
            let t = arr
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        Error::Msg(format!(
                            "HF config: `layer_types` = {v} must be a list of {layers} strings"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            c.note(format!("layer_types = {v}"));
            Some(t)
        }
    };
    let sliding: Vec<bool> = match &types {
        Some(t) => t
            .iter()
            .map(|s| match s.as_str() {
                "full_attention" => Ok(false),
                "sliding_attention" => Ok(true),
                other => Err(Error::Msg(format!(
                    "HF config: `layer_types` entry \"{other}\" is not supported; moeba supports \
                     \"full_attention\", \"sliding_attention\""
                ))),
            })
            .collect::<Result<Vec<_>>>()?,
        None => (0..layers).map(|i| use_sw && i.is_multiple_of(2) && i < max_window_layers).collect(),
    };
    if !sliding.iter().any(|&s| s) {
        // The key is present but unused (Qwen2-MoE writes sliding_window even when it is off).
        let _ = c.raw("sliding_window");
        return Ok(vec![None; layers]);
    }
    let w =
        match c.opt_usize("sliding_window")? {
            Some(w) if w > 0 && use_sw => w,
            _ => return Err(Error::Msg(
                "HF config: a layer uses sliding-window attention but `sliding_window` is absent or 0, or \
                 `use_sliding_window` is false (which makes it 0)"
                    .into(),
            )),
        };
    c.note(format!("sliding_window = {w} -> window of the sliding_attention layers"));
    Ok(sliding.into_iter().map(|s| s.then_some(w)).collect())
}

/// Loads the family's tensors into a model built from `cfg`.
pub(super) fn load(cfg: &HybridConfig, w: &mut HfWeights) -> Result<()> {
    w.copy("model.embed_tokens.weight", "model.embed_tokens.weight")?;
    for (i, block) in cfg.blocks.iter().enumerate() {
        let (hf, me) = (format!("model.layers.{i}"), format!("model.layers.{i}"));
        w.copy(&format!("{hf}.input_layernorm.weight"), &format!("{me}.input_layernorm.weight"))?;
        attention(w, &block.mixer, &hf, &me)?;
        w.copy(&format!("{hf}.post_attention_layernorm.weight"), &format!("{me}.pre_ff_layernorm.weight"))?;
        let (src, dst) = (format!("{hf}.mlp"), format!("{me}.feed_forward"));
        match &block.ffn {
            FfnConfig::Moe(moe) => {
                w.copy(&format!("{src}.gate.weight"), &format!("{dst}.gate.weight"))?;
                w.experts(&src, &dst, moe.num_experts, ["gate_proj", "up_proj", "down_proj"])?;
                mlp(w, &format!("{src}.shared_expert"), &format!("{dst}.{}", moe.shared_expert_name))?;
                w.copy(
                    &format!("{src}.shared_expert_gate.weight"),
                    &format!("{dst}.shared_expert_gate.weight"),
                )?;
            }
            FfnConfig::Mlp { .. } => mlp(w, &src, &dst)?,
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::Msg(format!("HF qwen2_moe: block {i} has a feed-forward Qwen2-MoE lacks")))
            }
        }
    }
    w.copy("model.norm.weight", "model.final_layernorm.weight")?;
    head(w, cfg)
}
