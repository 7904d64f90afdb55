//! The `jamba` fixture: logits, caches (including the prefill Mamba states), per-layer
//! outputs, routing, `aux_loss`, the fused expert layout, the layer pattern, config errors.

use moeba_nn::hf::HfSpec;
use moeba_nn::{FfnConfig, LayerCache, MixerConfig};
use moeba_tensor::{DType, Device, Tensor};
use serde_json::json;

use super::common::*;
use super::mixtral::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("jamba");
    check_logits_and_generation(&fx);
}

#[test]
fn layers_match_transformers() {
    check_layers(&load_fixture("jamba"));
}

#[test]
fn router_decisions_and_aux_loss_match_transformers() {
    check_routing_and_aux_loss(&load_fixture("jamba"));
}

#[test]
fn prefill_states_match_transformers() {
    let fx = load_fixture("jamba");
    let prompt: Vec<u32> = fx.want("generate_prompt").to_dtype(DType::U32).unwrap().to_vec().unwrap();
    let mut cache = fx.model.new_cache(1, prompt.len() + 1).unwrap();
    let ids = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu).unwrap();
    let last = fx.model.prefill(&ids, &mut cache).unwrap();
    let v = fx.spec.config.vocab_size;
    assert_close("prefill_last_logits", &last.reshape((1, v)).unwrap(), fx.want("prefill_last_logits"), 1e-4);
    let mut mamba_layers = 0;
    for (i, layer) in cache.layers.iter().enumerate() {
        if let LayerCache::Mamba(m) = layer {
            assert_close(
                &format!("prefill_conv_state.{i}"),
                &m.conv_state,
                fx.want(&format!("prefill_conv_state.{i}")),
                1e-4,
            );
            assert_close(
                &format!("prefill_ssm_state.{i}"),
                &m.ssm_state,
                fx.want(&format!("prefill_ssm_state.{i}")),
                1e-4,
            );
            mamba_layers += 1;
        }
    }
    assert_eq!(mamba_layers, 3);
}

#[test]
fn fused_expert_layout_loads_bit_identically() {
    let fx = load_fixture("jamba");
    let fused = fuse_experts(&fx, "feed_forward", "feed_forward", ["gate_proj", "up_proj", "down_proj"]);
    assert!(fused.contains_key("model.layers.3.feed_forward.experts.gate_up_proj"));
    check_fused_identical(&fx, &fused);
    check_fused_shape_error(&fx, &fused, "model.layers.1.feed_forward.experts.gate_up_proj");
}

#[test]
fn expert_tensor_errors_name_the_tensor_and_shapes() {
    let fx = load_fixture("jamba");
    check_expert_errors(&fx, "model.layers.3.feed_forward", ["gate_proj", "up_proj", "down_proj"]);
    for gone in ["model.layers.1.feed_forward.router.weight", "model.layers.0.mamba.b_layernorm.weight"] {
        let mut w = fx.weights.clone();
        w.remove(gone);
        let e = load_error(&fx.spec, &w);
        assert!(e.contains(gone), "missing `{gone}` not named: {e}");
    }
    // A RoPE buffer of an old exporter is skipped, not an error.
    let mut w = fx.weights.clone();
    w.insert(
        "model.layers.2.self_attn.rotary_emb.inv_freq".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let (_store, _model, report) = build(&fx.spec, &w);
    assert_eq!(report.skipped.len(), 1);
}

#[test]
fn config_maps_keys_and_rejects_unsupported_values() {
    let fx = load_fixture("jamba");
    let m = fx.spec.mapping.join("\n");
    for key in [
        "attn_layer_period",
        "attn_layer_offset",
        "expert_layer_period",
        "expert_layer_offset",
        "mamba_d_state",
        "mamba_dt_rank",
        "mamba_conv_bias",
        "mamba_proj_bias",
        "num_experts",
    ] {
        assert!(m.contains(key), "mapping lacks `{key}`:\n{m}");
    }
    let kinds = |spec: &HfSpec| -> Vec<String> {
        spec.config
            .blocks
            .iter()
            .map(|b| {
                let mixer = match &b.mixer {
                    MixerConfig::Attention(a) => {
                        assert!(a.rope.is_none() && !a.bias && a.head_dim == 10, "jamba attention {a:?}");
                        "attn"
                    }
                    MixerConfig::Mamba(c) => {
                        assert!(c.extra_norms && c.conv_bias && !c.bias);
                        assert_eq!((c.d_state, c.d_conv, c.expand, c.dt_rank), (12, 4, 2, 3));
                        "mamba"
                    }
                    other => panic!("jamba mixer {other:?}"),
                };
                let ffn = match &b.ffn {
                    FfnConfig::Moe(moe) => {
                        assert!(!moe.normalize_topk && !moe.shared_expert_enabled);
                        "moe"
                    }
                    _ => "mlp",
                };
                format!("{mixer}+{ffn}")
            })
            .collect()
    };
    assert_eq!(kinds(&fx.spec), ["mamba+mlp", "mamba+moe", "attn+mlp", "mamba+moe"]);
    assert!(!fx.spec.config.tie_embeddings);

    let base = config_json("jamba");
    let spec = HfSpec::from_config(&with_key(&base, "mamba_dt_rank", json!("auto"))).unwrap();
    assert_eq!(kinds(&spec), ["mamba+mlp", "mamba+moe", "attn+mlp", "mamba+moe"]);
    let spec = HfSpec::from_config(&with_key(&base, "num_experts", json!(1))).unwrap();
    assert_eq!(kinds(&spec), ["mamba+mlp", "mamba+mlp", "attn+mlp", "mamba+mlp"]);
    let j = with_key(&with_key(&base, "attn_layer_period", json!(2)), "attn_layer_offset", json!(1));
    assert_eq!(kinds(&HfSpec::from_config(&j).unwrap()), ["mamba+mlp", "attn+moe", "mamba+mlp", "attn+moe"]);

    config_error(&base, "hidden_act", json!("gelu"), "hidden_act");
    config_error(&base, "attn_layer_offset", json!(4), "attn_layer_offset");
    config_error(&base, "sliding_window", json!(64), "sliding_window");
    config_error(&base, "mamba_dt_rank", json!("half"), "mamba_dt_rank");
}
