//! Causal depthwise conv1d against the fixture and the plain reference: forward, backward, both
//! memory orders and strided views, seq_idx restarts, the decoding step, determinism, errors.

mod cpu_common;

use std::path::PathBuf;

use cpu_common::{for_each_path, make, view, View};
use moeba_kernels::{ops, reference};
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

fn channel_last(t: &Tensor) -> Tensor {
    t.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap()
}

#[test]
fn conv1d_matches_fixture() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/ops/causal_conv1d.safetensors");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("skipping: fixture {} not found", path.display());
        return;
    };
    let f = moeba_tensor::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap();
    for_each_path(|p| {
        for dtype in [DType::F64, DType::F32] {
            for cl in [false, true] {
                let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
                let cast = |k: &str| f[k].to_dtype(dtype).unwrap();
                let x = if cl { channel_last(&cast("x")) } else { cast("x") };
                let (w, b) = (cast("weight"), cast("bias"));
                let what = format!("{dtype} {} channel_last={cl}", p.name());
                let out = ops::causal_conv1d(&x, &w, Some(&b), true, None).unwrap();
                assert!(rel(&out, &f["out"]) <= tol, "{what}: out");
                let noact = ops::causal_conv1d(&x, &w, Some(&b), false, None).unwrap();
                assert!(rel(&noact, &f["out_noact"]) <= tol, "{what}: out_noact");
                let g = ops::causal_conv1d_backward(&x, &w, Some(&b), true, None, &cast("grad_out")).unwrap();
                assert!(rel(&g.x, &f["grad_x"]) <= tol, "{what}: grad_x");
                assert!(rel(&g.weight, &f["grad_weight"]) <= tol, "{what}: grad_weight");
                assert!(rel(g.bias.as_ref().unwrap(), &f["grad_bias"]) <= tol, "{what}: grad_bias");
            }
        }
    });
}

fn seq(seed: u64, b: usize, l: usize) -> Tensor {
    let mut rng = moeba_tensor::Rng::new(seed);
    let mut ids = Vec::new();
    for _ in 0..b {
        let mut id = 0u32;
        for _ in 0..l {
            if rng.below(5) == 0 {
                id += 1;
            }
            ids.push(id);
        }
    }
    Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn conv1d_matches_reference(
        b in 1usize..=3, d in prop_oneof![1usize..=9, 10usize..=70], l in prop_oneof![1usize..=9, 10usize..=40],
        k in 1usize..=5, v in view(), cl in any::<bool>(), bias in any::<bool>(), silu in any::<bool>(),
        packed in any::<bool>(), dtype in prop_oneof![Just(DType::F32), Just(DType::F64)], seed in any::<u64>(),
    ) {
        let x = make(seed, &[b, d, l], dtype, v, -2.0, 2.0).unwrap();
        let x = if cl { channel_last(&x) } else { x };
        let w = make(seed ^ 1, &[d, k], dtype, View::Contiguous, -1.0, 1.0).unwrap();
        let bt = make(seed ^ 2, &[d], dtype, View::Contiguous, -1.0, 1.0).unwrap();
        let go = make(seed ^ 3, &[b, d, l], dtype, View::Contiguous, -1.0, 1.0).unwrap();
        let s = packed.then(|| seq(seed, b, l));
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        let bias = bias.then_some(&bt);
        let out = ops::causal_conv1d(&x, &w, bias, silu, s.as_ref()).unwrap();
        let want = reference::conv1d::causal_conv1d(&x, &w, bias, silu, s.as_ref()).unwrap();
        prop_assert!(rel(&out, &want) <= tol);
        let g = ops::causal_conv1d_backward(&x, &w, bias, silu, s.as_ref(), &go).unwrap();
        let (gx, gw, gb) = reference::conv1d::causal_conv1d_backward(&x, &w, bias, silu, s.as_ref(), &go).unwrap();
        prop_assert!(rel(&g.x, &gx) <= tol);
        prop_assert!(rel(&g.weight, &gw) <= tol);
        prop_assert_eq!(g.bias.is_some(), gb.is_some());
        if let (Some(a), Some(e)) = (&g.bias, &gb) {
            prop_assert!(rel(a, e) <= tol);
        }
    }
}

#[test]
fn update_steps_equal_the_full_conv() {
    for dtype in [DType::F64, DType::F32] {
        let (b, d, l, k) = (2, 11, 9, 4);
        let x = Tensor::randn(1, (b, d, l), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
        let w = Tensor::randn(2, (d, k), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
        let bias = Tensor::randn(3, d, 0.0, 1.0, dtype, &Device::Cpu).unwrap();
        let full = ops::causal_conv1d(&x, &w, Some(&bias), true, None).unwrap();
        let mut state = Tensor::zeros((b, d, k), dtype, &Device::Cpu).unwrap();
        for t in 0..l {
            let xt = x.narrow(2, t, 1).unwrap().squeeze(2).unwrap();
            let (out, next) = ops::causal_conv1d_update(&xt, &state, &w, Some(&bias), true).unwrap();
            let (rout, rnext) =
                reference::conv1d::causal_conv1d_update(&xt, &state, &w, Some(&bias), true).unwrap();
            assert!(rel(&out, &rout) < 1e-6 && rel(&next, &rnext) == 0.0, "{dtype} step {t} vs reference");
            assert!(rel(&out, &full.narrow(2, t, 1).unwrap().squeeze(2).unwrap()) < 1e-5, "{dtype} step {t}");
            state = next;
        }
    }
}

#[test]
fn backward_is_bit_identical_across_thread_counts() {
    let (b, d, l, k) = (3, 130, 400, 4);
    for cl in [false, true] {
        let x = Tensor::randn(1, (b, d, l), 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
        let x = if cl { channel_last(&x) } else { x };
        let w = Tensor::randn(2, (d, k), 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::randn(3, d, 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
        let go = Tensor::randn(4, (b, d, l), 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
        let s = seq(5, b, l);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let g = ops::causal_conv1d_backward(&x, &w, Some(&bias), true, Some(&s), &go).unwrap();
                let mut v = g.x.to_vec::<f32>().unwrap();
                v.extend(g.weight.to_vec::<f32>().unwrap());
                v.extend(g.bias.unwrap().to_vec::<f32>().unwrap());
                v
            })
        };
        for_each_path(|_| {
            let (one, two) = (run(1), run(2));
            assert!(one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()), "channel_last={cl}");
        });
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let x = Tensor::zeros((1, 4, 6), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    let msg = |r: moeba_tensor::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let w3 = Tensor::zeros((4, 1, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(msg(ops::causal_conv1d(&x, &w3, None, true, None)).contains("`weight`"));
    let b5 = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    assert!(msg(ops::causal_conv1d(&x, &w, Some(&b5), true, None)).contains("`bias`"));
    let s = Tensor::zeros((1, 5), DType::U32, &Device::Cpu).unwrap();
    assert!(msg(ops::causal_conv1d(&x, &w, None, true, Some(&s))).contains("`seq_idx`"));
    let state = Tensor::zeros((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let xt = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    let e = ops::causal_conv1d_update(&xt, &state, &w, None, true).err().unwrap().to_string();
    assert!(e.contains("`conv_state`"), "{e}");
}
