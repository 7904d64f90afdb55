//! MoE kernels (top-k gating, routing plans, permutation, grouped GEMM) against the f64
//! references and the torch fixture `topk_gating.safetensors`: random shapes (sizes that are not
//! multiples of the 6×16 micro-tile, size 1, empty groups, no tokens), strided inputs
//! (transposed, narrowed, broadcast), f32 / f64 / bf16, every backward, the error messages.

mod cpu_common;

use std::path::PathBuf;

use cpu_common::{assert_close, make};
use moeba_kernels::{cpu, ops, reference};
use moeba_tensor::{DType, Device, Rng, Tensor};
use ops::{MoeScoreFn, TopkGatingOptions};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn fixture(name: &str) -> Option<std::collections::HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/ops").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_tensor::safetensors_io::deserialize(&bytes, &CPU).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

/// Max |got - want| relative to max(1, max |want|).
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let scale = w.iter().fold(1.0f64, |a, v| a.max(v.abs()));
    g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale
}

fn scalar(x: &Tensor) -> f64 {
    x.to_vec_f64().unwrap()[0]
}

#[test]
fn topk_gating_matches_fixture_f64_and_f32() {
    let Some(f) = fixture("topk_gating.safetensors") else { return };
    let (t, e) = (f["logits"].dims()[0], f["logits"].dims()[1]);
    let k = f["topk_idx"].dims()[1];
    let opts = TopkGatingOptions::softmax(k);
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let logits = f["logits"].to_dtype(dtype).unwrap();
        let g = ops::topk_gating(&logits, None, &opts).unwrap();
        let idx: Vec<f64> = g.indices.to_vec_f64().unwrap();
        assert_eq!(idx, f["topk_idx"].to_vec_f64().unwrap(), "{dtype}: indices");
        let check = |what: &str, got: &Tensor, want: &Tensor| {
            let err = rel_err(got, want);
            assert!(err <= tol, "{dtype}: {what}: relative error {err:e} > {tol:e}");
        };
        check("weights", &g.weights, &f["topk_weight"]);
        check("scores", &g.scores, &f["probs"]);
        check("counts", &g.counts, &f["expert_counts"]);
        check("mean_score", &g.mean_score, &f["mean_prob"]);
        // The losses from the pieces.
        let counts = g.counts.to_vec_f64().unwrap();
        let p = g.mean_score.to_vec_f64().unwrap();
        let lse = g.lse.to_vec_f64().unwrap();
        let lb_hf: f64 = e as f64 * counts.iter().zip(&p).map(|(c, p)| c / t as f64 * p).sum::<f64>();
        let lb_sw: f64 = e as f64 * counts.iter().zip(&p).map(|(c, p)| c / (t * k) as f64 * p).sum::<f64>();
        let z: f64 = lse.iter().map(|l| l * l).sum::<f64>() / t as f64;
        for (what, got, want) in [
            ("lb_loss_hf", lb_hf, scalar(&f["lb_loss_hf"])),
            ("lb_loss_switch", lb_sw, scalar(&f["lb_loss_switch"])),
            ("z_loss", z, scalar(&f["z_loss"])),
        ] {
            assert!((got - want).abs() <= tol * want.abs().max(1.0), "{dtype}: {what}: {got} vs {want}");
        }
        // Gradients through each output.
        let vec_t = |v: Vec<f64>, n: usize| Tensor::from_vec(v, n, &CPU).unwrap().to_dtype(dtype).unwrap();
        let gw = f["grad_topk_weight"].to_dtype(dtype).unwrap();
        let g_lb_hf = vec_t(counts.iter().map(|c| e as f64 * c / t as f64).collect(), e);
        let g_lb_sw = vec_t(counts.iter().map(|c| e as f64 * c / (t * k) as f64).collect(), e);
        let g_z = vec_t(lse.iter().map(|l| 2.0 * l / t as f64).collect(), t);
        let bw = |w: Option<&Tensor>, m: Option<&Tensor>, l: Option<&Tensor>| {
            ops::topk_gating_backward(&logits, &g, &opts, w, m, l).unwrap()
        };
        check("grad_logits_from_weights", &bw(Some(&gw), None, None), &f["grad_logits_from_weights"]);
        check("grad_logits_from_lb_hf", &bw(None, Some(&g_lb_hf), None), &f["grad_logits_from_lb_hf"]);
        check(
            "grad_logits_from_lb_switch",
            &bw(None, Some(&g_lb_sw), None),
            &f["grad_logits_from_lb_switch"],
        );
        check("grad_logits_from_z", &bw(None, None, Some(&g_z)), &f["grad_logits_from_z"]);
        let (lb_coef, z_coef) = (scalar(&f["lb_coef"]), scalar(&f["z_coef"]));
        let gm = ops::affine(&g_lb_sw, lb_coef, 0.0).unwrap();
        let gl = ops::affine(&g_z, z_coef, 0.0).unwrap();
        check("grad_logits_total", &bw(Some(&gw), Some(&gm), Some(&gl)), &f["grad_logits_total"]);
    }
}

