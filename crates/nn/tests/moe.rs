//! The MoE layer against the fixtures, a plain per-token reference (proptest, f64 and f32,
//! strided inputs), gradient checks through the whole layer, the aux losses, balancing,
//! monitoring and bad-input errors.

use moeba_autograd::fused::moe as fused;
use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_kernels::ops::{self, MoeScoreFn, TopkGatingOptions};
use moeba_nn::moe::losses::{load_balancing_loss, routed_usage, router_z_loss, usage_variance_loss};
use moeba_nn::moe::{
    BiasBalancer, CollapseDetector, LbConvention, MoeConfig, MoeContext, MoeLayer, MoeWeights, RoutingStats,
    SharedExpertWeights,
};
use moeba_nn::ParamStore;
use moeba_tensor::{DType, Tensor};
use proptest::prelude::*;

mod moe_common;
use moe_common::{cpu, fixture, max_rel, RefMoe};

// ------------------------------------------------------------------ fixtures

#[test]
fn moe_layer_matches_fixture_f64_and_f32() {
    let Some(fx) = fixture("moe_layer.safetensors") else { return };
    let (t, d) = (fx["x"].dims()[0], fx["x"].dims()[1]);
    let (e, f) = (fx["w1"].dims()[0], fx["w1"].dims()[1]);
    for dtype in [DType::F64, DType::F32] {
        let store = ParamStore::new(dtype, cpu(), 0);
        let layer = MoeLayer::new(&store.root().pp("mlp"), &MoeConfig::new(d, f, e, 2)).unwrap();
        let cast = |k: &str| fx[k].to_dtype(dtype).unwrap();
        layer.router[0].set(cast("router_w")).unwrap();
        layer.gate_up_proj.set(ops::concat(&[&cast("w1"), &cast("w3")], 1).unwrap()).unwrap();
        layer.down_proj.set(cast("w2")).unwrap();
        let names: Vec<String> = store.params().iter().map(|p| p.name().to_string()).collect();
        assert_eq!(names, ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]);
        let x = Var::param(cast("x"));
        let w = layer.weights();
        let y = layer.forward_with(&x, &w, &MoeContext::default()).unwrap();
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        assert!(
            max_rel(y.out.tensor(), &fx["out"]) < tol,
            "{dtype} out {}",
            max_rel(y.out.tensor(), &fx["out"])
        );
        // The selection: fixture rows are sorted by descending weight, like ours.
        let idx = y.assignment.as_ref().unwrap().to_vec_f64().unwrap();
        assert_eq!(idx, fx["topk_idx"].to_vec_f64().unwrap());
        assert_eq!(y.stats.counts.iter().sum::<f64>(), (t * 2) as f64);
        let grads = y.out.backward_with(cast("grad_out")).unwrap();
        let g = |v: &Var| grads.get(v).unwrap().clone();
        let check = |got: &Tensor, key: &str| {
            let r = max_rel(got, &fx[key]);
            assert!(r < tol, "{dtype} {key}: {r:e}");
        };
        check(&g(&x), "grad_x");
        check(&g(&w.router[0]), "grad_router_w");
        let gu = g(&w.gate_up);
        check(&gu.narrow(1, 0, f).unwrap(), "grad_w1");
        check(&gu.narrow(1, f, f).unwrap(), "grad_w3");
        check(&g(&w.down), "grad_w2");
    }
}

