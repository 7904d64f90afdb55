//! The `mixtral` fixture, and the MoE checks shared with `qwen2_moe` and `jamba`: per-layer
//! outputs, router decisions, HF's `aux_loss`, the fused transformers-5 expert layout and the
//! loader's errors on expert tensors.

use std::collections::HashMap;

use moeba_autograd::{no_grad, Var};
use moeba_kernels::ops::{self, TopkGating, TopkGatingOptions};
use moeba_nn::hf::{load_weights, HfSpec};
use moeba_nn::mamba::MambaBlock;
use moeba_nn::moe::{LbConvention, MoeContext, MoeLayer, MoeOutput};
use moeba_nn::{
    Attention, FfnConfig, ForwardOptions, HybridModel, MixerConfig, ParamStore, RmsNorm, SwiGluMlp,
};
use moeba_tensor::{DType, Device, Tensor};

use super::common::*;

#[test]
fn logits_and_generation_match_transformers() {
    let fx = load_fixture("mixtral");
    check_logits_and_generation(&fx);
}

#[test]
fn layers_match_transformers() {
    check_layers(&load_fixture("mixtral"));
}

#[test]
fn router_decisions_and_aux_loss_match_transformers() {
    check_routing_and_aux_loss(&load_fixture("mixtral"));
}

#[test]
fn fused_expert_layout_loads_bit_identically() {
    let fx = load_fixture("mixtral");
    // transformers 5 in memory: `block_sparse_moe` becomes `mlp`, the experts are fused.
    let fused = fuse_experts(&fx, "block_sparse_moe", "mlp", ["w1", "w3", "w2"]);
    assert!(fused.contains_key("model.layers.0.mlp.experts.gate_up_proj"));
    assert!(fused.contains_key("model.layers.1.mlp.gate.weight"));
    check_fused_identical(&fx, &fused);
    check_fused_shape_error(&fx, &fused, "model.layers.1.mlp.experts.gate_up_proj");
}

#[test]
fn expert_tensor_errors_name_the_tensor_and_shapes() {
    let fx = load_fixture("mixtral");
    check_expert_errors(&fx, "model.layers.1.block_sparse_moe", ["w1", "w3", "w2"]);
}

#[test]
fn config_maps_keys_and_rejects_unsupported_values() {
    let fx = load_fixture("mixtral");
    let m = fx.spec.mapping.join("\n");
    for key in [
        "num_local_experts",
        "num_experts_per_tok",
        "head_dim",
        "rope_parameters.rope_theta",
        "sliding_window",
    ] {
        assert!(m.contains(key), "mapping lacks `{key}`:\n{m}");
    }
    let c = &fx.spec.config;
    assert_eq!(c.blocks.len(), 2);
    assert!(!c.tie_embeddings);
    for b in &c.blocks {
        let MixerConfig::Attention(a) = &b.mixer else { panic!("mixtral block is not attention") };
        assert_eq!((a.num_heads, a.kv_heads, a.head_dim, a.window, a.bias), (4, 2, 12, None, false));
        let FfnConfig::Moe(moe) = &b.ffn else { panic!("mixtral block is not MoE") };
        assert_eq!((moe.num_experts, moe.experts_per_tok, moe.d_ff), (4, 2, 64));
        assert!(moe.normalize_topk && !moe.shared_expert_enabled);
    }
    let base = config_json("mixtral");
    let w = with_key(&base, "sliding_window", serde_json::json!(4096));
    let spec = HfSpec::from_config(&w).unwrap();
    let MixerConfig::Attention(a) = &spec.config.blocks[0].mixer else { panic!() };
    assert_eq!(a.window, Some(4096));
    config_error(&base, "hidden_act", serde_json::json!("gelu"), "hidden_act");
    config_error(
        &base,
        "rope_parameters",
        serde_json::json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0}),
        "rope_type",
    );
    config_error(&base, "num_local_experts", serde_json::json!("four"), "num_local_experts");
}

// ---------------------------------------------------------------- shared by the MoE families

/// `config.json` of a fixture.
pub fn config_json(family: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture_dir(family).join("config.json")).unwrap()).unwrap()
}

/// `json` with `key` set to `v`.
pub fn with_key(json: &serde_json::Value, key: &str, v: serde_json::Value) -> serde_json::Value {
    let mut j = json.clone();
    j.as_object_mut().unwrap().insert(key.to_string(), v);
    j
}