#[test]
fn ties_go_to_the_lower_index_and_bias_only_selects() {
    // Equal logits: experts 0..k in order.
    let logits = Tensor::zeros((3, 5), DType::F32, &CPU).unwrap();
    let g = ops::topk_gating(&logits, None, &TopkGatingOptions::softmax(3)).unwrap();
    assert_eq!(g.indices.to_vec::<u32>().unwrap(), vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    for w in g.weights.to_vec::<f32>().unwrap() {
        assert!((w - 1.0 / 3.0).abs() < 1e-6);
    }
    // A tie between an entry pushed down the list and a later equal one: the lower index wins
    // (the displaced 0.5 of expert 0 beats the later 0.5 of expert 4), as in the reference.
    let logits = Tensor::from_vec(vec![0.5f32, -1.5, -1.0, 2.5, 0.5, 2.0], (1, 6), &CPU).unwrap();
    let g = ops::topk_gating(&logits, None, &TopkGatingOptions::softmax(3)).unwrap();
    assert_eq!(g.indices.to_vec::<u32>().unwrap(), vec![3, 5, 0]);
    let want = reference::moe::topk_gating(&logits, None, &TopkGatingOptions::softmax(3)).unwrap();
    assert_eq!(want.indices.to_vec::<u32>().unwrap(), vec![3, 5, 0]);
    // A bias moves the choice but not the weights: expert 4 is chosen with its unbiased score.
    let logits = Tensor::from_vec(vec![2.0f64, 1.0, 0.0, 0.0, -1.0], (1, 5), &CPU).unwrap();
    let bias = Tensor::from_vec(vec![0.0f64, 0.0, 0.0, 0.0, 10.0], 5, &CPU).unwrap();
    let opts = TopkGatingOptions { k: 2, score: MoeScoreFn::Sigmoid, renormalize: false, scaling: 2.5 };
    let g = ops::topk_gating(&logits, Some(&bias), &opts).unwrap();
    assert_eq!(g.indices.to_vec::<u32>().unwrap(), vec![4, 0]);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let w = g.weights.to_vec::<f64>().unwrap();
    assert!((w[0] - 2.5 * sig(-1.0)).abs() < 1e-12 && (w[1] - 2.5 * sig(2.0)).abs() < 1e-12);
    // Counts before drops; the lse is the logits' logsumexp even for sigmoid scores.
    assert_eq!(g.counts.to_vec::<f64>().unwrap(), vec![1.0, 0.0, 0.0, 0.0, 1.0]);
    let lse = (2f64.exp() + 1f64.exp() + 2.0 + (-1f64).exp()).ln();
    assert!((g.lse.to_vec::<f64>().unwrap()[0] - lse).abs() < 1e-12);
}

#[test]
fn selection_at_many_expert_counts_and_nan() {
    // Small and large expert counts, k = E, one expert.
    for (t, e, k) in [(9usize, 64usize, 8usize), (9, 65, 8), (5, 200, 6), (4, 3, 3), (6, 1, 1)] {
        for dtype in [DType::F64, DType::F32] {
            let logits = Tensor::from_vec(separated_logits(e as u64, t, e), (t, e), &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let opts = TopkGatingOptions::softmax(k);
            let got = ops::topk_gating(&logits, None, &opts).unwrap();
            let want = reference::moe::topk_gating(&logits, None, &opts).unwrap();
            assert_eq!(
                got.indices.to_vec::<u32>().unwrap(),
                want.indices.to_vec::<u32>().unwrap(),
                "{t}x{e} top{k}"
            );
            assert_close(&got.weights, &want.weights, dtype, "weights");
        }
    }
    // Ties by value with many experts: lower index first.
    let g = ops::topk_gating(
        &Tensor::zeros((2, 70), DType::F32, &CPU).unwrap(),
        None,
        &TopkGatingOptions::softmax(3),
    )
    .unwrap();
    assert_eq!(g.indices.to_vec::<u32>().unwrap(), vec![0, 1, 2, 0, 1, 2]);
    // A NaN logit: no panic, k distinct valid experts (the row's weights are NaN, as torch's).
    let mut v = vec![0.5f32, -1.0, 2.0, 0.0];
    v[1] = f32::NAN;
    let g =
        ops::topk_gating(&Tensor::from_vec(v, (1, 4), &CPU).unwrap(), None, &TopkGatingOptions::softmax(2))
            .unwrap();
    let mut idx = g.indices.to_vec::<u32>().unwrap();
    idx.sort();
    idx.dedup();
    assert!(idx.len() == 2 && idx.iter().all(|&i| i < 4), "{idx:?}");
}

#[test]
fn gating_errors_name_the_problem() {
    let logits = Tensor::zeros((4, 3), DType::F32, &CPU).unwrap();
    let msg = |r: moeba_tensor::Result<ops::TopkGating>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(ops::topk_gating(&logits, None, &TopkGatingOptions::softmax(4))).contains("k = 4"));
    assert!(msg(ops::topk_gating(&logits, None, &TopkGatingOptions::softmax(0))).contains("k = 0"));
    let none = Tensor::zeros((4, 0), DType::F32, &CPU).unwrap();
    assert!(msg(ops::topk_gating(&none, None, &TopkGatingOptions::softmax(1))).contains("zero experts"));
    let bias = Tensor::zeros(4, DType::F32, &CPU).unwrap();
    assert!(msg(ops::topk_gating(&logits, Some(&bias), &TopkGatingOptions::softmax(1)))
        .contains("selection_bias"));
    let ids = Tensor::from_vec(vec![0u32, 5], (1, 2), &CPU).unwrap();
    let err = ops::moe_plan_from_topk(&ids, 3, None).unwrap_err().to_string();
    assert!(err.contains("indices[0, 1] = 5"), "{err}");
    let x = Tensor::zeros((5, 4), DType::F32, &CPU).unwrap();
    let w = Tensor::zeros((2, 3, 4), DType::F32, &CPU).unwrap();
    let bad = Tensor::from_vec(vec![0i64, 3, 2], 3, &CPU).unwrap();
    let err = ops::grouped_matmul(&x, &w, &bad).unwrap_err().to_string();
    assert!(err.contains("expert_offsets"), "{err}");
    let short = Tensor::from_vec(vec![0i64, 5], 2, &CPU).unwrap();
    assert!(ops::grouped_matmul(&x, &w, &short).unwrap_err().to_string().contains("E + 1"));
}

/// Logits whose per-row (score + bias) values are at least `gap` apart after the score function,
/// so that selections cannot differ by rounding: a permutation of a spread-out grid, plus noise.
fn separated_logits(seed: u64, t: usize, e: usize) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(t * e);
    for _ in 0..t {
        let mut p: Vec<usize> = (0..e).collect();
        for i in (1..e).rev() {
            p.swap(i, rng.below(i as u64 + 1) as usize);
        }
        v.extend(p.iter().map(|&i| (i as f64 - e as f64 / 2.0) * 0.3 + 0.01 * rng.uniform()));
    }
    v
}

