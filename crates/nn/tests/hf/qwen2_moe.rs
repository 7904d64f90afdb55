//! The `qwen2_moe` fixture: logits, caches, per-layer outputs, routing, `aux_loss`, the fused
//! expert layout, the shared expert and its sigmoid gate, dense `mlp_only_layers`, config errors.

use moeba_nn::hf::HfSpec;
use moeba_nn::{FfnConfig, MixerConfig};
use serde_json::json;

use super::common::*;
use super::mixtral::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("qwen2_moe");
    check_logits_and_generation(&fx);
}

#[test]
fn layers_match_transformers() {
    check_layers(&load_fixture("qwen2_moe"));
}

#[test]
fn router_decisions_and_aux_loss_match_transformers() {
    check_routing_and_aux_loss(&load_fixture("qwen2_moe"));
}

#[test]
fn fused_expert_layout_loads_bit_identically() {
    let fx = load_fixture("qwen2_moe");
    let fused = fuse_experts(&fx, "mlp", "mlp", ["gate_proj", "up_proj", "down_proj"]);
    assert!(fused.contains_key("model.layers.2.mlp.experts.down_proj"));
    assert!(!fused.contains_key("model.layers.1.mlp.experts.down_proj"), "layer 1 is dense");
    check_fused_identical(&fx, &fused);
    check_fused_shape_error(&fx, &fused, "model.layers.0.mlp.experts.gate_up_proj");
}

#[test]
fn expert_tensor_errors_name_the_tensor_and_shapes() {
    let fx = load_fixture("qwen2_moe");
    check_expert_errors(&fx, "model.layers.2.mlp", ["gate_proj", "up_proj", "down_proj"]);
    // The shared expert's gate and a q bias are mapped too: dropping either is named.
    for gone in ["model.layers.0.mlp.shared_expert_gate.weight", "model.layers.1.self_attn.q_proj.bias"] {
        let mut w = fx.weights.clone();
        w.remove(gone);
        let e = load_error(&fx.spec, &w);
        assert!(e.contains(gone), "missing `{gone}` not named: {e}");
    }
    // A dense layer's MLP tensor where moeba expects experts is an unexpected tensor.
    let mut w = fx.weights.clone();
    let stray = "model.layers.0.mlp.gate_proj.weight";
    w.insert(stray.into(), fx.weights["model.layers.1.mlp.gate_proj.weight"].clone());
    let e = load_error(&fx.spec, &w);
    assert!(e.contains(stray), "unexpected `{stray}` not named: {e}");
}

#[test]
fn config_maps_keys_and_rejects_unsupported_values() {
    let fx = load_fixture("qwen2_moe");
    let m = fx.spec.mapping.join("\n");
    for key in [
        "num_experts",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "qkv_bias",
        "use_sliding_window",
        "layer_types",
    ] {
        assert!(m.contains(key), "mapping lacks `{key}`:\n{m}");
    }
    let kinds = |spec: &HfSpec| -> Vec<bool> {
        spec.config.blocks.iter().map(|b| matches!(b.ffn, FfnConfig::Moe(_))).collect()
    };
    let windows = |spec: &HfSpec| -> Vec<Option<usize>> {
        spec.config
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                MixerConfig::Attention(a) => a.window,
                other => panic!("qwen2_moe mixer {other:?}"),
            })
            .collect()
    };
    assert_eq!(kinds(&fx.spec), [true, false, true]);
    assert_eq!(windows(&fx.spec), [None, None, None]);
    for b in &fx.spec.config.blocks {
        let MixerConfig::Attention(a) = &b.mixer else { unreachable!() };
        assert!(a.bias && !a.o_bias && a.rope.is_some());
        match &b.ffn {
            FfnConfig::Moe(moe) => {
                assert!(moe.shared_expert_enabled && moe.shared_expert_gate && !moe.normalize_topk);
                assert_eq!(
                    (moe.num_experts, moe.experts_per_tok, moe.d_ff, moe.shared_expert_d_ff),
                    (4, 2, 24, 40)
                );
            }
            FfnConfig::Mlp { intermediate_size } => assert_eq!(*intermediate_size, 64),
            #[allow(unreachable_patterns)]
            other => panic!("qwen2_moe ffn {other:?}"),
        }
    }

    let base = config_json("qwen2_moe");
    // decoder_sparse_step 2, no mlp_only_layers: layers 1 is sparse, 0 and 2 dense.
    let j = with_key(&with_key(&base, "decoder_sparse_step", json!(2)), "mlp_only_layers", json!([]));
    assert_eq!(kinds(&HfSpec::from_config(&j).unwrap()), [false, true, false]);
    // norm_topk_prob renormalises.
    let spec = HfSpec::from_config(&with_key(&base, "norm_topk_prob", json!(true))).unwrap();
    let FfnConfig::Moe(moe) = &spec.config.blocks[0].ffn else { panic!() };
    assert!(moe.normalize_topk);
    // Without layer_types (transformers 5): even layers below max_window_layers slide.
    let mut j = with_key(&base, "use_sliding_window", json!(true));
    j = with_key(&j, "max_window_layers", json!(2));
    j = with_key(&j, "sliding_window", json!(16));
    j.as_object_mut().unwrap().remove("layer_types");
    assert_eq!(windows(&HfSpec::from_config(&j).unwrap()), [Some(16), None, None]);
    let j = with_key(&j, "max_window_layers", json!(28));
    assert_eq!(windows(&HfSpec::from_config(&j).unwrap()), [Some(16), None, Some(16)]);
    // layer_types wins.
    let sliding_first = json!(["sliding_attention", "full_attention", "full_attention"]);
    let j = with_key(&with_key(&base, "sliding_window", json!(8)), "use_sliding_window", json!(true));
    let j = with_key(&j, "layer_types", sliding_first.clone());
    assert_eq!(windows(&HfSpec::from_config(&j).unwrap()), [Some(8), None, None]);
    // A sliding layer while use_sliding_window is false (window 0 in HF) is refused.
    let j = with_key(&with_key(&base, "sliding_window", json!(8)), "layer_types", sliding_first);
    assert!(HfSpec::from_config(&j).unwrap_err().to_string().contains("use_sliding_window"));

    config_error(&base, "hidden_act", json!("gelu"), "hidden_act");
    config_error(&base, "mlp_only_layers", json!([5]), "mlp_only_layers");
    config_error(
        &base,
        "layer_types",
        json!(["full_attention", "chunked_attention", "full_attention"]),
        "layer_types",
    );
    config_error(
        &base,
        "layer_types",
        json!(["sliding_attention", "full_attention", "full_attention"]),
        "sliding_window",
    );
    // An older config: rope_theta at the top level, with a rope_scaling moeba does not implement.
    let mut old = with_key(&base, "rope_theta", json!(1e6));
    old.as_object_mut().unwrap().remove("rope_parameters");
    let spec = HfSpec::from_config(&old).unwrap();
    let MixerConfig::Attention(a) = &spec.config.blocks[0].mixer else { panic!() };
    assert_eq!(a.rope.unwrap().theta, 1e6);
    config_error(&old, "rope_scaling", json!({"type": "linear", "factor": 2.0}), "rope_scaling");
    config_error(&base, "attention_dropout", json!(0.1), "attention_dropout");
}