/// Asserts that `json` with `key = v` is refused by `HfSpec::from_config` with an error naming `named`.
pub fn config_error(json: &serde_json::Value, key: &str, v: serde_json::Value, named: &str) {
    let j = with_key(json, key, v.clone());
    let e = HfSpec::from_config(&j).expect_err(&format!("{key} = {v} must be refused")).to_string();
    assert!(e.contains(named), "error for {key} = {v} does not name `{named}`: {e}");
}

/// What one block did, rebuilt from the fixture's loaded parameters.
pub struct BlockRun {
    /// The residual stream after the block, `(b, l, d)`.
    pub out: Tensor,
    /// For an MoE block: its router input `(b, l, d)`, the layer and its output.
    pub moe: Option<(Tensor, MoeLayer, MoeOutput)>,
}

/// Block `i` of the fixture's model on the residual stream `x (b, l, d)`, rebuilt with the
/// layer APIs on the same parameter store (so it reads exactly the loaded weights).
pub fn run_block(fx: &Fixture, i: usize, x: &Tensor) -> BlockRun {
    let _guard = no_grad();
    let cfg = &fx.spec.config;
    let (d, eps) = (cfg.hidden_size, cfg.norm_eps);
    let root = fx.store.root();
    let lp = root.pp("model").pp("layers").pp(i);
    let xv = Var::constant(x.clone());
    let h = RmsNorm::new(&lp.pp("input_layernorm"), d, eps).unwrap().forward(&xv).unwrap();
    let mixed = match &cfg.blocks[i].mixer {
        MixerConfig::Attention(a) => Attention::new(&lp.pp("self_attn"), a).unwrap().forward(&h).unwrap(),
        MixerConfig::Mamba(m) => MambaBlock::new(&lp.pp("mixer"), m).unwrap().forward(&h, None).unwrap(),
        other => panic!("block {i}: unexpected mixer {other:?}"),
    };
    let a = xv.add(&mixed).unwrap();
    let y = RmsNorm::new(&lp.pp("pre_ff_layernorm"), d, eps).unwrap().forward(&a).unwrap();
    let ffn = lp.pp("feed_forward");
    #[allow(unreachable_patterns)]
    let (f, moe) = match &cfg.blocks[i].ffn {
        FfnConfig::Mlp { intermediate_size } => {
            (SwiGluMlp::new(&ffn, d, *intermediate_size).unwrap().forward(&y).unwrap(), None)
        }
        FfnConfig::Moe(mc) => {
            let layer = MoeLayer::new(&ffn, mc).unwrap();
            let out = layer.forward(&y, &MoeContext::default()).unwrap();
            (out.out.clone(), Some((y.tensor().clone(), layer, out)))
        }
        other => panic!("block {i}: unexpected feed-forward {other:?}"),
    };
    BlockRun { out: a.add(&f).unwrap().tensor().clone(), moe }
}

/// The residual stream entering block `i`: `embed_out` or `layer_out.{i-1}`.
fn block_input(fx: &Fixture, i: usize) -> Tensor {
    if i == 0 {
        fx.want("embed_out").clone()
    } else {
        fx.want(&format!("layer_out.{}", i - 1)).clone()
    }
}

/// Every block, fed transformers' input of that layer, reproduces `layer_out.{i}`; the model's
/// embedding and final norm reproduce `embed_out`.
pub fn check_layers(fx: &Fixture) {
    let ids = fx.input_ids();
    let emb = fx.store.get("model.embed_tokens.weight").unwrap().tensor();
    let (b, l) = (ids.dims()[0], ids.dims()[1]);
    let e = ops::index_select(&emb, 0, &ids.reshape(b * l).unwrap()).unwrap();
    assert_close("embed_out", &e.reshape(fx.want("embed_out").dims()).unwrap(), fx.want("embed_out"), 0.0);
    for i in 0..fx.spec.config.blocks.len() {
        let run = run_block(fx, i, &block_input(fx, i));
        assert_close(&format!("layer_out.{i}"), &run.out, fx.want(&format!("layer_out.{i}")), 1e-4);
    }
}