/// Whether the reference's (score + bias) values of each row are pairwise separated by > 1e-4
/// among the top k + 1 (so f32 rounding cannot change the selection).
fn well_separated(want: &ops::TopkGating, bias: Option<&Tensor>, k: usize) -> bool {
    let (t, e) = (want.scores.dims()[0], want.scores.dims()[1]);
    let s = want.scores.to_vec_f64().unwrap();
    let b = bias.map(|b| b.to_vec_f64().unwrap()).unwrap_or(vec![0.0; e]);
    (0..t).all(|tok| {
        let mut v: Vec<f64> = (0..e).map(|j| s[tok * e + j] + b[j]).collect();
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        v.windows(2).take(k).all(|w| w[0] - w[1] > 1e-4)
    })
}

fn gating_case() -> impl Strategy<Value = (usize, usize, usize, bool, bool, bool, u8, DType, u64)> {
    (0usize..40, 1usize..20).prop_flat_map(|(t, e)| {
        (
            Just(t),
            Just(e),
            1..=e,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            prop_oneof![Just(DType::F32), Just(DType::F64)],
            any::<u64>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gating_matches_reference((t, e, k, sigmoid, renorm, biased, layout, dtype, seed) in gating_case()) {
        let raw = separated_logits(seed, t, e);
        // 0: contiguous, 1: a transposed view, 2: a narrowed view of a wider tensor.
        let logits = match layout {
            1 => {
                let mut tr = vec![0.0; t * e];
                for i in 0..t { for j in 0..e { tr[j * t + i] = raw[i * e + j]; } }
                Tensor::from_vec(tr, (e, t), &CPU).unwrap().t().unwrap()
            }
            2 => {
                let mut wide = vec![-7.0; t * (e + 2)];
                for i in 0..t { for j in 0..e { wide[i * (e + 2) + j + 1] = raw[i * e + j]; } }
                Tensor::from_vec(wide, (t, e + 2), &CPU).unwrap().narrow(1, 1, e).unwrap()
            }
            _ => Tensor::from_vec(raw, (t, e), &CPU).unwrap(),
        }.to_dtype(dtype).unwrap();
        let bias = biased.then(|| Tensor::rand(seed ^ 1, e, -0.2, 0.2, dtype, &CPU).unwrap());
        let opts = TopkGatingOptions {
            k,
            score: if sigmoid { MoeScoreFn::Sigmoid } else { MoeScoreFn::Softmax },
            renormalize: renorm,
            scaling: if seed % 2 == 0 { 1.0 } else { 1.7 },
        };
        let got = ops::topk_gating(&logits, bias.as_ref(), &opts).unwrap();
        let want = reference::moe::topk_gating(&logits, bias.as_ref(), &opts).unwrap();
        prop_assume!(dtype == DType::F64 || well_separated(&want, bias.as_ref(), k));
        prop_assert_eq!(got.indices.to_vec::<u32>().unwrap(), want.indices.to_vec::<u32>().unwrap());
        assert_close(&got.weights, &want.weights, dtype, "weights");
        assert_close(&got.scores, &want.scores, dtype, "scores");
        assert_close(&got.counts, &want.counts, DType::F64, "counts");
        assert_close(&got.mean_score, &want.mean_score, dtype, "mean_score");
        assert_close(&got.lse, &want.lse, dtype, "lse");
        prop_assert!((got.counts.to_vec_f64().unwrap().iter().sum::<f64>() - (t * k) as f64).abs() < 1e-9);
        if renorm {
            for row in got.weights.to_vec_f64().unwrap().chunks(k) {
                let s: f64 = row.iter().sum();
                prop_assert!((s - opts.scaling).abs() < 1e-5 * opts.scaling, "weights sum {}", s);
            }
        }
        // Backward against the Jacobian-based reference, every cotangent at once and one by one.
        let gw = Tensor::randn(seed ^ 2, (t, k), 0.0, 1.0, dtype, &CPU).unwrap();
        let gm = Tensor::randn(seed ^ 3, e, 0.0, 1.0, dtype, &CPU).unwrap();
        let gl = Tensor::randn(seed ^ 4, t, 0.0, 1.0, dtype, &CPU).unwrap();
        for which in 0..4 {
            let pick = |i: usize, x: &Tensor| (which == 3 || which == i).then(|| x.clone());
            let (a, b, c) = (pick(0, &gw), pick(1, &gm), pick(2, &gl));
            let got_g = ops::topk_gating_backward(&logits, &got, &opts, a.as_ref(), b.as_ref(), c.as_ref()).unwrap();
            let want_g = reference::moe::topk_gating_backward(
                &logits, &opts, bias.as_ref(), a.as_ref(), b.as_ref(), c.as_ref()).unwrap();
            assert_close(&got_g, &want_g, dtype, "grad_logits");
        }
    }

    #[test]
    fn plans_match_reference_and_respect_capacity(
        t in 0usize..50, e in 1usize..12, k_raw in 1usize..5, cap in prop::option::of(0usize..8),
        skew in any::<bool>(), i64_ids in any::<bool>(), seed in any::<u64>()
    ) {
        let k = k_raw.min(e);
        let mut rng = Rng::new(seed);
        let mut ids = Vec::with_capacity(t * k);
        for _ in 0..t {
            // k distinct experts per token; skewed loads favour the first two experts.
            let mut p: Vec<usize> = (0..e).collect();
            for i in (1..e).rev() { p.swap(i, rng.below(i as u64 + 1) as usize); }
            if skew { p.sort_by_key(|&x| if x < 2 { 0 } else { 1 }); }
            ids.extend(p[..k].iter().map(|&x| x as u32));
        }
        let indices = Tensor::from_vec(ids.clone(), (t, k), &CPU).unwrap();
        let indices = if i64_ids { indices.to_dtype(DType::I64).unwrap() } else { indices };
        let got = ops::moe_plan_from_topk(&indices, e, cap).unwrap();
        let want = reference::moe::plan_from_topk(&indices, e, cap).unwrap();
        prop_assert_eq!(got.expert_offsets.to_vec::<i64>().unwrap(), want.expert_offsets.to_vec::<i64>().unwrap());
        prop_assert_eq!(got.row_token.to_vec::<u32>().unwrap(), want.row_token.to_vec::<u32>().unwrap());
        prop_assert_eq!(got.row_slot.to_vec::<u32>().unwrap(), want.row_slot.to_vec::<u32>().unwrap());
        prop_assert_eq!(got.dropped, want.dropped);
        prop_assert_eq!(got.num_rows() + got.dropped, t * k);
        let rows = got.expert_rows().unwrap();
        if let Some(c) = cap { prop_assert!(rows.iter().all(|&r| r <= c)); }
        // Row r's slot points back at its expert; tokens ascend within each group.
        let offs = got.offsets_host().unwrap();
        let (toks, slots) = (got.row_token.to_vec::<u32>().unwrap(), got.row_slot.to_vec::<u32>().unwrap());
        for ex in 0..e {
            for r in offs[ex]..offs[ex + 1] {
                prop_assert_eq!(ids[slots[r] as usize] as usize, ex);
                prop_assert_eq!(slots[r] as usize / k, toks[r] as usize);
                if r > offs[ex] { prop_assert!(slots[r] > slots[r - 1]); }
            }
        }
    }

    #[test]
    fn permute_unpermute_match_reference_and_invert(
        t in 0usize..30, e in 1usize..8, k_raw in 1usize..4, d in 0usize..20, cap in prop::option::of(0usize..6),
        view in cpu_common::view(), dtype in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::BF16)],
        seed in any::<u64>()
    ) {
        let k = k_raw.min(e);
        let logits = Tensor::from_vec(separated_logits(seed, t, e), (t, e), &CPU).unwrap();
        let g = ops::topk_gating(&logits, None, &TopkGatingOptions::softmax(k)).unwrap();
        let plan = ops::moe_plan_from_topk(&g.indices, e, cap).unwrap();
        let x = make(seed, &[t, d], dtype, view, -1.0, 1.0).unwrap();
        let xs = ops::moe_permute(&x, &plan).unwrap();
        assert_close(&xs, &reference::moe::permute(&x, &plan).unwrap(), dtype, "permute");
        let rw = ops::index_select(&g.weights.flatten_all().unwrap(), 0, &plan.row_slot).unwrap().to_dtype(dtype).unwrap();
        let y = make(seed ^ 9, &[plan.num_rows(), d], dtype, view, -1.0, 1.0).unwrap();
        let out = ops::moe_unpermute(&y, &rw, &plan).unwrap();
        assert_close(&out, &reference::moe::unpermute(&y, Some(&rw), &plan).unwrap(), dtype, "unpermute");
        let back = ops::moe_permute_backward(&y, &plan).unwrap();
        assert_close(&back, &reference::moe::unpermute(&y, None, &plan).unwrap(), dtype, "permute_backward");
        let go = make(seed ^ 11, &[t, d], dtype, view, -1.0, 1.0).unwrap();
        let (dy, dw) = ops::moe_unpermute_backward(&y, &rw, &plan, &go).unwrap();
        let (wdy, wdw) = reference::moe::unpermute_backward(&y, &rw, &plan, &go).unwrap();
        assert_close(&dy, &wdy, dtype, "unpermute_backward dy");
        assert_close(&dw, &wdw, dtype, "unpermute_backward dw");
        // With renormalised weights and nothing dropped, unpermute ∘ permute is the identity.
        if plan.dropped == 0 && dtype != DType::BF16 {
            let id = ops::moe_unpermute(&xs, &rw, &plan).unwrap();
            assert_close(&id, &x.to_dtype(DType::F64).unwrap(), dtype, "unpermute(permute(x))");
        }
    }

    #[test]
    fn grouped_matmul_matches_reference(
        groups in prop::collection::vec(prop_oneof![3 => 0usize..20, 1 => Just(0usize)], 1..6),
        inn in 1usize..40, out in 1usize..40, xview in 0u8..3, wview in 0u8..3,
        dtype in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::BF16)], seed in any::<u64>()
    ) {
        let e = groups.len();
        let r: usize = groups.iter().sum();
        let mut offs = vec![0i64];
        for g in &groups { offs.push(offs.last().unwrap() + *g as i64); }
        let offsets = Tensor::from_vec(offs, e + 1, &CPU).unwrap();
        let x = match xview {
            1 => Tensor::randn(seed, (inn, r), 0.0, 1.0, dtype, &CPU).unwrap().t().unwrap(),
            2 => Tensor::randn(seed, (r + 2, inn + 3), 0.0, 1.0, dtype, &CPU).unwrap()
                .narrow(0, 1, r).unwrap().narrow(1, 2, inn).unwrap(),
            _ => Tensor::randn(seed, (r, inn), 0.0, 1.0, dtype, &CPU).unwrap(),
        };
        let w = match wview {
            1 => Tensor::randn(seed ^ 1, (e, inn, out), 0.0, 1.0, dtype, &CPU).unwrap().t().unwrap(),
            2 => Tensor::randn(seed ^ 1, (e, 1, inn), 0.0, 1.0, dtype, &CPU).unwrap().broadcast_as((e, out, inn)).unwrap(),
            _ => Tensor::randn(seed ^ 1, (e, out, inn), 0.0, 1.0, dtype, &CPU).unwrap(),
        };
        let g = Tensor::randn(seed ^ 2, (r, out), 0.0, 1.0, dtype, &CPU).unwrap();
        let scale = (inn.max(out).max(r) as f64).sqrt();
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            let err = rel_err(got, want);
            let tol = match dtype { DType::F64 => 1e-12, DType::F32 => 1e-5, _ => 2e-2 } * scale;
            assert!(err <= tol, "{what}: {dtype}: relative error {err:e} > {tol:e}");
        };
        let y = ops::grouped_matmul(&x, &w, &offsets).unwrap();
        close(&y, &reference::moe::grouped_matmul(&x, &w, &offsets).unwrap(), "forward");
        let (dx, dw) = ops::grouped_matmul_backward(&x, &w, &offsets, &g).unwrap();
        let (wdx, wdw) = reference::moe::grouped_matmul_backward(&x, &w, &offsets, &g).unwrap();
        close(&dx, &wdx, "dx");
        close(&dw, &wdw, "dw");
        // The fast path against the portable one, which runs every dtype through cpu::matmul.
        let offs: Vec<usize> = offsets.to_vec::<i64>().unwrap().iter().map(|&o| o as usize).collect();
        close(&y, &cpu::grouped_gemm::generic_forward(&x, &w, &offs).unwrap(), "generic forward");
        let (gdx, gdw) = cpu::grouped_gemm::generic_backward(&x, &w, &offs, &g).unwrap();
        close(&dx, &gdx, "generic dx");
        close(&dw, &gdw, "generic dw");
    }

    #[test]
    fn swiglu_experts_forward_matches_reference(
        groups in prop::collection::vec(prop_oneof![3 => 0usize..20, 1 => Just(0usize)], 1..6),
        d in 0usize..24, f in 0usize..21, d_out in 1usize..20, xview in 0u8..3, wview in 0u8..3,
        keep in any::<bool>(), dtype in prop_oneof![Just(DType::F32), Just(DType::F64)], seed in any::<u64>()
    ) {
        let e = groups.len();
        let r: usize = groups.iter().sum();
        let mut offs = vec![0i64];
        for g in &groups { offs.push(offs.last().unwrap() + *g as i64); }
        let offsets = Tensor::from_vec(offs, e + 1, &CPU).unwrap();
        let x = match xview {
            1 => Tensor::randn(seed, (d, r), 0.0, 1.0, dtype, &CPU).unwrap().t().unwrap(),
            2 => Tensor::randn(seed, (r + 2, d + 3), 0.0, 1.0, dtype, &CPU).unwrap()
                .narrow(0, 1, r).unwrap().narrow(1, 2, d).unwrap(),
            _ => Tensor::randn(seed, (r, d), 0.0, 1.0, dtype, &CPU).unwrap(),
        };
        let (gu, dn) = match wview {
            // Transposed storage, and a down weight broadcast over its output rows.
            1 => (
                Tensor::randn(seed ^ 1, (e, d, 2 * f), 0.0, 1.0, dtype, &CPU).unwrap().t().unwrap(),
                Tensor::randn(seed ^ 3, (e, 1, f), 0.0, 1.0, dtype, &CPU).unwrap().broadcast_as((e, d_out, f)).unwrap(),
            ),
            // Narrowed views of bigger weights.
            2 => (
                Tensor::randn(seed ^ 1, (e + 1, 2 * f + 1, d), 0.0, 1.0, dtype, &CPU).unwrap()
                    .narrow(0, 1, e).unwrap().narrow(1, 1, 2 * f).unwrap(),
                Tensor::randn(seed ^ 3, (e, d_out, f + 2), 0.0, 1.0, dtype, &CPU).unwrap().narrow(2, 2, f).unwrap(),
            ),
            _ => (
                Tensor::randn(seed ^ 1, (e, 2 * f, d), 0.0, 1.0, dtype, &CPU).unwrap(),
                Tensor::randn(seed ^ 3, (e, d_out, f), 0.0, 1.0, dtype, &CPU).unwrap(),
            ),
        };
        let (y, saved) = ops::moe_swiglu_experts_forward(&x, &gu, &dn, &offsets, keep).unwrap();
        prop_assert_eq!(saved.is_some(), keep);
        // The reference: f64 grouped GEMMs and SwiGLU, one op after the other.
        let h_ref = reference::moe::grouped_matmul(&x, &gu, &offsets).unwrap();
        let a_ref = reference::moe::swiglu(&h_ref).unwrap();
        let y_ref = reference::moe::grouped_matmul(&a_ref, &dn, &offsets).unwrap();
        let scale = ((d.max(f).max(1)) as f64).sqrt() * (1.0 + d as f64);
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            let err = rel_err(got, want);
            let tol = match dtype { DType::F64 => 1e-12, _ => 1e-5 } * scale;
            assert!(err <= tol, "{what}: {dtype}: relative error {err:e} > {tol:e}");
        };
        close(&y, &y_ref, "y");
        if let Some((h, a)) = &saved {
            close(h, &h_ref, "h");
            close(a, &a_ref, "a");
        }
        // The fused path against the three-op composite of the same kernels.
        let offs: Vec<usize> = offsets.to_vec::<i64>().unwrap().iter().map(|&o| o as usize).collect();
        let (yc, _) = cpu::grouped_gemm::swiglu_experts_composite(&x, &gu, &dn, &offs, false).unwrap();
        close(&y, &yc, "composite y");
    }
}