#[test]
fn aux_losses_match_topk_gating_fixture() {
    let Some(fx) = fixture("topk_gating.safetensors") else { return };
    let (t, e) = (fx["logits"].dims()[0], fx["logits"].dims()[1]);
    let k = 2;
    let lb_coef = fx["lb_coef"].to_scalar::<f64>().unwrap();
    let z_coef = fx["z_coef"].to_scalar::<f64>().unwrap();
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        let logits = Var::param(fx["logits"].to_dtype(dtype).unwrap());
        let gv = fused::topk_gating(&logits, None, &TopkGatingOptions::softmax(k)).unwrap();
        let lb_s = load_balancing_loss(&gv.mean_score, &gv.counts, t, k, LbConvention::Switch).unwrap();
        let lb_h = load_balancing_loss(&gv.mean_score, &gv.counts, t, k, LbConvention::Hf).unwrap();
        let z = router_z_loss(&gv.lse).unwrap();
        assert!(max_rel(lb_s.tensor(), &fx["lb_loss_switch"]) < tol, "{dtype} lb switch");
        assert!(max_rel(lb_h.tensor(), &fx["lb_loss_hf"]) < tol, "{dtype} lb hf");
        assert!(max_rel(z.tensor(), &fx["z_loss"]) < tol, "{dtype} z");
        for (loss, key) in [
            (&lb_s, "grad_logits_from_lb_switch"),
            (&lb_h, "grad_logits_from_lb_hf"),
            (&z, "grad_logits_from_z"),
        ] {
            let g = loss.backward().unwrap();
            let r = max_rel(g.get(&logits).unwrap(), &fx[key]);
            assert!(r < tol, "{dtype} {key}: {r:e}");
        }
        let gw = Var::constant(fx["grad_topk_weight"].to_dtype(dtype).unwrap());
        let total = gv
            .weights
            .mul(&gw)
            .unwrap()
            .sum_all()
            .unwrap()
            .add(&lb_s.scale(lb_coef).unwrap())
            .unwrap()
            .add(&z.scale(z_coef).unwrap())
            .unwrap();
        let g = total.backward().unwrap();
        let r = max_rel(g.get(&logits).unwrap(), &fx["grad_logits_total"]);
        assert!(r < tol, "{dtype} total: {r:e}");
        // The layer's own aux values use the same definitions: uniform routing gives lb = 1.
        let _ = e;
    }
}

// ------------------------------------------------------------------ reference comparisons

fn layer_with(cfg: &MoeConfig, dtype: DType, seed: u64) -> (ParamStore, MoeLayer) {
    let store = ParamStore::new(dtype, cpu(), seed);
    let layer = MoeLayer::new(&store.root().pp("moe"), cfg).unwrap();
    (store, layer)
}

#[derive(Debug, Clone)]
struct Case {
    t: usize,
    d: usize,
    f: usize,
    e: usize,
    k: usize,
    sigmoid: bool,
    renorm: bool,
    shared: Option<(usize, bool)>,
    view: u8,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        0usize..20,
        1usize..12,
        1usize..11,
        1usize..7,
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        0u8..3,
        any::<u64>(),
    )
        .prop_flat_map(|(t, d, f, e, sig, renorm, shared, view, seed)| {
            (1..=e).prop_map(move |k| Case {
                t,
                d,
                f,
                e,
                k,
                sigmoid: sig,
                renorm,
                shared: match shared {
                    0 => None,
                    1 => Some((3, false)),
                    _ => Some((5, true)),
                },
                view,
                seed,
            })
        })
}

