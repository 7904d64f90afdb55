//! Gradient checks (f64, central differences) of every MoE `Var` op, the whole routed SwiGLU
//! pipeline, and the `moe_layer.safetensors` fixture run through the fused ops.

use std::path::PathBuf;

use moeba_autograd::fused::moe;
use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_kernels::ops::{self, MoeRoutingPlan, MoeScoreFn, TopkGatingOptions};
use moeba_tensor::{DType, Device, Rng, Tensor};

const CPU: Device = Device::Cpu;

/// Logits whose sorted values per row are ≥ 0.25 apart: the top-k selection cannot flip under a
/// finite-difference step.
fn separated_logits(seed: u64, t: usize, e: usize) -> Tensor {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(t * e);
    for _ in 0..t {
        let mut p: Vec<usize> = (0..e).collect();
        for i in (1..e).rev() {
            p.swap(i, rng.below(i as u64 + 1) as usize);
        }
        v.extend(p.iter().map(|&i| (i as f64 - e as f64 / 2.0) * 0.3 + 0.05 * rng.uniform()));
    }
    Tensor::from_vec(v, (t, e), &CPU).unwrap()
}

fn plan_for(t: usize, e: usize, k: usize, cap: Option<usize>, seed: u64) -> (MoeRoutingPlan, Tensor) {
    let g = ops::topk_gating(&separated_logits(seed, t, e), None, &TopkGatingOptions::softmax(k)).unwrap();
    (ops::moe_plan_from_topk(&g.indices, e, cap).unwrap(), g.weights)
}

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    Tensor::randn(seed, dims, 0.0, 1.0, DType::F64, &CPU).unwrap()
}

#[test]
fn gating_gradients() {
    let (t, e) = (7, 6);
    let logits = separated_logits(3, t, e);
    let bias = Tensor::from_vec(vec![0.0, 0.3, -0.2, 0.0, 0.1, 0.0], e, &CPU).unwrap();
    for score in [MoeScoreFn::Softmax, MoeScoreFn::Sigmoid] {
        for renormalize in [true, false] {
            for (k, b) in [(2, None), (3, Some(&bias)), (1, None)] {
                let opts = TopkGatingOptions { k, score, renormalize, scaling: 1.5 };
                let f = |v: &[Var]| {
                    let g = moe::topk_gating(&v[0], b, &opts)?;
                    Var::concat(&[&g.weights.flatten_all()?, &g.mean_score, &g.lse], 0)
                };
                let r = check_gradients(f, std::slice::from_ref(&logits), &GradCheckOptions::default());
                let r = r.unwrap_or_else(|err| panic!("{score:?} renorm {renormalize} k {k}: {err}"));
                assert!(r.inputs[0].had_gradient);
            }
        }
    }
}

#[test]
fn permutation_gradients() {
    for cap in [None, Some(2)] {
        let (plan, w) = plan_for(9, 4, 2, cap, 5);
        let r = plan.num_rows();
        let x = randn(1, &[9, 5]);
        check_gradients(
            |v| moe::permute(&v[0], &plan),
            std::slice::from_ref(&x),
            &GradCheckOptions::default(),
        )
        .unwrap();
        check_gradients(
            |v| moe::row_weights(&v[0], &plan),
            std::slice::from_ref(&w),
            &GradCheckOptions::default(),
        )
        .unwrap();
        let y = randn(2, &[r, 5]);
        let rw = randn(3, &[r]);
        check_gradients(|v| moe::unpermute(&v[0], &v[1], &plan), &[y, rw], &GradCheckOptions::default())
            .unwrap();
    }
}

