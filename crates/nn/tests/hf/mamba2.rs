//! The `mamba2` fixture: logits, generation, per-layer outputs, prefill states, recompute levels
//! and the loader's errors (helpers shared with the `mamba` module).

use std::collections::HashMap;

use moeba_nn::hf::{HfFamily, HfSpec};
use moeba_nn::mamba2::Mamba2Config;
use moeba_nn::{FfnConfig, MixerConfig};
use moeba_tensor::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::common::*;
use super::mamba::{
    assert_mentions, check_checkpoint_errors, check_layer_outputs, check_prefill_states,
    check_recompute_levels, config_error, config_json, load_error, with,
};

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("mamba2");
    check_logits_and_generation(&fx);
}

#[test]
fn config_maps_every_size() {
    let fx = load_fixture("mamba2");
    let spec = &fx.spec;
    assert_eq!(spec.family, HfFamily::Mamba2);
    let cfg = &spec.config;
    assert_eq!((cfg.vocab_size, cfg.hidden_size, cfg.blocks.len()), (192, 48, 3));
    assert!(!cfg.tie_embeddings);
    assert_eq!(cfg.norm_eps, 1e-5);
    let want = Mamba2Config {
        d_state: 12,
        d_conv: 4,
        expand: 2,
        head_dim: 16,
        num_heads: 6,
        n_groups: 1,
        chunk_size: 16,
        conv_bias: true,
        bias: false,
        dt_min: 0.001,
        dt_max: 0.1,
        dt_init_floor: 1e-4,
        norm_eps: 1e-5,
        ..Mamba2Config::new(48)
    };
    for b in &cfg.blocks {
        assert_eq!(b.mixer, MixerConfig::Mamba2(want.clone()));
        assert_eq!(b.ffn, FfnConfig::None);
    }
    assert_eq!(spec.eos_token_ids, vec![2]);
    for key in ["num_heads = 6", "head_dim = 16", "n_groups = 1", "chunk_size = 16"] {
        assert!(spec.mapping.iter().any(|m| m == key), "mapping lacks `{key}`: {:?}", spec.mapping);
    }
    assert!(spec.mapping.iter().any(|m| m.starts_with("time_step_limit")), "{:?}", spec.mapping);
    // NOTES.md: 66558 parameters (untied head included).
    assert_eq!(fx.model.param_counts().total, 66558);
    assert_eq!(fx.store.num_elements(), 66558);
    assert_eq!(fx.report.tensors_read, fx.weights.len());
    assert_eq!(fx.report.params_set, fx.store.params().len());
    assert!(fx.report.skipped.is_empty());
}

#[test]
fn layer_outputs_match_transformers() {
    check_layer_outputs(&load_fixture("mamba2"));
}

#[test]
fn prefill_states_match_transformers() {
    check_prefill_states(&load_fixture("mamba2"));
}

#[test]
fn recompute_levels_agree_without_feed_forward() {
    check_recompute_levels(&load_fixture("mamba2"));
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let fx = load_fixture("mamba2");
    check_checkpoint_errors(&fx);
    // Mamba-2 specific tensors.
    for name in ["backbone.layers.0.mixer.dt_bias", "backbone.layers.2.mixer.norm.weight", "lm_head.weight"] {
        let err = load_error(&fx.spec, &with(&fx.weights, name, None));
        assert_mentions(&err, &[name, "missing"]);
    }
}

#[test]
fn tied_config_accepts_an_equal_head_and_refuses_a_different_one() {
    let fx = load_fixture("mamba2");
    let mut json = config_json("mamba2");
    json["tie_word_embeddings"] = json!(true);
    let spec = HfSpec::from_config(&json).unwrap();
    assert!(spec.config.tie_embeddings);
    // The fixture's head differs from its embedding.
    let err = load_error(&spec, &fx.weights);
    assert_mentions(&err, &["lm_head.weight", "differs", "backbone.embeddings.weight"]);
    // A head equal to the embedding is skipped; absent is fine too.
    let emb = fx.weights["backbone.embeddings.weight"].clone();
    let (_, _, report) = build(&spec, &with(&fx.weights, "lm_head.weight", Some(emb)));
    assert_eq!(report.skipped.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), ["lm_head.weight"]);
    let (_, _, report) = build(&spec, &with(&fx.weights, "lm_head.weight", None));
    assert!(report.skipped.is_empty());
}