/// `x (t, d)` as a contiguous tensor (view 0), the transpose of a `(d, t)` tensor (view 1) or a
/// narrowed slice of a wider tensor (view 2): the same values either way.
fn input(c: &Case, dtype: DType) -> Tensor {
    let base = Tensor::randn(c.seed, (c.t, c.d), 0.0, 1.0, dtype, &cpu()).unwrap();
    match c.view {
        0 => base,
        1 => base.t().unwrap().contiguous().unwrap().t().unwrap(),
        _ => {
            let wide = ops::concat(&[&base, &base], 1).unwrap();
            wide.narrow(1, 0, c.d).unwrap()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn layer_matches_plain_reference(c in cases()) {
        for dtype in [DType::F64, DType::F32] {
            let mut cfg = MoeConfig::new(c.d, c.f, c.e, c.k);
            cfg.score = if c.sigmoid { MoeScoreFn::Sigmoid } else { MoeScoreFn::Softmax };
            cfg.normalize_topk = c.renorm;
            cfg.routed_scaling = if c.sigmoid { 2.5 } else { 1.0 };
            if let Some((fs, gated)) = c.shared {
                cfg = cfg.with_shared_expert(fs, gated);
            }
            let (_s, layer) = layer_with(&cfg, dtype, c.seed ^ 1);
            let x = input(&c, dtype);
            let y = layer.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
            prop_assert_eq!(y.out.dims(), &[c.t, c.d]);
            let want = RefMoe::from_layer(&layer).forward(&x.to_vec_f64().unwrap());
            let got = y.out.tensor().to_vec_f64().unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-4 };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                prop_assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{dtype} {c:?} elem {i}: {g} vs {w}");
            }
            prop_assert_eq!(y.stats.counts.iter().sum::<f64>(), (c.t * c.k) as f64);
            prop_assert_eq!(y.stats.dropped, 0);
        }
    }

    #[test]
    fn capacity_is_never_exceeded(t in 1usize..40, e in 1usize..6, kk in 0usize..6, cf in 0.2f64..2.0, seed in any::<u64>()) {
        let k = 1 + kk % e;
        let mut cfg = MoeConfig::new(4, 3, e, k);
        cfg.capacity_factor = Some(cf);
        let (_s, layer) = layer_with(&cfg, DType::F32, seed);
        let x = Tensor::randn(seed, (t, 4), 0.0, 1.0, DType::F32, &cpu()).unwrap();
        let y = layer.forward(&Var::constant(x), &MoeContext::default()).unwrap();
        let cap = cfg.capacity(t).unwrap();
        let st = &y.stats;
        let mut dropped = 0.0;
        for (c, kept) in st.counts.iter().zip(&st.kept) {
            prop_assert!(*kept <= cap as f64, "kept {kept} > capacity {cap}");
            prop_assert_eq!(*kept, c.min(cap as f64));
            dropped += c - kept;
        }
        prop_assert_eq!(dropped as usize, st.dropped);
        prop_assert!((st.dropped_fraction() - dropped / (t * k) as f64).abs() < 1e-12);
    }
}

#[test]
fn three_dim_input_and_empty_batch() {
    let cfg = MoeConfig::new(6, 5, 4, 2).with_shared_expert(4, true);
    let (_s, layer) = layer_with(&cfg, DType::F64, 2);
    let x = Tensor::randn(3, (2, 3, 6), 0.0, 1.0, DType::F64, &cpu()).unwrap();
    let y = layer.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
    assert_eq!(y.out.dims(), &[2, 3, 6]);
    let want = RefMoe::from_layer(&layer).forward(&x.to_vec_f64().unwrap());
    let got = y.out.tensor().to_vec_f64().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-10));
    let empty = Tensor::zeros((0, 6), DType::F64, &cpu()).unwrap();
    let y = layer.forward(&Var::constant(empty), &MoeContext::default()).unwrap();
    assert_eq!(y.out.dims(), &[0, 6]);
    assert_eq!(y.stats.assignments(), 0.0);
}

// ------------------------------------------------------------------ gradient checks

/// The checker's inputs are x followed by the layer's parameters; rebuild the weights from them.
fn weights_from(vs: &[Var], layer: &MoeLayer) -> MoeWeights {
    let nr = layer.router.len();
    let router = vs[1..1 + nr].to_vec();
    let mut i = 1 + nr;
    let gate_up = vs[i].clone();
    let down = vs[i + 1].clone();
    i += 2;
    let shared = layer.shared.as_ref().map(|(_, _, _, gate)| SharedExpertWeights {
        gate_proj: vs[i].clone(),
        up_proj: vs[i + 1].clone(),
        down_proj: vs[i + 2].clone(),
        gate: gate.as_ref().map(|_| vs[i + 3].clone()),
    });
    MoeWeights { router, gate_up, down, shared }
}

