//! Gradient checks of the fused RoPE and attention Vars (f64, central differences), and the
//! fixture gradients through the tape.

use std::path::PathBuf;

use moeba_autograd::fused::attention::{attention, rope};
use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_kernels::ops::{self, AttentionOptions, RopeOptions, RopeScaling, RopeStyle, YarnScaling};
use moeba_tensor::{DType, Device, Result, Tensor};

fn randn(seed: u64, dims: (usize, usize, usize, usize)) -> Result<Tensor> {
    Tensor::randn(seed, dims, 0.0, 1.0, DType::F64, &Device::Cpu)
}

#[test]
fn rope_gradcheck_both_styles() -> Result<()> {
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        let opts = RopeOptions::new(100.0).with_style(style).with_offset(3);
        let x = randn(1, (2, 2, 5, 6))?;
        let r = check_gradients(|v| rope(&v[0], &opts), &[x], &GradCheckOptions::default())?;
        assert!(r.max_abs_err() < 1e-8, "{style:?}: {r:?}");
        // Through a transposed (b, l, h, d) view.
        let xt = randn(2, (1, 4, 3, 8))?;
        let r =
            check_gradients(|v| rope(&v[0].transpose(1, 2)?, &opts), &[xt], &GradCheckOptions::default())?;
        assert!(r.inputs[0].had_gradient && r.max_abs_err() < 1e-8, "{style:?} strided: {r:?}");
    }
    Ok(())
}

/// YaRN-scaled RoPE (blended frequencies and a cos/sin amplitude that is not 1): the CPU kernel
/// against the plain reference in f64 and f32, and the backward (the transposed rotation times
/// the amplitude) against central differences.
#[test]
fn rope_yarn_matches_reference_and_gradcheck() -> Result<()> {
    let mut yarn = YarnScaling::new(4.0, 64);
    yarn.attention_factor = 1.2;
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        let opts =
            RopeOptions::new(500.0).with_style(style).with_offset(7).with_scaling(RopeScaling::Yarn(yarn));
        let x = randn(3, (1, 2, 9, 12))?;
        let want = moeba_kernels::reference::attention::rope(&x, &opts)?.to_vec_f64()?;
        let plain = ops::rope(&x, &opts.with_scaling(RopeScaling::None))?.to_vec_f64()?;
        assert!(want.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "YaRN changed nothing");
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
            let got = ops::rope(&x.to_dtype(dtype)?, &opts)?.to_vec_f64()?;
            let err = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < tol, "{style:?} {dtype:?}: max error {err:.3e}");
        }
        let r = check_gradients(|v| rope(&v[0], &opts), &[x], &GradCheckOptions::default())?;
        assert!(r.max_abs_err() < 1e-8, "{style:?} YaRN: {r:?}");
    }
    Ok(())
}

#[test]
fn attention_gradcheck_gqa_window_decode() -> Result<()> {
    // (b, hkv, rep, lq, lk, dk, dv, causal, window)
    let cases = [
        (1, 2, 2, 5, 5, 4, 4, true, None),
        (2, 1, 3, 3, 7, 3, 5, true, None),
        (1, 1, 2, 6, 6, 4, 3, true, Some(2)),
        (1, 2, 1, 4, 3, 2, 2, false, None),
        (1, 1, 1, 5, 3, 3, 3, true, None),
    ];
    for (i, &(b, hkv, rep, lq, lk, dk, dv, causal, window)) in cases.iter().enumerate() {
        let s = 10 * i as u64;
        let q = randn(s + 1, (b, hkv * rep, lq, dk))?;
        let k = randn(s + 2, (b, hkv, lk, dk))?;
        let v = randn(s + 3, (b, hkv, lk, dv))?;
        let opts = AttentionOptions { scale: 0.7, causal, window };
        let r = check_gradients(
            |x| attention(&x[0], &x[1], &x[2], &opts),
            &[q, k, v],
            &GradCheckOptions::default(),
        )?;
        assert!(r.inputs.iter().all(|x| x.had_gradient), "case {i}: {r:?}");
        assert!(r.max_abs_err() < 1e-7, "case {i}: {r:?}");
    }
    Ok(())
}

#[test]
fn rope_then_attention_gradcheck() -> Result<()> {
    // The layer's pattern: (b, l, h, d) projections, transposed, rotated, attended.
    let q = randn(7, (1, 6, 4, 4))?;
    let k = randn(8, (1, 6, 2, 4))?;
    let v = randn(9, (1, 6, 2, 4))?;
    let ro = RopeOptions::new(10000.0).with_offset(2);
    let opts = AttentionOptions::causal(4);
    let f = |x: &[Var]| {
        let q = rope(&x[0].transpose(1, 2)?, &ro)?;
        let k = rope(&x[1].transpose(1, 2)?, &ro)?;
        attention(&q, &k, &x[2].transpose(1, 2)?, &opts)
    };
    let r = check_gradients(f, &[q, k, v], &GradCheckOptions::default())?;
    assert!(r.max_abs_err() < 1e-7, "{r:?}");
    Ok(())
}

#[test]
fn attention_var_matches_fixture_gradients() -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/ops/attention_gqa.safetensors");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("skipping: fixture {} not found", path.display());
        return Ok(());
    };
    let f = moeba_tensor::safetensors_io::deserialize(&bytes, &Device::Cpu)?;
    let scale = f["scale"].to_vec_f64()?[0];
    let (q, k, v) = (Var::param(f["q"].clone()), Var::param(f["k"].clone()), Var::param(f["v"].clone()));
    let out = attention(&q, &k, &v, &AttentionOptions { scale, causal: true, window: None })?;
    assert_eq!(out.op_name(), Some("attention"));
    let grads = out.backward_with(f["grad_out"].clone())?;
    for (x, key) in [(&q, "grad_q"), (&k, "grad_k"), (&v, "grad_v")] {
        let (g, want) = (grads.get(x).expect("gradient").to_vec_f64()?, f[key].to_vec_f64()?);
        let err = g.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-10, "{key}: {err:e}");
    }
    Ok(())
}
