//! The `deepseek_v2` fixture (MLA with a plain q_proj, interleaved RoPE, dense + MoE layers with
//! group-limited routing and shared experts), its config mapping and errors, and the
//! group-limited routing against a plain reference.

use std::collections::HashMap;

use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_kernels::ops::{MoeScoreFn, TopkGatingOptions};
use moeba_nn::hf::{load_weights, HfSpec};
use moeba_nn::moe::strategy::group_limited_gating;
use moeba_nn::moe::{MoeConfig, MoeContext, MoeLayer, RoutingKind};
use moeba_nn::{FfnConfig, ForwardOptions, MixerConfig, ParamStore};
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

use super::common::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("deepseek_v2");
    check_logits_and_generation(&fx);
}

#[test]
fn config_maps_mla_dense_and_group_limited_moe_layers() {
    let fx = load_fixture("deepseek_v2");
    let cfg = &fx.spec.config;
    assert_eq!((cfg.vocab_size, cfg.hidden_size, cfg.blocks.len(), cfg.tie_embeddings), (160, 48, 3, false));
    for b in &cfg.blocks {
        let MixerConfig::Mla(m) = &b.mixer else { panic!("not MLA: {:?}", b.mixer) };
        assert_eq!(m.q_latent_dim, None);
        assert_eq!((m.kv_latent_dim, m.qk_nope_head_dim, m.d_rope, m.v_head_dim), (20, 12, 8, 10));
        assert_eq!(m.rope.style, moeba_kernels::ops::RopeStyle::Interleaved);
        assert_eq!(m.rope.theta, 10000.0);
    }
    assert_eq!(cfg.blocks[0].ffn, FfnConfig::Mlp { intermediate_size: 64 });
    for b in &cfg.blocks[1..] {
        let FfnConfig::Moe(m) = &b.ffn else { panic!("not MoE: {:?}", b.ffn) };
        assert_eq!((m.d_ff, m.num_experts, m.experts_per_tok), (16, 8, 2));
        assert_eq!(m.strategy, RoutingKind::GroupLimited { num_groups: 4, topk_groups: 2 });
        assert_eq!((m.score, m.normalize_topk, m.routed_scaling), (MoeScoreFn::Softmax, false, 2.0));
        assert!(m.shared_expert_enabled && !m.shared_expert_gate);
        assert_eq!((m.shared_expert_d_ff, m.shared_expert_name.as_str()), (32, "shared_experts"));
        assert_eq!(m.lb_loss_alpha, 0.0);
    }
    // Every checkpoint tensor was read; the mapping names the routing.
    assert_eq!(fx.report.tensors_read, fx.weights.len());
    assert!(fx.report.skipped.is_empty());
    assert!(fx.spec.mapping.iter().any(|l| l.contains("group_limited_greedy")), "{:#?}", fx.spec.mapping);
    assert_eq!((fx.spec.bos_token_id, fx.spec.eos_token_ids.as_slice()), (Some(0), &[1u32][..]));
}

/// Rows of a (T, k) tensor, each sorted by expert id, with the values of `w` in the same order.
fn sorted_rows(idx: &Tensor, w: &Tensor) -> Vec<Vec<(u32, f64)>> {
    let k = idx.dims()[1];
    let i: Vec<f64> = idx.to_vec_f64().unwrap();
    let w: Vec<f64> = w.to_vec_f64().unwrap();
    i.chunks(k)
        .zip(w.chunks(k))
        .map(|(i, w)| {
            let mut r: Vec<(u32, f64)> = i.iter().zip(w).map(|(&i, &w)| (i as u32, w)).collect();
            r.sort_by_key(|p| p.0);
            r
        })
        .collect()
}

fn deepseek_opts() -> TopkGatingOptions {
    TopkGatingOptions { k: 2, score: MoeScoreFn::Softmax, renormalize: false, scaling: 2.0 }
}