#[test]
fn time_step_limit_forms() {
    let base = config_json("mamba2");
    // No clamp in effect: accepted, in every spelling.
    for v in
        [json!([0.0, {"__float__": "Infinity"}]), json!([0.0, "Infinity"]), json!([-1, "inf"]), Value::Null]
    {
        let mut j = base.clone();
        j["time_step_limit"] = v.clone();
        HfSpec::from_config(&j).unwrap_or_else(|e| panic!("time_step_limit {v}: {e}"));
    }
    let mut j = base.clone();
    j.as_object_mut().unwrap().remove("time_step_limit");
    HfSpec::from_config(&j).unwrap();
    // A clamp moeba does not apply: refused, naming the key.
    for v in [json!([0.0, 0.1]), json!([0.001, {"__float__": "Infinity"}]), json!([0.0]), json!("wide")] {
        let mut j = base.clone();
        j["time_step_limit"] = v;
        assert_mentions(&config_error(&j), &["time_step_limit"]);
    }
}

#[test]
fn config_errors_name_the_key() {
    let base = config_json("mamba2");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("hidden_act", json!("relu"), "hidden_act"),
        ("num_heads", json!(5), "num_heads"),
        ("head_dim", json!(12), "head_dim"),
        ("n_groups", json!(4), "n_groups"),
        ("chunk_size", json!(0), "chunk_size"),
        ("rms_norm", json!(false), "rms_norm"),
        ("norm_before_gate", json!(true), "norm_before_gate"),
        ("use_bias", json!("no"), "use_bias"),
        ("time_step_max", json!(0.0001), "time_step_max"),
    ];
    for (key, v, named) in cases {
        let mut j = base.clone();
        j[key] = v;
        assert_mentions(&config_error(&j), &[named]);
    }
    // n_groups = 2 (a divisor of the 6 heads) maps: the gated norm then has groups of 48.
    let mut j = base.clone();
    j["n_groups"] = json!(2);
    let spec = HfSpec::from_config(&j).unwrap();
    let MixerConfig::Mamba2(m) = &spec.config.blocks[0].mixer else { panic!("not mamba2") };
    assert_eq!((m.n_groups, m.d_inner() / m.n_groups, m.conv_dim()), (2, 48, 96 + 2 * 2 * 12));
    // ... and the fixture's in_proj / conv1d are then the wrong shape, named with both shapes.
    let fx = load_fixture("mamba2");
    let err = load_error(&spec, &fx.weights);
    assert_mentions(&err, &["backbone.layers.0.mixer.in_proj.weight", "[222, 48]", "[246, 48]"]);
}

/// A tensor of `w` as f64 values.
fn vals(w: &HashMap<String, Tensor>, name: &str) -> Vec<f64> {
    w.get(name).unwrap_or_else(|| panic!("no `{name}`")).to_vec_f64().unwrap()
}