/// The gate of an MoE layer on its router input `y (T, d)`: logits and moeba's top-k gating
/// with the layer's options.
fn gate(layer: &MoeLayer, y: &Tensor) -> (Tensor, TopkGating) {
    let cfg = layer.config();
    let t = y.elem_count() / cfg.d_model;
    let w = layer.router[0].tensor();
    let logits = ops::matmul(&y.reshape((t, cfg.d_model)).unwrap(), &w.t().unwrap()).unwrap();
    let opts = TopkGatingOptions {
        k: cfg.experts_per_tok,
        score: cfg.score,
        renormalize: cfg.normalize_topk,
        scaling: cfg.routed_scaling,
    };
    let g = ops::topk_gating(&logits, None, &opts).unwrap();
    (logits, g)
}

/// Rows of `(T, k)` expert ids and weights re-ordered by ascending expert id (HF's fixture order).
fn sorted_by_expert(idx: &Tensor, w: &Tensor) -> (Vec<u32>, Vec<f64>) {
    let k = idx.dims()[1];
    let (iv, wv) = (idx.to_vec::<u32>().unwrap(), w.to_vec_f64().unwrap());
    let (mut io, mut wo) = (Vec::new(), Vec::new());
    for r in 0..iv.len() / k {
        let mut row: Vec<(u32, f64)> = (0..k).map(|j| (iv[r * k + j], wv[r * k + j])).collect();
        row.sort_by_key(|p| p.0);
        io.extend(row.iter().map(|p| p.0));
        wo.extend(row.iter().map(|p| p.1));
    }
    (io, wo)
}

/// For every MoE layer: the router logits, the chosen experts (through `MoeLayer::forward`) and
/// their combine weights match `router_logits.{i}`, `router_topk_idx.{i}`, `router_topk_weight.{i}`.
///
/// Then HF's `aux_loss`. Per layer, HF's `load_balancing_loss_func` (`E · Σ f_e P_e` with
/// `f_e = count_e / T`, `Σ f = k`) is `k ×` moeba's Switch loss (`f_e = count_e / (T·k)`),
/// which the test checks on each layer. Over several layers the definitions do NOT agree: HF
/// concatenates the router logits of all MoE layers and pools the counts and probabilities over
/// them before the product, where moeba sums one loss per layer. So the pooled value is rebuilt
/// from moeba's per-layer counts and mean probabilities and compared with `aux_loss`, and
/// `loss = lm_loss + router_aux_loss_coef · aux_loss` with `loss`.
pub fn check_routing_and_aux_loss(fx: &Fixture) {
    let blocks = &fx.spec.config.blocks;
    let mut pooled_counts: Option<Tensor> = None;
    let mut pooled_score: Option<Tensor> = None;
    let (mut tokens, mut moe_layers, mut k) = (0, 0, 0);
    for i in 0..blocks.len() {
        let run = run_block(fx, i, &block_input(fx, i));
        let Some((y, layer, out)) = run.moe else {
            assert!(!fx.expected.contains_key(&format!("router_logits.{i}")), "layer {i} should be MoE");
            continue;
        };
        let cfg = layer.config();
        let (logits, g) = gate(&layer, &y);
        let t = logits.dims()[0];
        assert_close(&format!("router_logits.{i}"), &logits, fx.want(&format!("router_logits.{i}")), 1e-4);
        let assignment = out.assignment.as_ref().expect("top-k routing reports its assignment");
        assert_eq!(assignment.to_vec::<u32>().unwrap(), g.indices.to_vec::<u32>().unwrap());
        let (idx, w) = sorted_by_expert(assignment, &g.weights);
        let want_idx: Vec<u32> =
            fx.want(&format!("router_topk_idx.{i}")).to_dtype(DType::U32).unwrap().to_vec().unwrap();
        assert_eq!(idx, want_idx, "layer {i}: moeba's experts differ from transformers'");
        let w = Tensor::from_vec(w, (t, cfg.experts_per_tok), &Device::Cpu).unwrap();
        assert_close(
            &format!("router_topk_weight.{i}"),
            &w,
            fx.want(&format!("router_topk_weight.{i}")),
            1e-4,
        );
        assert_eq!(out.stats.counts, g.counts.to_vec_f64().unwrap());

        // Per layer: moeba's Switch loss × k is HF's definition on that layer alone.
        let lb = out
            .aux
            .lb_loss
            .as_ref()
            .expect("top-k routing has a balancing loss")
            .tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>();
        let counts = Tensor::from_vec(out.stats.counts.clone(), cfg.num_experts, &Device::Cpu).unwrap();
        let mean = g.mean_score.to_dtype(DType::F64).unwrap();
        let hf_one = load_balancing_loss(&mean, &counts, t, cfg.experts_per_tok, LbConvention::Hf);
        let lb = lb.unwrap();
        assert!(
            (lb * cfg.experts_per_tok as f64 - hf_one).abs() <= 1e-5 * hf_one.abs(),
            "layer {i}: k · Switch loss {lb} != HF-convention loss {hf_one}"
        );
        pooled_counts = Some(match pooled_counts {
            Some(c) => ops::add(&c, &counts).unwrap(),
            None => counts,
        });
        let sum_score = ops::affine(&mean, t as f64, 0.0).unwrap();
        pooled_score = Some(match pooled_score {
            Some(s) => ops::add(&s, &sum_score).unwrap(),
            None => sum_score,
        });
        tokens += t;
        moe_layers += 1;
        k = cfg.experts_per_tok;
    }
    assert!(moe_layers > 0, "the fixture has no MoE layer");

    // The whole model's forward reports each token's first (highest-weight) expert per MoE layer.
    let out = {
        let _guard = no_grad();
        fx.model.forward(&fx.input_ids(), &ForwardOptions::default()).unwrap()
    };
    assert_eq!(out.assignments.len(), moe_layers);
    for (i, first) in &out.assignments {
        let idx: Vec<u32> =
            fx.want(&format!("router_topk_idx.{i}")).to_dtype(DType::U32).unwrap().to_vec().unwrap();
        let w = fx.want(&format!("router_topk_weight.{i}")).to_vec_f64().unwrap();
        let top1: Vec<u32> = idx
            .chunks(k)
            .zip(w.chunks(k))
            .map(|(ids, ws)| {
                let j = (0..k).fold(0, |b, j| if ws[j] > ws[b] { j } else { b });
                ids[j]
            })
            .collect();
        assert_eq!(first.to_vec::<u32>().unwrap(), top1, "layer {i}: HybridOutput.assignments");
    }
    let p = ops::affine(&pooled_score.unwrap(), 1.0 / tokens as f64, 0.0).unwrap();
    let aux = load_balancing_loss(&p, &pooled_counts.unwrap(), tokens, k, LbConvention::Hf);
    let want = fx.want("aux_loss").to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    assert!((aux - want).abs() <= 1e-5 * want.abs(), "pooled aux_loss {aux} != transformers' {want}");

    let coef = config_json(fx.spec.family.model_type())["router_aux_loss_coef"].as_f64().unwrap();
    let lm = fx.want("lm_loss").to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let loss = fx.want("loss").to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    assert!((lm + coef * aux - loss).abs() <= 1e-5 * loss.abs(), "lm_loss + coef · aux_loss != loss");
}