#[test]
fn router_decisions_match_transformers() {
    let fx = load_fixture("deepseek_v2");
    // On transformers' router logits: the same experts and combine weights.
    for layer in [1, 2] {
        let logits = Var::constant(fx.want(&format!("router_logits.{layer}")).clone());
        let g = group_limited_gating(&logits, 4, 2, &deepseek_opts()).unwrap();
        let got = sorted_rows(&g.indices, g.weights.tensor());
        let want = sorted_rows(
            fx.want(&format!("router_topk_idx.{layer}")),
            fx.want(&format!("router_topk_weight.{layer}")),
        );
        assert_eq!(got.len(), 54);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.iter().map(|p| p.0).collect::<Vec<_>>(), w.iter().map(|p| p.0).collect::<Vec<_>>());
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a.1 - b.1).abs() <= 1e-5 * b.1.abs().max(1e-3),
                    "layer {layer} token {t}: {g:?} vs {w:?}"
                );
            }
        }
    }
    // In the model (its own router logits): each token's first expert is transformers' heavier one.
    let _guard = moeba_autograd::no_grad();
    let out = fx.model.forward(&fx.input_ids(), &ForwardOptions::default()).unwrap();
    let blocks: Vec<usize> = out.assignments.iter().map(|(b, _)| *b).collect();
    assert_eq!(blocks, vec![1, 2]);
    for (layer, first) in &out.assignments {
        let first: Vec<f64> = first.to_vec_f64().unwrap();
        let want = sorted_rows(
            fx.want(&format!("router_topk_idx.{layer}")),
            fx.want(&format!("router_topk_weight.{layer}")),
        );
        let heavy: Vec<f64> = want
            .iter()
            .map(|r| r.iter().fold(r[0], |a, &p| if p.1 > a.1 { p } else { a }).0 as f64)
            .collect();
        assert_eq!(first, heavy, "layer {layer}");
    }
}

#[test]
fn the_fused_expert_layout_loads_the_same_model() {
    let fx = load_fixture("deepseek_v2");
    let mut fused: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &fx.weights {
        if !name.contains(".mlp.experts.") {
            fused.insert(name.clone(), t.clone());
        }
    }
    for layer in [1, 2] {
        let p = format!("model.layers.{layer}.mlp.experts");
        let w = |e: usize, n: &str| fx.weights[&format!("{p}.{e}.{n}.weight")].clone();
        let gu: Vec<Tensor> = (0..8)
            .map(|e| moeba_kernels::ops::concat(&[&w(e, "gate_proj"), &w(e, "up_proj")], 0).unwrap())
            .collect();
        let dn: Vec<Tensor> = (0..8).map(|e| w(e, "down_proj")).collect();
        fused.insert(
            format!("{p}.gate_up_proj"),
            moeba_kernels::ops::stack(&gu.iter().collect::<Vec<_>>(), 0).unwrap(),
        );
        fused.insert(
            format!("{p}.down_proj"),
            moeba_kernels::ops::stack(&dn.iter().collect::<Vec<_>>(), 0).unwrap(),
        );
    }
    let (_, model, _) = build(&fx.spec, &fused);
    let ids = fx.input_ids();
    assert_close("logits (fused experts)", &logits(&model, &ids), fx.want("logits"), 1e-4);
}

fn fixture_json() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture_dir("deepseek_v2").join("config.json")).unwrap()).unwrap()
}

