//! The `mamba` fixture, and helpers the `mamba2` module shares: per-layer outputs, prefill
//! states, recompute levels and the loader's errors on malformed checkpoints and configs.

use std::collections::HashMap;

use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_nn::hf::{load_weights, HfFamily, HfSpec};
use moeba_nn::mamba::{MambaBlock, MambaConfig};
use moeba_nn::mamba2::Mamba2Block;
use moeba_nn::{
    FfnConfig, ForwardOptions, HybridModel, LayerCache, MixerConfig, ParamStore, Recompute, RmsNorm,
};
use moeba_tensor::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::common::*;

/// The fixture's `config.json`.
pub(crate) fn config_json(family: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture_dir(family).join("config.json")).unwrap()).unwrap()
}

/// The error of mapping `json`, as text (panics when it maps).
pub(crate) fn config_error(json: &Value) -> String {
    match HfSpec::from_config(json) {
        Ok(_) => panic!("the config mapped, expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The error of loading `weights` into a model built from `spec`, as text.
pub(crate) fn load_error(spec: &HfSpec, weights: &HashMap<String, Tensor>) -> String {
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    HybridModel::new(&store.root(), &spec.config).unwrap();
    match load_weights(spec, &store, weights) {
        Ok(_) => panic!("the checkpoint loaded, expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `err` mentions every one of `parts`.
pub(crate) fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not mention `{p}`: {err}");
    }
}

/// Recomputes the residual stream block by block from the loaded parameters (the mixers built
/// again on the same store) and checks `embed_out`, every `layer_out.{i}` and `final_norm_out`.
pub(crate) fn check_layer_outputs(fx: &Fixture) {
    let _g = moeba_autograd::no_grad();
    let cfg = &fx.spec.config;
    let model = fx.store.root().pp("model");
    let embed = fx.store.get("model.embed_tokens.weight").unwrap().tensor();
    let mut x = Var::constant(ops::embedding(&embed, &fx.input_ids()).unwrap());
    assert_close("embed_out", x.tensor(), fx.want("embed_out"), 1e-6);
    for (i, b) in cfg.blocks.iter().enumerate() {
        let lp = model.pp("layers").pp(i);
        let norm = RmsNorm::new(&lp.pp("input_layernorm"), cfg.hidden_size, cfg.norm_eps).unwrap();
        let h = norm.forward(&x).unwrap();
        let mixed = match &b.mixer {
            MixerConfig::Mamba(c) => MambaBlock::new(&lp.pp("mixer"), c).unwrap().forward(&h, None).unwrap(),
            MixerConfig::Mamba2(c) => {
                Mamba2Block::new(&lp.pp("mixer"), c).unwrap().forward(&h, None).unwrap()
            }
            other => panic!("block {i}: unexpected mixer {other:?}"),
        };
        x = x.add(&mixed).unwrap();
        assert_close(&format!("layer_out.{i}"), x.tensor(), fx.want(&format!("layer_out.{i}")), 1e-4);
    }
    let fin = RmsNorm::new(&model.pp("final_layernorm"), cfg.hidden_size, cfg.norm_eps).unwrap();
    assert_close("final_norm_out", fin.forward(&x).unwrap().tensor(), fx.want("final_norm_out"), 1e-4);
    // HF's `loss` (no aux term in these families) is the plain shifted LM loss of the forward.
    let ids = fx.input_ids();
    let l = ids.dims()[1];
    let out = fx.model.forward(&ids.narrow(1, 0, l - 1).unwrap().contiguous().unwrap(), &Default::default());
    let out = out.unwrap();
    assert!(out.aux_loss.is_none());
    let loss = HybridModel::lm_loss(&out.logits, &ids.narrow(1, 1, l - 1).unwrap().contiguous().unwrap());
    assert_close("loss", loss.unwrap().tensor(), fx.want("loss"), 1e-4);
    // The store holds nothing beyond the model's parameters (no pre_ff_layernorm, no FFN).
    assert!(fx
        .store
        .params()
        .iter()
        .all(|p| !p.name().contains("pre_ff") && !p.name().contains("feed_forward")));
}

/// Prefills `generate_prompt` and checks the last logits and every layer's conv and SSM state
/// (through the model's [`LayerCache`]s) against `prefill_*`.
pub(crate) fn check_prefill_states(fx: &Fixture) {
    let prompt = fx.want("generate_prompt").to_dtype(DType::U32).unwrap();
    let mut cache = fx.model.new_cache(1, prompt.dims()[1] + 1).unwrap();
    let last = fx.model.prefill(&prompt, &mut cache).unwrap();
    assert_close("prefill_last_logits", &last, fx.want("prefill_last_logits"), 1e-4);
    assert_eq!(cache.layers.len(), fx.spec.config.blocks.len());
    for (i, lc) in cache.layers.iter().enumerate() {
        let (conv, ssm) = match lc {
            LayerCache::Mamba(c) => (&c.conv_state, &c.ssm_state),
            LayerCache::Mamba2(c) => (&c.conv_state, &c.ssm_state),
            _ => panic!("layer {i}: not a Mamba cache"),
        };
        assert_close(
            &format!("prefill_conv_state.{i}"),
            conv,
            fx.want(&format!("prefill_conv_state.{i}")),
            1e-5,
        );
        assert_close(
            &format!("prefill_ssm_state.{i}"),
            ssm,
            fx.want(&format!("prefill_ssm_state.{i}")),
            1e-4,
        );
    }
}

/// The three recompute levels give the same loss and gradients on the loaded model (blocks
/// without a feed-forward inside `checkpoint`).
pub(crate) fn check_recompute_levels(fx: &Fixture) {
    let ids = fx.input_ids();
    let l = ids.dims()[1];
    let (x, y) = (ids.narrow(1, 0, l - 1).unwrap().contiguous().unwrap(), ids.narrow(1, 1, l - 1).unwrap());
    let y = y.contiguous().unwrap();
    let mut base: Option<(f64, Vec<Vec<f64>>)> = None;
    for level in [Recompute::None, Recompute::Mixer, Recompute::Block] {
        let out = fx.model.forward(&x, &ForwardOptions { recompute: level, ..Default::default() }).unwrap();
        assert!(out.aux_loss.is_none() && out.routing.is_empty(), "{level:?}: no MoE layer expected");
        let loss = HybridModel::lm_loss(&out.logits, &y).unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Vec<f64>> = fx
            .store
            .params()
            .iter()
            .map(|p| grads.get(&p.var()).unwrap_or_else(|| panic!("{level:?}: no gradient for {}", p.name())))
            .map(|g| g.to_vec_f64().unwrap())
            .collect();
        let lv = loss.tensor().to_vec_f64().unwrap()[0];
        match &base {
            None => base = Some((lv, gs)),
            Some((l0, g0)) => {
                assert!((lv - l0).abs() <= 1e-5 * l0.abs(), "{level:?}: loss {lv} vs {l0}");
                for (a, b) in gs.iter().zip(g0) {
                    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
                    let e = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                    assert!(e <= 1e-4 * scale, "{level:?}: gradient differs by {e} (scale {scale})");
                }
            }
        }
    }
}

/// `weights` with `name` replaced by `t` (or removed when `None`).
pub(crate) fn with(
    weights: &HashMap<String, Tensor>,
    name: &str,
    t: Option<Tensor>,
) -> HashMap<String, Tensor> {
    let mut w = weights.clone();
    match t {
        Some(t) => w.insert(name.to_string(), t),
        None => w.remove(name),
    };
    w
}

/// The checkpoint errors every Mamba family must give: a missing tensor, a misshapen one and an
/// unexpected extra one, each named.
pub(crate) fn check_checkpoint_errors(fx: &Fixture) {
    let missing = "backbone.layers.1.mixer.A_log";
    let err = load_error(&fx.spec, &with(&fx.weights, missing, None));
    assert_mentions(&err, &[missing, "missing"]);

    let norm = "backbone.layers.2.norm.weight";
    let err = load_error(&fx.spec, &with(&fx.weights, norm, None));
    assert_mentions(&err, &[norm]);

    let name = "backbone.layers.0.mixer.out_proj.weight";
    let good = fx.weights[name].dims().to_vec();
    let bad = vec![good[0], good[1] + 1];
    let t = Tensor::zeros(bad.as_slice(), DType::F32, &Device::Cpu).unwrap();
    let err = load_error(&fx.spec, &with(&fx.weights, name, Some(t)));
    assert_mentions(&err, &[name, &format!("{bad:?}"), &format!("{good:?}")]);

    let extra = "backbone.layers.0.mixer.bogus.weight";
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let err = load_error(&fx.spec, &with(&fx.weights, extra, Some(t)));
    assert_mentions(&err, &[extra, "unexpected"]);

    // A layer beyond num_hidden_layers is unexpected too.
    let mut w = fx.weights.clone();
    let n = fx.spec.config.blocks.len();
    for (k, v) in &fx.weights {
        if let Some(rest) = k.strip_prefix("backbone.layers.0.") {
            w.insert(format!("backbone.layers.{n}.{rest}"), v.clone());
        }
    }
    let err = load_error(&fx.spec, &w);
    assert_mentions(&err, &[&format!("backbone.layers.{n}."), "unexpected"]);

    // f16/bf16 checkpoints convert on read.
    let half: HashMap<String, Tensor> =
        fx.weights.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap())).collect();
    let (_, model, _) = build(&fx.spec, &half);
    let got = logits(&model, &fx.input_ids());
    assert!(rel_err(&got, fx.want("logits")) < 5e-2, "bf16 weights give far-off logits");
}

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("mamba");
    check_logits_and_generation(&fx);
}

#[test]
fn config_maps_every_size() {
    let fx = load_fixture("mamba");
    let spec = &fx.spec;
    assert_eq!(spec.family, HfFamily::Mamba);
    let cfg = &spec.config;
    assert_eq!((cfg.vocab_size, cfg.hidden_size, cfg.blocks.len()), (160, 40, 3));
    assert!(cfg.tie_embeddings);
    assert_eq!(cfg.norm_eps, 1e-5);
    let want = MambaConfig {
        d_state: 12,
        d_conv: 4,
        expand: 2,
        dt_rank: 3,
        conv_bias: true,
        bias: false,
        dt_min: 0.001,
        dt_max: 0.1,
        dt_init_floor: 1e-4,
        extra_norms: false,
        norm_eps: 1e-5,
        ..MambaConfig::new(40)
    };
    for b in &cfg.blocks {
        assert_eq!(b.mixer, MixerConfig::Mamba(want.clone()));
        assert_eq!(b.ffn, FfnConfig::None);
    }
    assert_eq!(spec.bos_token_id, Some(0));
    assert_eq!(spec.eos_token_ids, vec![0]);
    for key in ["hidden_size = 40", "state_size = 12", "time_step_rank = 3", "intermediate_size = 80"] {
        assert!(spec.mapping.iter().any(|m| m == key), "mapping lacks `{key}`: {:?}", spec.mapping);
    }
    // NOTES.md: 47120 parameters (the tied head counted once).
    assert_eq!(fx.model.param_counts().total, 47120);
    assert_eq!(fx.store.num_elements(), 47120);
    // Every tensor read, none skipped (the tied head is not on disk).
    assert_eq!(fx.report.tensors_read, fx.weights.len());
    assert_eq!(fx.report.params_set, fx.store.params().len());
    assert!(fx.report.skipped.is_empty());
}

#[test]
fn layer_outputs_match_transformers() {
    check_layer_outputs(&load_fixture("mamba"));
}

#[test]
fn prefill_states_match_transformers() {
    check_prefill_states(&load_fixture("mamba"));
}

#[test]
fn recompute_levels_agree_without_feed_forward() {
    check_recompute_levels(&load_fixture("mamba"));
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    check_checkpoint_errors(&load_fixture("mamba"));
}

#[test]
fn tied_head_on_disk_is_skipped_when_equal_and_refused_when_different() {
    let fx = load_fixture("mamba");
    let emb = fx.weights["backbone.embeddings.weight"].clone();
    let (_, model, report) = build(&fx.spec, &with(&fx.weights, "lm_head.weight", Some(emb.clone())));
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].0, "lm_head.weight");
    assert_close("logits", &logits(&model, &fx.input_ids()), fx.want("logits"), 1e-4);

    let other = ops::add(&emb, &Tensor::full(0.5, emb.dims(), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let err = load_error(&fx.spec, &with(&fx.weights, "lm_head.weight", Some(other)));
    assert_mentions(&err, &["lm_head.weight", "backbone.embeddings.weight", "tie_word_embeddings"]);

    // Untied: the head must be on disk.
    let mut json = config_json("mamba");
    json["tie_word_embeddings"] = json!(false);
    let spec = HfSpec::from_config(&json).unwrap();
    assert!(!spec.config.tie_embeddings);
    let err = load_error(&spec, &fx.weights);
    assert_mentions(&err, &["lm_head.weight", "missing"]);
    let (_, model, _) = build(&spec, &with(&fx.weights, "lm_head.weight", Some(emb)));
    assert_close("untied logits", &logits(&model, &fx.input_ids()), fx.want("logits"), 1e-4);
}

#[test]
fn original_embedding_name_is_accepted() {
    let fx = load_fixture("mamba");
    let mut w = fx.weights.clone();
    let e = w.remove("backbone.embeddings.weight").unwrap();
    w.insert("backbone.embedding.weight".into(), e);
    let (_, model, _) = build(&fx.spec, &w);
    assert_close("logits", &logits(&model, &fx.input_ids()), fx.want("logits"), 1e-4);
}

#[test]
fn bias_keys_decide_which_tensors_are_expected() {
    let fx = load_fixture("mamba");
    // use_conv_bias = false: the checkpoint's conv biases are unexpected.
    let mut json = config_json("mamba");
    json["use_conv_bias"] = json!(false);
    let spec = HfSpec::from_config(&json).unwrap();
    let err = load_error(&spec, &fx.weights);
    assert_mentions(&err, &["backbone.layers.0.mixer.conv1d.bias", "unexpected"]);
    // use_bias = true: in_proj / out_proj biases are required.
    let mut json = config_json("mamba");
    json["use_bias"] = json!(true);
    let spec = HfSpec::from_config(&json).unwrap();
    let err = load_error(&spec, &fx.weights);
    assert_mentions(&err, &["backbone.layers.0.mixer.in_proj.bias", "missing"]);
    // ... and used when present (zero biases: same logits).
    let mut w = fx.weights.clone();
    for i in 0..3 {
        for (n, len) in [("in_proj", 160), ("out_proj", 40)] {
            w.insert(
                format!("backbone.layers.{i}.mixer.{n}.bias"),
                Tensor::zeros(len, DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    let (_, model, _) = build(&spec, &w);
    assert_close("logits with zero biases", &logits(&model, &fx.input_ids()), fx.want("logits"), 1e-4);
}

#[test]
fn config_errors_name_the_key() {
    let base = config_json("mamba");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("hidden_act", json!("gelu"), "hidden_act"),
        ("intermediate_size", json!(70), "intermediate_size"),
        ("state_size", json!("twelve"), "state_size"),
        ("time_step_rank", json!(-1), "time_step_rank"),
        ("time_step_min", json!(0.0), "time_step_min"),
        ("layer_norm_epsilon", json!(0.0), "layer_norm_epsilon"),
        ("tie_word_embeddings", json!("yes"), "tie_word_embeddings"),
        ("use_conv_bias", json!(1), "use_conv_bias"),
    ];
    for (key, v, named) in cases {
        let mut j = base.clone();
        j[key] = v;
        assert_mentions(&config_error(&j), &[named]);
    }
    let mut j = base.clone();
    j.as_object_mut().unwrap().remove("hidden_size");
    assert_mentions(&config_error(&j), &["hidden_size", "missing"]);
    // time_step_rank "auto" is ceil(hidden / 16).
    let mut j = base.clone();
    j["time_step_rank"] = json!("auto");
    let spec = HfSpec::from_config(&j).unwrap();
    let MixerConfig::Mamba(m) = &spec.config.blocks[0].mixer else { panic!("not mamba") };
    assert_eq!(m.dt_rank, 3);
    // intermediate_size absent: expand · hidden_size.
    let mut j = base;
    j.as_object_mut().unwrap().remove("intermediate_size");
    j["expand"] = json!(3);
    let spec = HfSpec::from_config(&j).unwrap();
    let MixerConfig::Mamba(m) = &spec.config.blocks[0].mixer else { panic!("not mamba") };
    assert_eq!(m.d_inner(), 120);
}