fn gradcheck_layer(cfg: &MoeConfig, x: Tensor, ctx: &MoeContext, with_aux: bool) {
    let (_s, layer) = layer_with(cfg, DType::F64, 11);
    let mut inputs = vec![x];
    inputs.extend(layer.params().iter().map(|p| p.tensor()));
    check_gradients(
        |vs: &[Var]| {
            let y = layer.forward_with(&vs[0], &weights_from(vs, &layer), ctx)?;
            if !with_aux {
                return Ok(y.out);
            }
            // Output plus every aux loss (each broadcast-free scalar added to the sum).
            let mut s = y.out.sum_all()?.scale(0.1)?;
            for l in [&y.aux.lb_loss, &y.aux.z_loss, &y.aux.usage_var_loss].into_iter().flatten() {
                s = s.add(l)?;
            }
            Ok(s)
        },
        &inputs,
        &GradCheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn gradient_check_through_the_whole_layer() {
    let x = Tensor::randn(21, (7, 5), 0.0, 1.0, DType::F64, &cpu()).unwrap();
    // Mixtral style, then Qwen2-MoE style (no renormalisation, gated shared expert), then
    // DeepSeek-V3 style (sigmoid scores, scaling).
    let mixtral = MoeConfig::new(5, 4, 4, 2);
    gradcheck_layer(&mixtral, x.clone(), &MoeContext::default(), false);
    gradcheck_layer(&mixtral, x.clone(), &MoeContext::default(), true);
    let mut qwen = MoeConfig::new(5, 4, 4, 2).with_shared_expert(3, true);
    qwen.normalize_topk = false;
    gradcheck_layer(&qwen, x.clone(), &MoeContext::default(), true);
    let mut ds = MoeConfig::new(5, 4, 5, 3).with_shared_expert(3, false);
    ds.score = MoeScoreFn::Sigmoid;
    ds.routed_scaling = 2.0;
    gradcheck_layer(&ds, x, &MoeContext::default(), false);
}

#[test]
fn router_gets_a_gradient_through_the_gate_weights() {
    let cfg = MoeConfig::new(5, 4, 4, 2);
    let (_s, layer) = layer_with(&cfg, DType::F64, 4);
    let x = Var::constant(Tensor::randn(1, (6, 5), 0.0, 1.0, DType::F64, &cpu()).unwrap());
    let w = layer.weights();
    let y = layer.forward_with(&x, &w, &MoeContext::default()).unwrap();
    let g = y.out.sum_all().unwrap().backward().unwrap();
    let gr = g.get(&w.router[0]).unwrap().to_vec_f64().unwrap();
    assert!(gr.iter().any(|v| v.abs() > 1e-8), "router gradient is zero: {gr:?}");
}

// ------------------------------------------------------------------ losses, balancing, monitoring

#[test]
fn usage_variance_and_routed_usage() {
    // Token 0 -> experts (0, 1) with weights (0.75, 0.25), token 1 -> (1, 2) with (0.5, 0.5).
    let w = Var::param(Tensor::from_vec(vec![0.75f64, 0.25, 0.5, 0.5], (2, 2), &cpu()).unwrap());
    let idx = Tensor::from_vec(vec![0u32, 1, 1, 2], (2, 2), &cpu()).unwrap();
    let u = routed_usage(&w, &idx, 4).unwrap();
    assert_eq!(u.tensor().to_vec::<f64>().unwrap(), vec![0.375, 0.375, 0.25, 0.0]);
    let v = usage_variance_loss(&u).unwrap();
    let mean = 0.25;
    let want = [0.375f64, 0.375, 0.25, 0.0].iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 4.0;
    assert!((v.tensor().to_scalar::<f64>().unwrap() - want).abs() < 1e-15);
    check_gradients(
        |vs| usage_variance_loss(&routed_usage(&vs[0], &idx, 4)?),
        &[w.tensor().clone()],
        &GradCheckOptions::default(),
    )
    .unwrap();
    // Uniform routing: lb loss is exactly 1 (Switch) and the usage variance 0.
    let mean_score = Var::constant(Tensor::from_vec(vec![0.25f64; 4], 4, &cpu()).unwrap());
    let counts = Tensor::from_vec(vec![2.0f64; 4], 4, &cpu()).unwrap();
    let lb = load_balancing_loss(&mean_score, &counts, 4, 2, LbConvention::Switch).unwrap();
    assert!((lb.tensor().to_scalar::<f64>().unwrap() - 1.0).abs() < 1e-15);
}

#[test]
fn weighted_total_uses_the_config_alphas() {
    let mut cfg = MoeConfig::new(4, 3, 3, 2);
    cfg.lb_loss_alpha = 0.5;
    cfg.z_loss_alpha = 0.25;
    cfg.usage_var_alpha = 0.0;
    let (_s, layer) = layer_with(&cfg, DType::F64, 8);
    let x = Var::constant(Tensor::randn(2, (5, 4), 0.0, 1.0, DType::F64, &cpu()).unwrap());
    let y = layer.forward(&x, &MoeContext::default()).unwrap();
    let s = |v: &Option<Var>| v.as_ref().unwrap().tensor().to_scalar::<f64>().unwrap();
    let total = y.aux.weighted_total(&cfg).unwrap().unwrap().tensor().to_scalar::<f64>().unwrap();
    assert!((total - (0.5 * s(&y.aux.lb_loss) + 0.25 * s(&y.aux.z_loss))).abs() < 1e-14);
    assert!(s(&y.aux.lb_loss) >= 1.0 - 1e-12, "lb >= 1 always for Switch convention");
}

#[test]
fn aux_free_bias_follows_the_deepseek_rule_and_steers_selection_only() {
    let b = BiasBalancer::new(4, 0.1);
    let nb = b.update(&[10.0, 2.0, 4.0, 4.0]).unwrap(); // mean 5
    assert_eq!(nb, vec![-0.1, 0.1, 0.1, 0.1]);
    let nb = b.update(&[5.0, 5.0, 5.0, 5.0]).unwrap();
    assert_eq!(nb, vec![-0.1, 0.1, 0.1, 0.1], "balanced load: no change");
    assert!(b.update(&[1.0]).is_err());

    let mut cfg = MoeConfig::new(4, 3, 4, 1);
    cfg.bias_balancing = Some(5.0);
    cfg.score = MoeScoreFn::Sigmoid;
    cfg.normalize_topk = false;
    let (_s, layer) = layer_with(&cfg, DType::F64, 3);
    let x = Var::constant(Tensor::randn(5, (16, 4), 0.0, 1.0, DType::F64, &cpu()).unwrap());
    let y0 = layer.forward(&x, &MoeContext::default()).unwrap();
    // A large rate: after one update every overloaded expert is pushed far down.
    let bias = layer.update_balancing_bias(&y0.stats).unwrap().unwrap();
    assert_eq!(bias.len(), 4);
    let y1 = layer.forward(&x, &MoeContext::default()).unwrap();
    let usage0 = y0.stats.counts.clone();
    let mean = 4.0;
    for (e, (&c0, &c1)) in usage0.iter().zip(&y1.stats.counts).enumerate() {
        if c0 > mean {
            assert_eq!(c1, 0.0, "expert {e} was overloaded ({c0}) and should lose its tokens");
        }
    }
    // The bias only chooses: the weights stay the plain sigmoid scores of the chosen experts.
    let r = RefMoe::from_layer(&layer);
    let xs = x.tensor().to_vec_f64().unwrap();
    let idx = y1.assignment.as_ref().unwrap().to_vec_f64().unwrap();
    for (tkn, tok) in xs.chunks(4).enumerate() {
        let (scores, _, _) = r.route(tok);
        let e = idx[tkn] as usize;
        let biased: Vec<f64> = scores.iter().zip(&bias).map(|(s, b)| s + b).collect();
        let best = (0..4).max_by(|&a, &b| biased[a].total_cmp(&biased[b]).then(b.cmp(&a))).unwrap();
        assert_eq!(e, best, "token {tkn}");
    }
    // The output uses unbiased weights: compare with the reference weight of the chosen expert.
    let got = y1.out.tensor().to_vec_f64().unwrap();
    for (tkn, tok) in xs.chunks(4).enumerate() {
        let (scores, _, _) = r.route(tok);
        let e = idx[tkn] as usize;
        let want: Vec<f64> = r.expert(e, tok).iter().map(|v| v * scores[e]).collect();
        for (a, b) in got[tkn * 4..tkn * 4 + 4].iter().zip(&want) {
            assert!((a - b).abs() < 1e-10);
        }
    }
    let plain = layer_with(&MoeConfig::new(4, 3, 4, 1), DType::F64, 3).1;
    assert!(plain.update_balancing_bias(&y0.stats).unwrap().is_none());
}

#[test]
fn collapse_detector_warns_after_patience_steps() {
    let mut det = CollapseDetector::new(0.1, 3);
    let healthy = [0.3, 0.3, 0.2, 0.2];
    let starving = [0.5, 0.45, 0.05, 0.0];
    assert!(det.observe_usage(&healthy).is_none());
    assert!(det.observe_usage(&starving).is_none());
    assert!(det.observe_usage(&starving).is_none());
    let w = det.observe_usage(&starving).expect("third step below the threshold");
    let experts: Vec<usize> = w.experts.iter().map(|e| e.expert).collect();
    assert_eq!(experts, vec![2, 3]);
    assert_eq!(w.experts[0].steps_below, 3);
    assert!(w.to_string().contains("expert 2"), "{w}");
    // Recovery resets the count.
    assert!(det.observe_usage(&healthy).is_none());
    assert!(det.observe_usage(&starving).is_none());
    // From stats.
    let stats = RoutingStats::new(10, vec![10.0, 10.0, 0.0], vec![10.0, 10.0, 0.0], 0, None).unwrap();
    let mut det = CollapseDetector::new(0.05, 1);
    let w = det.observe(&stats).unwrap();
    assert_eq!(w.experts[0].expert, 2);
    assert!((stats.usage_entropy() - 2f64.ln()).abs() < 1e-12);
    assert!((stats.max_load_ratio() - 1.5).abs() < 1e-12);
}

#[test]
fn routing_entropy_is_reported() {
    let cfg = MoeConfig::new(4, 3, 4, 2);
    let (_s, layer) = layer_with(&cfg, DType::F64, 5);
    // Zero router: uniform scores, entropy ln E.
    layer.router[0].set(Tensor::zeros((4, 4), DType::F64, &cpu()).unwrap()).unwrap();
    let x = Var::constant(Tensor::randn(5, (6, 4), 0.0, 1.0, DType::F64, &cpu()).unwrap());
    let y = layer.forward(&x, &MoeContext::default()).unwrap();
    assert!((y.stats.entropy.unwrap() - 4f64.ln()).abs() < 1e-12);
    // Uniform scores tie: the lower indices win, so experts 0 and 1 take everything.
    assert_eq!(y.stats.counts, vec![6.0, 6.0, 0.0, 0.0]);
}

#[test]
fn jitter_applies_in_training_only_and_is_seeded() {
    let mut cfg = MoeConfig::new(6, 3, 6, 2);
    cfg.jitter_noise = 0.5;
    let (_s, layer) = layer_with(&cfg, DType::F64, 9);
    let x = Var::constant(Tensor::randn(5, (64, 6), 0.0, 1.0, DType::F64, &cpu()).unwrap());
    let eval = layer.forward(&x, &MoeContext::default()).unwrap();
    let want = RefMoe::from_layer(&layer).forward(&x.tensor().to_vec_f64().unwrap());
    let got = eval.out.tensor().to_vec_f64().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-10), "no jitter in eval");
    let a = layer.forward(&x, &MoeContext::training(3, 1)).unwrap();
    let b = layer.forward(&x, &MoeContext::training(3, 1)).unwrap();
    let c = layer.forward(&x, &MoeContext::training(4, 1)).unwrap();
    let ia = a.assignment.unwrap().to_vec_f64().unwrap();
    assert_eq!(ia, b.assignment.unwrap().to_vec_f64().unwrap(), "same seed and step");
    let ie = eval.assignment.unwrap().to_vec_f64().unwrap();
    let ic = c.assignment.unwrap().to_vec_f64().unwrap();
    assert!(ia != ie || ia != ic, "jitter of ±50% should move some of 64 tokens");
}