fn config_error(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut json = fixture_json();
    edit(json.as_object_mut().unwrap());
    match HfSpec::from_config(&json) {
        Ok(_) => panic!("the edited config was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_config_values_are_errors_naming_the_key() {
    let e = config_error(|m| {
        m.insert("topk_method".into(), "noaux_tc".into());
    });
    assert!(e.contains("topk_method") && e.contains("noaux_tc"), "{e}");
    let e = config_error(|m| {
        m.insert("scoring_func".into(), "sigmoid".into());
    });
    assert!(e.contains("scoring_func") && e.contains("sigmoid"), "{e}");
    let e = config_error(|m| {
        m.insert("n_group".into(), 3.into());
    });
    assert!(e.contains("n_group") && e.contains('3'), "{e}");
    let e = config_error(|m| {
        m.insert("topk_group".into(), 5.into());
    });
    assert!(e.contains("topk_group"), "{e}");
    let e = config_error(|m| {
        m.insert("rope_parameters".into(), serde_json::json!({"rope_type": "dynamic", "rope_theta": 1e4}));
    });
    assert!(e.contains("rope_type") && e.contains("dynamic"), "{e}");
    let e = config_error(|m| {
        m.remove("kv_lora_rank");
    });
    assert!(e.contains("kv_lora_rank"), "{e}");
    // Greedy top-k is supported and needs no groups.
    let mut json = fixture_json();
    let m = json.as_object_mut().unwrap();
    m.insert("topk_method".into(), "greedy".into());
    m.remove("n_group");
    m.remove("topk_group");
    let spec = HfSpec::from_config(&json).unwrap();
    let FfnConfig::Moe(mc) = &spec.config.blocks[1].ffn else { panic!("layer 1 is not MoE") };
    assert_eq!(mc.strategy, RoutingKind::TopK);
}

#[test]
fn missing_and_unexpected_tensors_are_errors_naming_them() {
    let fx = load_fixture("deepseek_v2");
    let load = |w: &HashMap<String, Tensor>| {
        let store = ParamStore::new(DType::F32, Device::Cpu, 0);
        moeba_nn::HybridModel::new(&store.root(), &fx.spec.config).unwrap();
        load_weights(&fx.spec, &store, w).map(|_| ()).unwrap_err().to_string()
    };
    let mut w = fx.weights.clone();
    w.remove("model.layers.2.mlp.experts.5.up_proj.weight");
    let e = load(&w);
    assert!(e.contains("model.layers.2.mlp.experts.5.up_proj.weight"), "{e}");
    let mut w = fx.weights.clone();
    w.remove("model.layers.1.mlp.shared_experts.down_proj.weight");
    let e = load(&w);
    assert!(e.contains("model.layers.1.mlp.shared_experts.down_proj.weight"), "{e}");
    let mut w = fx.weights.clone();
    let extra = fx.weights["model.layers.1.mlp.gate.weight"].narrow(0, 0, 1).unwrap().contiguous().unwrap();
    w.insert("model.layers.1.mlp.gate.e_score_correction_bias".into(), extra);
    let e = load(&w);
    assert!(e.contains("model.layers.1.mlp.gate.e_score_correction_bias"), "{e}");
    let mut w = fx.weights.clone();
    let bad = fx.weights["model.layers.0.self_attn.kv_b_proj.weight"]
        .narrow(0, 0, 80)
        .unwrap()
        .contiguous()
        .unwrap();
    w.insert("model.layers.0.self_attn.kv_b_proj.weight".into(), bad);
    let e = load(&w);
    assert!(e.contains("kv_b_proj") && e.contains("[80, 20]") && e.contains("[88, 20]"), "{e}");
}

/// Plain group-limited routing of one token's logits: scores over all experts, groups ranked by
/// their best score (ties: lower group), top-k of the kept experts (ties: lower expert), weights
/// the scores (renormalised if asked) times `scaling`.
fn reference_row(row: &[f64], groups: usize, keep: usize, o: &TopkGatingOptions) -> Vec<(u32, f64)> {
    let e = row.len();
    let s: Vec<f64> = match o.score {
        MoeScoreFn::Softmax => {
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter().map(|x| (x - m).exp() / z).collect()
        }
        MoeScoreFn::Sigmoid => row.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect(),
    };
    let per = e / groups;
    let best = |g: usize| s[g * per..(g + 1) * per].iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| best(b).partial_cmp(&best(a)).unwrap().then(a.cmp(&b)));
    let mut cand: Vec<usize> = order[..keep].iter().flat_map(|&g| g * per..(g + 1) * per).collect();
    cand.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap().then(a.cmp(&b)));
    let chosen = &cand[..o.k];
    let sum: f64 = chosen.iter().map(|&i| s[i]).sum::<f64>() + 1e-20;
    chosen.iter().map(|&i| (i as u32, if o.renormalize { s[i] / sum } else { s[i] } * o.scaling)).collect()
}