#[test]
fn grouped_matmul_and_swiglu_gradients() {
    // Expert 2 gets no rows (k = 1 over 3 experts with 4 tokens leaves at least one idle at times;
    // the explicit offsets below make sure of it).
    let offsets = Tensor::from_vec(vec![0i64, 3, 7, 7, 8], 5, &CPU).unwrap();
    let plan = MoeRoutingPlan {
        num_tokens: 8,
        num_experts: 4,
        expert_offsets: offsets,
        row_token: Tensor::from_vec((0..8u32).collect::<Vec<_>>(), 8, &CPU).unwrap(),
        row_slot: Tensor::from_vec((0..8u32).collect::<Vec<_>>(), 8, &CPU).unwrap(),
        dropped: 0,
    };
    let (d, f) = (5, 3);
    let x = randn(1, &[8, d]);
    let w = randn(2, &[4, 6, d]);
    check_gradients(
        |v| moe::grouped_matmul(&v[0], &v[1], &plan),
        &[x.clone(), w],
        &GradCheckOptions::default(),
    )
    .unwrap();
    let gate_up = randn(3, &[4, 2 * f, d]);
    let down = randn(4, &[4, d, f]);
    let rep = check_gradients(
        |v| moe::swiglu_experts(&v[0], &v[1], &v[2], &plan),
        &[x, gate_up, down],
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert!(rep.inputs.iter().all(|r| r.had_gradient));
}

#[test]
fn swiglu_experts_without_a_tape_gives_the_same_output() {
    // No recorded node (no_grad, or constant inputs): the fused forward keeps neither h nor a and
    // returns a constant, with the values of the recorded forward.
    let (plan, _) = plan_for(40, 4, 2, None, 9);
    let rows = plan.row_token.dims()[0];
    let (d, f) = (7, 10);
    for dtype in [DType::F32, DType::F64] {
        let t = |seed: u64, dims: &[usize]| Tensor::randn(seed, dims, 0.0, 1.0, dtype, &CPU).unwrap();
        let (x, gu, dn) = (t(1, &[rows, d]), t(2, &[4, 2 * f, d]), t(3, &[4, d, f]));
        let recorded = moe::swiglu_experts(
            &Var::param(x.clone()),
            &Var::param(gu.clone()),
            &Var::param(dn.clone()),
            &plan,
        )
        .unwrap();
        assert!(recorded.requires_grad());
        let constant = moe::swiglu_experts(
            &Var::constant(x.clone()),
            &Var::constant(gu.clone()),
            &Var::constant(dn.clone()),
            &plan,
        )
        .unwrap();
        let off = {
            let _g = moeba_autograd::no_grad();
            moe::swiglu_experts(&Var::param(x), &Var::param(gu), &Var::param(dn), &plan).unwrap()
        };
        for v in [&constant, &off] {
            assert!(!v.requires_grad());
            assert_eq!(v.tensor().to_vec_f64().unwrap(), recorded.tensor().to_vec_f64().unwrap(), "{dtype}");
        }
    }
}

/// The routed SwiGLU MoE written with the fused ops: gating, plan, permute, experts, unpermute.
fn moe_forward(x: &Var, router: &Var, gate_up: &Var, down: &Var, k: usize) -> moeba_tensor::Result<Var> {
    let logits = x.matmul(&router.t()?)?;
    let g = moe::topk_gating(&logits, None, &TopkGatingOptions::softmax(k))?;
    let plan = ops::moe_plan_from_topk(&g.indices, router.dims()[0], None)?;
    let xs = moe::permute(x, &plan)?;
    let ys = moe::swiglu_experts(&xs, gate_up, down, &plan)?;
    let rw = moe::row_weights(&g.weights, &plan)?;
    moe::unpermute(&ys, &rw, &plan)
}

#[test]
fn whole_moe_pipeline_gradients() {
    let (t, d, f, e, k) = (6, 4, 3, 4, 2);
    // Router rows far apart so that the selection is stable under the finite-difference step.
    let x = randn(1, &[t, d]);
    let router = Tensor::randn(2, (e, d), 0.0, 2.0, DType::F64, &CPU).unwrap();
    let gate_up = randn(3, &[e, 2 * f, d]);
    let down = randn(4, &[e, d, f]);
    let opts = GradCheckOptions::default().with_eps(1e-7);
    check_gradients(|v| moe_forward(&v[0], &v[1], &v[2], &v[3], k), &[x, router, gate_up, down], &opts)
        .unwrap();
}

#[test]
fn moe_layer_fixture_through_the_fused_ops() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/ops/moe_layer.safetensors");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
        return;
    };
    let fx = moeba_tensor::safetensors_io::deserialize(&bytes, &CPU).unwrap();
    let k = fx["topk_idx"].dims()[1];
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let p = |n: &str| Var::param(fx[n].to_dtype(dtype).unwrap());
        let (x, router) = (p("x"), p("router_w"));
        let gate_up = Var::param(ops::concat(&[&fx["w1"], &fx["w3"]], 1).unwrap().to_dtype(dtype).unwrap());
        let down = p("w2");
        let out = moe_forward(&x, &router, &gate_up, &down, k).unwrap();
        let go = fx["grad_out"].to_dtype(dtype).unwrap();
        let grads = out.backward_with(go).unwrap();
        let f = fx["w1"].dims()[1];
        let close = |what: &str, got: &Tensor, want: &Tensor| {
            let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
            assert_eq!(g.len(), w.len(), "{what}");
            let scale = w.iter().fold(1.0f64, |a, v| a.max(v.abs()));
            let err = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale;
            assert!(err <= tol, "{dtype}: {what}: relative error {err:e}");
        };
        close("out", out.tensor(), &fx["out"]);
        close("grad_x", grads.get(&x).unwrap(), &fx["grad_x"]);
        close("grad_router_w", grads.get(&router).unwrap(), &fx["grad_router_w"]);
        let dgu = grads.get(&gate_up).unwrap();
        close("grad_w1", &dgu.narrow(1, 0, f).unwrap(), &fx["grad_w1"]);
        close("grad_w3", &dgu.narrow(1, f, f).unwrap(), &fx["grad_w3"]);
        close("grad_w2", grads.get(&down).unwrap(), &fx["grad_w2"]);
    }
}