/// `x (n, i) · w (o, i)ᵀ`.
fn lin(x: &[f64], w: &[f64], i: usize) -> Vec<f64> {
    let (n, o) = (x.len() / i, w.len() / i);
    let mut y = vec![0.0; n * o];
    for r in 0..n {
        for c in 0..o {
            y[r * o + c] = (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum();
        }
    }
    y
}

/// RMSNorm of every `dim`-row of `x`, times `w`.
fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let dim = w.len();
    x.chunks(dim)
        .flat_map(|r| {
            let s = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
            r.iter().zip(w).map(move |(v, g)| v * s * g)
        })
        .collect()
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// An independent float64 Mamba2ForCausalLM, written from NOTES.md and reference_models.py
/// (sequential recurrence, no chunking): logits `(L, V)` of one sequence.
fn reference_logits(w: &HashMap<String, Tensor>, c: &Value, ids: &[usize]) -> Vec<f64> {
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (d, layers, eps) =
        (u("hidden_size"), u("num_hidden_layers"), c["layer_norm_epsilon"].as_f64().unwrap());
    let (hh, p, g, n) = (u("num_heads"), u("head_dim"), u("n_groups"), u("state_size"));
    let (di, l) = (hh * p, ids.len());
    let cd = di + 2 * g * n;
    let emb = vals(w, "backbone.embeddings.weight");
    let mut h: Vec<f64> = ids.iter().flat_map(|&t| emb[t * d..(t + 1) * d].to_vec()).collect();
    for i in 0..layers {
        let pre = format!("backbone.layers.{i}.mixer.");
        let m = |s: &str| vals(w, &format!("{pre}{s}"));
        let hn = rms(&h, &vals(w, &format!("backbone.layers.{i}.norm.weight")), eps);
        let zx = lin(&hn, &m("in_proj.weight"), d);
        let width = di + cd + hh;
        let (cw, cb) = (m("conv1d.weight"), m("conv1d.bias"));
        let k = cw.len() / cd;
        let mut xbc = vec![0.0; l * cd];
        for t in 0..l {
            for ch in 0..cd {
                let mut acc = cb[ch];
                for j in 0..k {
                    if let Some(src) = (t + j).checked_sub(k - 1) {
                        acc += cw[ch * k + j] * zx[src * width + di + ch];
                    }
                }
                xbc[t * cd + ch] = silu(acc);
            }
        }
        let (a_log, dsk, dtb, nw) = (m("A_log"), m("D"), m("dt_bias"), m("norm.weight"));
        let mut s = vec![0.0; hh * p * n];
        let mut y = vec![0.0; l * di];
        for t in 0..l {
            let row = &xbc[t * cd..(t + 1) * cd];
            for hi in 0..hh {
                let gi = hi / (hh / g);
                let raw = zx[t * width + di + cd + hi] + dtb[hi];
                let dt = if raw > 20.0 { raw } else { raw.exp().ln_1p() };
                let decay = (-dt * a_log[hi].exp()).exp();
                for pi in 0..p {
                    let xv = row[hi * p + pi];
                    let mut acc = dsk[hi] * xv;
                    for ni in 0..n {
                        let st = &mut s[(hi * p + pi) * n + ni];
                        *st = decay * *st + dt * xv * row[di + gi * n + ni];
                        acc += *st * row[di + g * n + gi * n + ni];
                    }
                    y[t * di + hi * p + pi] = acc * silu(zx[t * width + hi * p + pi]);
                }
            }
        }
        // Gated RMSNorm over groups of di / g (the gate was applied above).
        let gs = di / g;
        let ones = vec![1.0; gs];
        let normed: Vec<f64> = rms(&y, &ones, eps).iter().enumerate().map(|(j, v)| v * nw[j % di]).collect();
        let out = lin(&normed, &m("out_proj.weight"), di);
        h.iter_mut().zip(out).for_each(|(a, b)| *a += b);
    }
    let hf = rms(&h, &vals(w, "backbone.norm_f.weight"), eps);
    let head = if w.contains_key("lm_head.weight") { vals(w, "lm_head.weight") } else { emb };
    lin(&hf, &head, d)
}

/// The reference logits of every row of `ids (b, l)` as a `(b, l, V)` tensor.
fn reference(w: &HashMap<String, Tensor>, c: &Value, ids: &Tensor) -> Tensor {
    let (b, l) = (ids.dims()[0], ids.dims()[1]);
    let all: Vec<u32> = ids.to_vec().unwrap();
    let out: Vec<f64> = all
        .chunks(l)
        .flat_map(|row| reference_logits(w, c, &row.iter().map(|&t| t as usize).collect::<Vec<_>>()))
        .collect();
    let v = out.len() / (b * l);
    Tensor::from_vec(out, (b, l, v), &Device::Cpu).unwrap()
}

/// The gated norm's groups and the heads' B/C groups with `n_groups` = 2 and 3 (the fixture has
/// 1): moeba against the float64 reference above (itself checked on the fixture), on the
/// fixture's weights with fresh random in_proj / conv1d of the larger shapes.
#[test]
fn several_groups_match_an_independent_reference() {
    let fx = load_fixture("mamba2");
    let ids = fx.input_ids().narrow(1, 0, 21).unwrap().contiguous().unwrap();
    let json = config_json("mamba2");
    let want = fx.want("logits").narrow(1, 0, 21).unwrap();
    assert_close("reference on the fixture", &reference(&fx.weights, &json, &ids), &want, 1e-6);
    for g in [2usize, 3] {
        let mut j = json.clone();
        j["n_groups"] = json!(g);
        let spec = HfSpec::from_config(&j).unwrap();
        let mut w = fx.weights.clone();
        let cd = 96 + 2 * g * 12;
        for i in 0..3 {
            let p = format!("backbone.layers.{i}.mixer.");
            let seed = 100 + (10 * g + i) as u64;
            let mk = |s: u64, shape: Vec<usize>, std: f64| {
                Tensor::randn(s, shape.as_slice(), 0.0, std, DType::F32, &Device::Cpu).unwrap()
            };
            w.insert(format!("{p}in_proj.weight"), mk(seed, vec![96 + cd + 6, 48], 0.1));
            w.insert(format!("{p}conv1d.weight"), mk(seed + 1, vec![cd, 1, 4], 0.3));
            w.insert(format!("{p}conv1d.bias"), mk(seed + 2, vec![cd], 0.1));
        }
        let (_, model, _) = build(&spec, &w);
        let got = logits(&model, &ids);
        assert_close(&format!("logits with n_groups {g}"), &got, &reference(&w, &j, &ids), 1e-4);
        // Caches: greedy decoding reproduces the no-cache argmax.
        let prompt: Vec<u32> =
            ids.narrow(0, 0, 1).unwrap().narrow(1, 0, 9).unwrap().contiguous().unwrap().to_vec().unwrap();
        let (out, step_logits) = greedy(&model, &prompt, 6);
        let full = logits(&model, &Tensor::from_vec(out.clone(), (1, out.len()), &Device::Cpu).unwrap());
        let last = full.narrow(1, prompt.len() - 1, 6).unwrap().squeeze(0).unwrap().contiguous().unwrap();
        assert_close(&format!("cached step logits with n_groups {g}"), &step_logits, &last, 1e-4);
    }
}