#[derive(Debug, Clone)]
struct Case {
    t: usize,
    groups: usize,
    per: usize,
    keep: usize,
    k: usize,
    /// Logits on a grid of 0.5 (many exact ties) or continuous.
    ties: bool,
    raw: Vec<f64>,
    sigmoid: bool,
    renormalize: bool,
    /// Build the logits as the transpose of an (E, T) tensor.
    transposed: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (0usize..7, 1usize..5, 1usize..5, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
        .prop_flat_map(|(t, groups, per, ties, sigmoid, renormalize, transposed)| {
            (1..=groups, proptest::collection::vec(-3.0f64..3.0, t * groups * per)).prop_flat_map(
                move |(keep, raw)| {
                    (1..=keep * per).prop_map(move |k| Case {
                        t,
                        groups,
                        per,
                        keep,
                        k,
                        ties,
                        raw: raw.clone(),
                        sigmoid,
                        renormalize,
                        transposed,
                    })
                },
            )
        })
}

fn check_case(c: &Case, dtype: DType) {
    let e = c.groups * c.per;
    let vals: Vec<f64> = c.raw.iter().map(|&x| if c.ties { (x * 2.0).round() / 2.0 } else { x }).collect();
    let logits = if c.transposed {
        let mut tr = vec![0.0; vals.len()];
        for i in 0..c.t {
            for j in 0..e {
                tr[j * c.t + i] = vals[i * e + j];
            }
        }
        Tensor::from_vec(tr, (e, c.t), &Device::Cpu).unwrap().to_dtype(dtype).unwrap().t().unwrap()
    } else {
        Tensor::from_vec(vals, (c.t, e), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    };
    let o = TopkGatingOptions {
        k: c.k,
        score: if c.sigmoid { MoeScoreFn::Sigmoid } else { MoeScoreFn::Softmax },
        renormalize: c.renormalize,
        scaling: 1.5,
    };
    let g = group_limited_gating(&Var::constant(logits.clone()), c.groups, c.keep, &o).unwrap();
    assert_eq!(g.indices.dims(), &[c.t, c.k]);
    assert_eq!(g.groups.dims(), &[c.t, c.keep]);
    let idx: Vec<f64> = g.indices.to_vec_f64().unwrap();
    let w: Vec<f64> = g.weights.tensor().to_vec_f64().unwrap();
    let rows: Vec<f64> = logits.to_vec_f64().unwrap(); // the logits as the dtype holds them
    let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
    for tok in 0..c.t {
        let want = reference_row(&rows[tok * e..(tok + 1) * e], c.groups, c.keep, &o);
        for (slot, (i, wt)) in want.iter().enumerate() {
            assert_eq!(idx[tok * c.k + slot] as u32, *i, "token {tok} slot {slot}: {c:?}");
            let got = w[tok * c.k + slot];
            assert!((got - wt).abs() <= tol * wt.abs().max(1.0), "token {tok} slot {slot}: {got} vs {wt}");
        }
    }
    let counts = g.counts.to_vec_f64().unwrap();
    assert_eq!(counts.iter().sum::<f64>(), (c.t * c.k) as f64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn group_limited_gating_matches_the_reference_f64(c in case()) {
        check_case(&c, DType::F64);
    }

    #[test]
    fn group_limited_gating_matches_the_reference_f32(c in case()) {
        check_case(&c, DType::F32);
    }
}

#[test]
fn group_limited_ties_go_to_the_lower_group_and_expert() {
    // 4 groups of 2; groups 1 and 3 tie for best (logit 2), group 0 and 2 tie next (logit 1).
    let row = [1.0, 0.0, 2.0, 2.0, 1.0, 1.0, 0.0, 2.0];
    let logits = Var::constant(Tensor::from_vec(row.to_vec(), (1, 8), &Device::Cpu).unwrap());
    let o = TopkGatingOptions { k: 3, score: MoeScoreFn::Softmax, renormalize: false, scaling: 1.0 };
    let g = group_limited_gating(&logits, 4, 3, &o).unwrap();
    assert_eq!(g.groups.to_vec_f64().unwrap(), vec![1.0, 3.0, 0.0]);
    // Kept experts 0..4 and 6, 7: the 2s (2, 3, 7), lower index first.
    assert_eq!(g.indices.to_vec_f64().unwrap(), vec![2.0, 3.0, 7.0]);
    let z: f64 = row.iter().map(|x: &f64| x.exp()).sum();
    for w in g.weights.tensor().to_vec_f64().unwrap() {
        assert!((w - 2f64.exp() / z).abs() < 1e-12);
    }
}

#[test]
fn group_limited_weights_have_the_right_gradient() {
    // Continuous logits (no near-ties), softmax without renormalisation (the rescaled path).
    let logits = Tensor::randn(7, (5, 6), 0.0, 1.5, DType::F64, &Device::Cpu).unwrap();
    let o = TopkGatingOptions { k: 2, score: MoeScoreFn::Softmax, renormalize: false, scaling: 2.0 };
    check_gradients(
        |v| Ok(group_limited_gating(&v[0], 3, 2, &o)?.weights),
        &[logits],
        &GradCheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn group_limited_moe_layer_validates_and_routes_in_the_kept_groups() {
    let bad = MoeConfig::new(8, 16, 6, 2)
        .with_strategy(RoutingKind::GroupLimited { num_groups: 4, topk_groups: 2 });
    let e = MoeLayer::new(&ParamStore::new(DType::F64, Device::Cpu, 0).root(), &bad).unwrap_err().to_string();
    assert!(e.contains("num_groups"), "{e}");
    let bad = MoeConfig::new(8, 16, 8, 5)
        .with_strategy(RoutingKind::GroupLimited { num_groups: 4, topk_groups: 2 });
    let e = MoeLayer::new(&ParamStore::new(DType::F64, Device::Cpu, 0).root(), &bad).unwrap_err().to_string();
    assert!(e.contains("experts_per_tok"), "{e}");
    let bad = MoeConfig::new(8, 16, 8, 1)
        .with_strategy(RoutingKind::GroupLimited { num_groups: 4, topk_groups: 0 });
    let e = MoeLayer::new(&ParamStore::new(DType::F64, Device::Cpu, 0).root(), &bad).unwrap_err().to_string();
    assert!(e.contains("topk_groups"), "{e}");

    // A layer: its assignments equal the gating of its own router logits; backward reaches the router.
    let store = ParamStore::new(DType::F64, Device::Cpu, 3);
    let mut cfg = MoeConfig::new(8, 16, 8, 2)
        .with_strategy(RoutingKind::GroupLimited { num_groups: 4, topk_groups: 2 });
    cfg.normalize_topk = false;
    cfg.routed_scaling = 2.0;
    let layer = MoeLayer::new(&store.root().pp("mlp"), &cfg).unwrap();
    let x = Var::constant(Tensor::randn(5, (2, 3, 8), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap());
    let y = layer.forward(&x, &MoeContext::default()).unwrap();
    assert_eq!(y.out.dims(), &[2, 3, 8]);
    assert_eq!(y.stats.counts.iter().sum::<f64>(), 12.0);
    let gate = store.get("mlp.gate.weight").unwrap();
    let logits = x.reshape((6, 8)).unwrap().matmul(&gate.var().t().unwrap()).unwrap();
    let g = group_limited_gating(
        &logits,
        4,
        2,
        &TopkGatingOptions { k: 2, score: MoeScoreFn::Softmax, renormalize: false, scaling: 2.0 },
    )
    .unwrap();
    let counts = g.counts.to_vec_f64().unwrap();
    assert_eq!(y.stats.counts, counts);
    let grads = y.out.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&gate.var()).is_some(), "no gradient reached the router");
}

/// The `deepseek_v2` model with YaRN RoPE (factor 2 on an original context of 1024, mscale
/// 0.707, mscale_all_dim 1.0): this repository's fixture (`fixtures/deepseek_v2_yarn`, made by
/// its `generate.py` with transformers) over the shared weights. Checks YaRN's frequencies, the
/// cos/sin amplitude and the softmax-scale correction against transformers' own values, then the
/// logits and greedy decoding with the latent cache.
#[test]
fn yarn_rope_matches_transformers() {
    let here =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/hf/fixtures/deepseek_v2_yarn");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(here.join("config.json")).unwrap()).unwrap();
    let spec = HfSpec::from_config(&json).unwrap();
    let expected = read_safetensors(&here.join("expected.safetensors"));
    let want = |k: &str| expected.get(k).unwrap_or_else(|| panic!("no `{k}`")).to_vec_f64().unwrap();

    let MixerConfig::Mla(m) = &spec.config.blocks[0].mixer else { panic!("not MLA") };
    let inv = m.rope.scaling.inv_freqs(m.d_rope, m.rope.theta);
    for (i, (g, w)) in inv.iter().zip(want("inv_freq")).enumerate() {
        // transformers computes the frequencies in f32.
        assert!((g - w).abs() <= 1e-6 * w.abs(), "inv_freq[{i}]: {g} vs transformers' {w}");
    }
    assert!((m.rope.scaling.amplitude() - want("attention_scaling")[0]).abs() < 1e-12);
    assert!((m.scale() - want("softmax_scale")[0]).abs() < 1e-12, "softmax scale {}", m.scale());
    assert!(spec.mapping.iter().any(|l| l.contains("YaRN")), "inspect mapping: {:?}", spec.mapping);

    let weights = read_safetensors(&fixture_dir("deepseek_v2").join("model.safetensors"));
    let (_store, model, _) = build(&spec, &weights);
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    assert_close("logits with YaRN", &logits(&model, &ids), &expected["logits"], 1e-4);

    let prompt: Vec<u32> = expected["generate_prompt"].to_dtype(DType::U32).unwrap().to_vec().unwrap();
    let out: Vec<u32> = expected["generate_out"].to_dtype(DType::U32).unwrap().to_vec().unwrap();
    let (got, _) = greedy(&model, &prompt, out.len() - prompt.len());
    assert_eq!(got, out, "greedy decoding with YaRN and the latent cache differs from transformers'");
}

#[test]
fn rope_scaling_errors_name_the_key() {
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir("deepseek_v2").join("config.json")).unwrap())
            .unwrap();
    let with = |rope: serde_json::Value| {
        let mut j = base.clone();
        j["rope_parameters"] = rope;
        HfSpec::from_config(&j).map(|_| ()).unwrap_err().to_string()
    };
    let e = with(serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0}));
    assert!(e.contains("rope_parameters.rope_type") && e.contains("longrope"), "{e}");
    let e = with(serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}));
    assert!(e.contains("original_max_position_embeddings"), "{e}");
    let e =
        with(serde_json::json!({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}));
    assert!(e.contains("factor") && e.contains(">= 1"), "{e}");
    // Older configs: `rope_scaling` with `type`, the base at the top level (DeepSeek-V2-Lite's form).
    let mut j = base.clone();
    j.as_object_mut().unwrap().remove("rope_parameters");
    j["rope_theta"] = serde_json::json!(10000.0);
    j["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707});
    let spec = HfSpec::from_config(&j).unwrap();
    let MixerConfig::Mla(m) = &spec.config.blocks[0].mixer else { panic!("not MLA") };
    let moeba_kernels::ops::RopeScaling::Yarn(y) = m.rope.scaling else { panic!("not YaRN: {:?}", m.rope) };
    assert_eq!((y.factor, y.original_max_position), (40.0, 4096));
    // mscale == mscale_all_dim: cos/sin keep their size, the softmax scale grows by mscale².
    assert!((y.attention_factor - 1.0).abs() < 1e-12);
    let ms = 0.1 * 0.707 * 40f64.ln() + 1.0;
    assert!((m.scale() - ms * ms / 20f64.sqrt()).abs() < 1e-12);
}