#[test]
fn swiglu_experts_forward_in_several_chunks() {
    // Groups big enough that the fused forward takes them in several chunks of experts (2^21
    // pre-activation floats each), with empty and tiny groups in between; keep and no-keep
    // must agree with each other and with the three-op composite.
    let groups = [1100usize, 0, 1100, 900, 3, 1200, 0];
    let (d, f, d_out) = (8usize, 512usize, 5usize);
    let e = groups.len();
    let r: usize = groups.iter().sum();
    let mut offs = vec![0usize];
    for g in groups {
        offs.push(offs.last().unwrap() + g);
    }
    let offsets = Tensor::from_vec(offs.iter().map(|&o| o as i64).collect::<Vec<_>>(), e + 1, &CPU).unwrap();
    let x = Tensor::randn(1, (r, d), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let gu = Tensor::randn(2, (e, 2 * f, d), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let dn = Tensor::randn(3, (e, d_out, f), 0.0, 0.1, DType::F32, &CPU).unwrap();
    let (y, saved) = ops::moe_swiglu_experts_forward(&x, &gu, &dn, &offsets, true).unwrap();
    let (h, a) = saved.unwrap();
    let (y2, none) = ops::moe_swiglu_experts_forward(&x, &gu, &dn, &offsets, false).unwrap();
    assert!(none.is_none());
    let (yc, hc) = cpu::grouped_gemm::swiglu_experts_composite(&x, &gu, &dn, &offs, true).unwrap();
    let (hc, ac) = hc.unwrap();
    assert!(rel_err(&y, &yc) < 1e-6);
    assert!(rel_err(&y2, &yc) < 1e-6);
    assert!(rel_err(&h, &hc) < 1e-6);
    assert!(rel_err(&a, &ac) < 1e-6);
    // Deterministic whatever the chunking and the threads.
    assert_eq!(y.to_vec::<f32>().unwrap(), y2.to_vec::<f32>().unwrap());
    // Bad shapes name the op and the weights.
    let bad = Tensor::zeros((e, d_out, f + 1), DType::F32, &CPU).unwrap();
    let err = ops::moe_swiglu_experts_forward(&x, &gu, &bad, &offsets, false).unwrap_err().to_string();
    assert!(err.contains("moe_swiglu_experts_forward") && err.contains("gate_up/down"), "{err}");
}

#[test]
fn swiglu_activation_and_backward() {
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        for (r, f) in [(0usize, 3usize), (1, 1), (7, 13), (33, 40)] {
            // A narrowed view: the kernel reads strided rows.
            let h = Tensor::randn(r as u64, (r, 2 * f + 3), 0.0, 2.0, dtype, &CPU)
                .unwrap()
                .narrow(1, 2, 2 * f)
                .unwrap();
            let g = Tensor::randn(7, (r, f), 0.0, 1.0, dtype, &CPU).unwrap();
            let a = ops::moe_swiglu(&h).unwrap();
            assert_close(&a, &reference::moe::swiglu(&h).unwrap(), dtype, "swiglu");
            let dh = ops::moe_swiglu_backward(&h, &g).unwrap();
            let want = reference::moe::swiglu_backward(&h, &g).unwrap();
            // The reference differentiates numerically: allow its O(eps²) error on top.
            let (gv, wv) = (dh.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
            let (atol, rtol) = cpu_common::tol(dtype);
            for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
                assert!(
                    (a - b).abs() <= atol.max(1e-8) + rtol * b.abs(),
                    "{dtype} swiglu_backward [{i}]: {a} vs {b}"
                );
            }
        }
    }
    let odd = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    assert!(ops::moe_swiglu(&odd).unwrap_err().to_string().contains("(R, 2f)"));
}

/// Grouped forward and backward of `groups` (rows per expert) against the reference.
fn check_grouped_f32(groups: &[usize], inn: usize, out: usize) {
    let e = groups.len();
    let r: usize = groups.iter().sum();
    let mut offs = vec![0i64];
    for g in groups {
        offs.push(offs.last().unwrap() + *g as i64);
    }
    let offsets = Tensor::from_vec(offs, e + 1, &CPU).unwrap();
    let x = Tensor::randn(1, (r, inn), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let w = Tensor::randn(2, (e, out, inn), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let g = Tensor::randn(3, (r, out), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let y = ops::grouped_matmul(&x, &w, &offsets).unwrap();
    assert!(rel_err(&y, &reference::moe::grouped_matmul(&x, &w, &offsets).unwrap()) < 1e-5);
    let (dx, dw) = ops::grouped_matmul_backward(&x, &w, &offsets, &g).unwrap();
    let (wdx, wdw) = reference::moe::grouped_matmul_backward(&x, &w, &offsets, &g).unwrap();
    assert!(rel_err(&dx, &wdx) < 1e-5);
    assert!(rel_err(&dw, &wdw) < 1e-5);
    // Deterministic: the same call gives the same bits, whatever thread ran which expert.
    assert_eq!(
        y.to_vec::<f32>().unwrap(),
        ops::grouped_matmul(&x, &w, &offsets).unwrap().to_vec::<f32>().unwrap()
    );
    let (dx2, dw2) = ops::grouped_matmul_backward(&x, &w, &offsets, &g).unwrap();
    assert_eq!(dx.to_vec::<f32>().unwrap(), dx2.to_vec::<f32>().unwrap());
    assert_eq!(dw.to_vec::<f32>().unwrap(), dw2.to_vec::<f32>().unwrap());
}

#[test]
fn grouped_matmul_big_and_skewed_groups() {
    // One group big enough to be parallelised inside (m·n·k ≥ 2^21), tiny ones, empty ones: edge
    // tiles of the 6×16 kernel, two k blocks.
    check_grouped_f32(&[0, 301, 1, 0, 7, 13, 2, 0, 5], 401, 70);
    // Many mid-sized groups: one single-threaded task per expert, spread over the pool.
    check_grouped_f32(&[40, 37, 41, 0, 40, 39, 44, 40, 40, 38, 42, 40, 1, 40, 40, 40], 64, 96);
    // All rows in one expert, and no rows at all.
    let (inn, out, r) = (33, 20, 50);
    let x = Tensor::randn(4, (r, inn), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let w3 = Tensor::randn(5, (3, out, inn), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let one = Tensor::from_vec(vec![0i64, 0, r as i64, r as i64], 4, &CPU).unwrap();
    let y1 = ops::grouped_matmul(&x, &w3, &one).unwrap();
    assert!(rel_err(&y1, &reference::moe::grouped_matmul(&x, &w3, &one).unwrap()) < 1e-5);
    let x0 = Tensor::zeros((0, inn), DType::F32, &CPU).unwrap();
    let zero = Tensor::from_vec(vec![0i64; 4], 4, &CPU).unwrap();
    assert_eq!(ops::grouped_matmul(&x0, &w3, &zero).unwrap().dims(), &[0, out]);
    let g0 = Tensor::zeros((0, out), DType::F32, &CPU).unwrap();
    let (dx0, dw0) = ops::grouped_matmul_backward(&x0, &w3, &zero, &g0).unwrap();
    assert_eq!(dx0.dims(), &[0, inn]);
    assert!(dw0.to_vec::<f32>().unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn expert_choice_plan() {
    // 3 experts × capacity 2 over 5 tokens; token 3 is picked by nobody, token 1 twice.
    let ids = Tensor::from_vec(vec![1u32, 4, 0, 1, 2, 4], (3, 2), &CPU).unwrap();
    let plan = ops::moe_plan_from_expert_choice(&ids, 5).unwrap();
    assert_eq!(plan.expert_offsets.to_vec::<i64>().unwrap(), vec![0, 2, 4, 6]);
    assert_eq!(plan.row_token.to_vec::<u32>().unwrap(), vec![1, 4, 0, 1, 2, 4]);
    assert_eq!(plan.row_slot.to_vec::<u32>().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(plan.dropped, 1);
    let x = Tensor::randn(5, (5, 3), 0.0, 1.0, DType::F64, &CPU).unwrap();
    let w = Tensor::rand(6, 6, 0.0, 1.0, DType::F64, &CPU).unwrap();
    let y = ops::moe_permute(&x, &plan).unwrap();
    let out = ops::moe_unpermute(&y, &w, &plan).unwrap();
    assert_close(&out, &reference::moe::unpermute(&y, Some(&w), &plan).unwrap(), DType::F64, "expert choice");
    let bad = Tensor::from_vec(vec![5u32], (1, 1), &CPU).unwrap();
    assert!(ops::moe_plan_from_expert_choice(&bad, 5)
        .unwrap_err()
        .to_string()
        .contains("token_ids[0, 0] = 5"));
}