/// moeba's load-balancing loss on plain tensors.
fn load_balancing_loss(mean: &Tensor, counts: &Tensor, tokens: usize, k: usize, conv: LbConvention) -> f64 {
    let v = moeba_nn::moe::losses::load_balancing_loss(&Var::constant(mean.clone()), counts, tokens, k, conv)
        .unwrap();
    v.tensor().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The fixture's weights with every MoE layer's experts in the transformers-5 fused layout:
/// `{to}.experts.gate_up_proj (E, 2f, d)` (gate rows then up rows) and `{to}.experts.down_proj
/// (E, d, f)`; every other tensor under `{from}` is renamed to `{to}`.
pub fn fuse_experts(
    fx: &Fixture,
    from: &str,
    to: &str,
    [gate, up, down]: [&str; 3],
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (i, b) in fx.spec.config.blocks.iter().enumerate() {
        let FfnConfig::Moe(moe) = &b.ffn else { continue };
        let (src, dst) = (format!("model.layers.{i}.{from}"), format!("model.layers.{i}.{to}"));
        let (mut gu, mut dn) = (Vec::new(), Vec::new());
        for e in 0..moe.num_experts {
            let t = |p: &str| fx.weights[&format!("{src}.experts.{e}.{p}.weight")].clone();
            gu.push(ops::concat(&[&t(gate), &t(up)], 0).unwrap());
            dn.push(t(down));
        }
        out.insert(
            format!("{dst}.experts.gate_up_proj"),
            ops::stack(&gu.iter().collect::<Vec<_>>(), 0).unwrap(),
        );
        out.insert(
            format!("{dst}.experts.down_proj"),
            ops::stack(&dn.iter().collect::<Vec<_>>(), 0).unwrap(),
        );
    }
    for (name, t) in &fx.weights {
        let layer_of = |n: &str| -> Option<(usize, String)> {
            let rest = n.strip_prefix("model.layers.")?;
            let (i, rest) = rest.split_once('.')?;
            Some((i.parse().ok()?, rest.to_string()))
        };
        match layer_of(name) {
            Some((i, rest)) if rest.starts_with(&format!("{from}.")) => {
                if rest.starts_with(&format!("{from}.experts.")) {
                    continue; // fused above
                }
                out.insert(format!("model.layers.{i}.{to}{}", &rest[from.len()..]), t.clone());
            }
            _ => {
                out.insert(name.clone(), t.clone());
            }
        }
    }
    out
}

/// Loads `fused` into a fresh model and checks its logits are bit-identical to the legacy load.
pub fn check_fused_identical(fx: &Fixture, fused: &HashMap<String, Tensor>) {
    assert!(
        fused.keys().all(|n| !n.contains(".experts.0.")),
        "the fused checkpoint still has per-expert tensors"
    );
    let (_store, model, report) = build(&fx.spec, fused);
    assert_eq!(report.params_set, fx.report.params_set);
    let ids = fx.input_ids();
    let a = logits(&fx.model, &ids).to_vec::<f32>().unwrap();
    let b = logits(&model, &ids).to_vec::<f32>().unwrap();
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "fused-layout logits differ from legacy"
    );
}