// ------------------------------------------------------------------ bad input

#[test]
fn bad_config_and_inputs_are_errors_naming_them() {
    let err = |cfg: MoeConfig| cfg.validate().unwrap_err().to_string();
    let e = err(MoeConfig::new(4, 3, 2, 3));
    assert!(e.contains("experts_per_tok") && e.contains("num_experts"), "{e}");
    let e = err(MoeConfig::new(4, 3, 0, 1));
    assert!(e.contains("num_experts") && e.contains("zero experts"), "{e}");
    let e = err(MoeConfig::new(4, 3, 2, 0));
    assert!(e.contains("experts_per_tok"), "{e}");
    let mut c = MoeConfig::new(4, 3, 4, 1);
    c.capacity_factor = Some(0.0);
    assert!(err(c).contains("capacity_factor"));
    let mut c = MoeConfig::new(4, 3, 4, 1);
    c.shared_expert_enabled = true;
    assert!(err(c).contains("shared_expert_d_ff"));
    let mut c = MoeConfig::new(4, 3, 4, 1);
    c.jitter_noise = 1.5;
    assert!(err(c).contains("jitter_noise"));
    let store = ParamStore::new(DType::F32, cpu(), 0);
    let e = MoeLayer::new(&store.root(), &MoeConfig::new(4, 3, 2, 3)).unwrap_err().to_string();
    assert!(e.contains("experts_per_tok"), "{e}");

    let (_s, layer) = layer_with(&MoeConfig::new(4, 3, 3, 2), DType::F32, 0);
    let ctx = MoeContext::default();
    // Wrong width.
    let x = Var::constant(Tensor::zeros((5, 6), DType::F32, &cpu()).unwrap());
    let e = layer.forward(&x, &ctx).unwrap_err().to_string();
    assert!(e.contains("MoeLayer::forward") && e.contains("[5, 6]"), "{e}");
    // A router of the wrong shape.
    let x = Var::constant(Tensor::zeros((5, 4), DType::F32, &cpu()).unwrap());
    let mut w = layer.weights();
    w.router[0] = Var::constant(Tensor::zeros((2, 4), DType::F32, &cpu()).unwrap());
    let e = layer.forward_with(&x, &w, &ctx).unwrap_err().to_string();
    assert!(e.contains("gate.weight") && e.contains("[2, 4]"), "{e}");
    // Expert weights of the wrong shape.
    let mut w = layer.weights();
    w.down = Var::constant(Tensor::zeros((3, 4, 4), DType::F32, &cpu()).unwrap());
    let e = layer.forward_with(&x, &w, &ctx).unwrap_err().to_string();
    assert!(e.contains("down_proj"), "{e}");
    // Integer input.
    let xi = Var::constant(Tensor::zeros((5, 4), DType::U32, &cpu()).unwrap());
    assert!(layer.forward(&xi, &ctx).is_err());
}