/// Loads `weights` into a fresh model of `spec`, returning the error message.
pub fn load_error(spec: &HfSpec, weights: &HashMap<String, Tensor>) -> String {
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let _model = HybridModel::new(&store.root(), &spec.config).unwrap();
    load_weights(spec, &store, weights).expect_err("the malformed checkpoint must be refused").to_string()
}

/// A missing expert tensor is named; a misshapen one is named with both shapes (legacy and
/// fused layouts); a stray extra expert is named. `moe` is an MoE layer's on-disk prefix.
pub fn check_expert_errors(fx: &Fixture, moe: &str, [gate, up, down]: [&str; 3]) {
    let spec = &fx.spec;
    let name = |e: usize, p: &str| format!("{moe}.experts.{e}.{p}.weight");

    let mut w = fx.weights.clone();
    let gone = name(1, down);
    w.remove(&gone);
    let e = load_error(spec, &w);
    assert!(e.contains(&gone) && e.contains("missing"), "missing expert tensor not named: {e}");

    for p in [gate, up, down] {
        let mut w = fx.weights.clone();
        let bad = name(0, p);
        let dims = w[&bad].dims().to_vec();
        let wrong = (dims[0] + 1, dims[1]);
        w.insert(bad.clone(), Tensor::zeros(wrong, DType::F32, &Device::Cpu).unwrap());
        let e = load_error(spec, &w);
        let (got, want) = (format!("[{}, {}]", wrong.0, wrong.1), format!("[{}, {}]", dims[0], dims[1]));
        assert!(
            e.contains(&bad) && e.contains(&got) && e.contains(&want),
            "misshapen `{bad}` {got} (want {want}) not named with both shapes: {e}"
        );
    }

    let mut w = fx.weights.clone();
    let e_count = w
        .keys()
        .filter(|n| n.starts_with(&format!("{moe}.experts.")) && n.ends_with(&format!(".{gate}.weight")))
        .count();
    let extra = name(e_count, gate);
    w.insert(extra.clone(), w[&name(0, gate)].clone());
    let e = load_error(spec, &w);
    assert!(e.contains(&extra), "extra expert not named: {e}");
}

/// In the fused layout, a `gate_up_proj` of the wrong shape is named with both shapes.
pub fn check_fused_shape_error(fx: &Fixture, fused: &HashMap<String, Tensor>, name: &str) {
    let mut w = fused.clone();
    let dims = w[name].dims().to_vec();
    let wrong = vec![dims[0], dims[1] + 2, dims[2]];
    w.insert(name.to_string(), Tensor::zeros(wrong.clone(), DType::F32, &Device::Cpu).unwrap());
    let e = load_error(&fx.spec, &w);
    assert!(
        e.contains(name) && e.contains(&format!("{wrong:?}")) && e.contains(&format!("{dims:?}")),
        "misshapen fused `{name}` not named with both shapes: {e}"
    );
}
