//! RoPE and tiled attention (forward and backward) against the fixtures and the materialised
//! reference: random shapes, head groupings, windows, decode shapes, strided views, every SIMD
//! path, empty dims, and the errors bad arguments give.

mod cpu_common;

use std::collections::HashMap;
use std::path::PathBuf;

use cpu_common::for_each_path;
use moeba_kernels::ops::{self, AttentionOptions, RopeOptions, RopeStyle};
use moeba_kernels::reference::attention as reference;
use moeba_tensor::{DType, Device, Result, Tensor};
use proptest::prelude::*;

fn fixture(name: &str) -> Option<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/ops").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_tensor::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

/// Largest `|got - want|` divided by the largest `|want|`, or by `floor` when that is larger
/// (a gradient that is exactly 0 in exact arithmetic is rounding noise in f32).
fn max_rel_floor(got: &Tensor, want: &Tensor, floor: f64) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes");
    let (a, b) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let scale = b.iter().filter(|x| x.is_finite()).fold(0f64, |m, x| m.max(x.abs())).max(floor);
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x == y {
                0.0
            } else if x.is_finite() && y.is_finite() {
                (x - y).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
        / scale
}

fn assert_rel(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_rel_floor(got, want, tol, 1e-30, what)
}

fn assert_rel_floor(got: &Tensor, want: &Tensor, tol: f64, floor: f64, what: &str) {
    let e = max_rel_floor(got, want, floor);
    assert!(e <= tol, "{what}: max error {e:e} relative to the largest value > {tol:e}");
}

fn fixture_tol(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-10
    } else {
        1e-5
    }
}

#[test]
fn rope_matches_fixture_f64_and_f32() {
    let Some(f) = fixture("rope.safetensors") else { return };
    let theta = f["theta"].to_vec_f64().unwrap()[0];
    let offset = f["positions"].to_vec_f64().unwrap()[0] as usize;
    let opts = RopeOptions::new(theta).with_offset(offset);
    for dtype in [DType::F64, DType::F32] {
        let x = f["x"].to_dtype(dtype).unwrap();
        let out = ops::rope(&x, &opts).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_rel(&out, &f["out"], fixture_tol(dtype), &format!("rope out {dtype}"));
        let g = ops::rope_backward(&f["grad_out"].to_dtype(dtype).unwrap(), &opts).unwrap();
        assert_rel(&g, &f["grad_x"], fixture_tol(dtype), &format!("rope grad_x {dtype}"));
        // The same through a transposed (b, l, h, d) view.
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap();
        assert!(!xt.is_contiguous());
        assert_rel(&ops::rope(&xt, &opts).unwrap(), &f["out"], fixture_tol(dtype), "rope strided");
    }
    assert_rel(&reference::rope(&f["x"], &opts).unwrap(), &f["out"], 1e-12, "reference rope");
}

fn check_attention_fixture(name: &str) {
    let Some(f) = fixture(name) else { return };
    let scale = f["scale"].to_vec_f64().unwrap()[0];
    let opts = AttentionOptions { scale, causal: true, window: None };
    for dtype in [DType::F64, DType::F32] {
        let c = |k: &str| f[k].to_dtype(dtype).unwrap();
        let (q, k, v, go) = (c("q"), c("k"), c("v"), c("grad_out"));
        let fwd = ops::attention(&q, &k, &v, &opts).unwrap();
        let tol = fixture_tol(dtype);
        assert_eq!(fwd.out.dtype(), dtype);
        assert_rel(&fwd.out, &f["out"], tol, &format!("{name} out {dtype}"));
        let (dq, dk, dv) = ops::attention_backward(&q, &k, &v, &fwd, &go, &opts).unwrap();
        assert_rel(&dq, &f["grad_q"], tol, &format!("{name} grad_q {dtype}"));
        assert_rel(&dk, &f["grad_k"], tol, &format!("{name} grad_k {dtype}"));
        assert_rel(&dv, &f["grad_v"], tol, &format!("{name} grad_v {dtype}"));
    }
    let r = reference::attention(&f["q"], &f["k"], &f["v"], &opts).unwrap();
    assert_rel(&r.out, &f["out"], 1e-12, "reference out");
    let (dq, dk, dv) =
        reference::attention_backward(&f["q"], &f["k"], &f["v"], &f["grad_out"], &opts).unwrap();
    assert_rel(&dq, &f["grad_q"], 1e-12, "reference grad_q");
    assert_rel(&dk, &f["grad_k"], 1e-12, "reference grad_k");
    assert_rel(&dv, &f["grad_v"], 1e-12, "reference grad_v");
}

#[test]
fn attention_matches_gqa_fixture() {
    check_attention_fixture("attention_gqa.safetensors");
}

#[test]
fn attention_matches_gqa_decode_fixture() {
    check_attention_fixture("attention_gqa_decode.safetensors");
}

#[test]
fn rope_interleaved_and_inverse() -> Result<()> {
    let x = Tensor::randn(3, (2, 3, 7, 12), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        let opts = RopeOptions::new(500.0).with_style(style).with_offset(5);
        let y = ops::rope(&x, &opts)?;
        assert_rel(&y, &reference::rope(&x, &opts)?, 1e-14, "rope vs reference");
        assert_rel(&ops::rope_backward(&y, &opts)?, &x, 1e-14, "inverse rotation");
        // Tokens 2.. at offset 5 sit where tokens 2.. of the whole sequence at offset 3 do.
        let part = ops::rope(&x.narrow(2, 2, 5)?, &opts)?;
        let whole = ops::rope(&x, &opts.with_offset(3))?.narrow(2, 2, 5)?;
        assert_rel(&part, &whole, 1e-15, "position offset");
        let y32 = ops::rope(&x.to_dtype(DType::F32)?, &opts)?;
        assert_rel(&y32, &y, 1e-6, "rope f32");
        let y16 = ops::rope(&x.to_dtype(DType::BF16)?, &opts)?;
        assert_eq!(y16.dtype(), DType::BF16);
        assert_rel(&y16, &y, 2e-2, "rope bf16");
    }
    // The interleaved style pairs (2i, 2i+1): feature 1 of the first pair at position 1.
    let e0 = Tensor::from_vec(vec![1.0f64, 0.0, 0.0, 0.0], (1, 1, 1, 4), &Device::Cpu)?;
    let opts = RopeOptions::new(10000.0).with_style(RopeStyle::Interleaved).with_offset(1);
    let y = ops::rope(&e0, &opts)?.to_vec::<f64>()?;
    assert!((y[0] - 1f64.cos()).abs() < 1e-15 && (y[1] - 1f64.sin()).abs() < 1e-15 && y[2] == 0.0, "{y:?}");
    Ok(())
}

/// Inputs of one random attention case: q, k, v, grad_out in `dtype`, possibly strided views.
struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    go: Tensor,
}

#[allow(clippy::too_many_arguments)]
fn make_case(
    seed: u64,
    b: usize,
    hkv: usize,
    rep: usize,
    lq: usize,
    lk: usize,
    dk: usize,
    dv: usize,
    dtype: DType,
    layout: usize,
) -> Result<Case> {
    let hq = hkv * rep;
    let dev = Device::Cpu;
    let gen = |s: u64, h: usize, l: usize, d: usize, std: f64| -> Result<Tensor> {
        match layout {
            // (b, l, h, d) transposed to (b, h, l, d): what a layer's projections give.
            1 => Tensor::randn(seed + s, (b, l, h, d), 0.0, std, dtype, &dev)?.transpose(1, 2),
            // Narrowed from a wider feature dim and a longer sequence.
            2 => Tensor::randn(seed + s, (b, h, l + 3, d + 2), 0.0, std, dtype, &dev)?
                .narrow(2, 2, l)?
                .narrow(3, 1, d),
            // Feature dim not unit-stride (forces a copy).
            3 => Tensor::randn(seed + s, (b, h, d, l), 0.0, std, dtype, &dev)?.transpose(2, 3),
            _ => Tensor::randn(seed + s, (b, h, l, d), 0.0, std, dtype, &dev),
        }
    };
    Ok(Case {
        q: gen(1, hq, lq, dk, 1.5)?,
        k: gen(2, hkv, lk, dk, 1.0)?,
        v: gen(3, hkv, lk, dv, 1.0)?,
        go: gen(4, hq, lq, dv, 1.0)?,
    })
}

/// Forward and backward of the tiled kernel against the reference; `tol` relative to each
/// output's largest value.
fn check_case(c: &Case, opts: &AttentionOptions, tol: f64) -> Result<()> {
    let fwd = ops::attention(&c.q, &c.k, &c.v, opts)?;
    let want = reference::attention(&c.q, &c.k, &c.v, opts)?;
    assert_rel(&fwd.out, &want.out, tol, "out");
    assert!(fwd.out.is_contiguous() && fwd.out.dtype() == c.q.dtype());
    // lse: -inf exactly where the reference has it.
    let (gl, wl) = (fwd.lse.to_vec_f64()?, want.lse.to_vec_f64()?);
    for (a, b) in gl.iter().zip(&wl) {
        assert!(a == b || (a - b).abs() <= tol * (1.0 + b.abs()), "lse {a} vs {b}");
    }
    let (dq, dk, dv) = ops::attention_backward(&c.q, &c.k, &c.v, &fwd, &c.go, opts)?;
    let (wq, wk, wv) = reference::attention_backward(&c.q, &c.k, &c.v, &c.go, opts)?;
    // Inputs are O(1): errors are measured against at least 1 (see max_rel_floor).
    assert_rel_floor(&dq, &wq, tol, 1.0, "grad_q");
    assert_rel_floor(&dk, &wk, tol, 1.0, "grad_k");
    assert_rel_floor(&dv, &wv, tol, 1.0, "grad_v");
    for (g, x) in [(&dq, &c.q), (&dk, &c.k), (&dv, &c.v)] {
        assert_eq!(g.dims(), x.dims());
        assert_eq!(g.dtype(), x.dtype());
    }
    Ok(())
}

fn tol_of(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-11
    } else {
        2e-5
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn attention_matches_reference(
        seed in 0u64..1000,
        b in 1usize..=2,
        hkv in 1usize..=2,
        rep in 1usize..=3,
        lq in prop_oneof![3 => 1usize..=20, 2 => 60usize..=140],
        extra in prop_oneof![2 => Just(0usize), 1 => 1usize..=30],
        dk in prop_oneof![1usize..=9, 30usize..=40],
        dv in 1usize..=36,
        causal in any::<bool>(),
        window in prop_oneof![2 => Just(None), 1 => (1usize..=70).prop_map(Some)],
        f64_dtype in any::<bool>(),
        layout in 0usize..4,
    ) {
        let dtype = if f64_dtype { DType::F64 } else { DType::F32 };
        let lk = lq + extra;
        let c = make_case(seed, b, hkv, rep, lq, lk, dk, dv, dtype, layout).unwrap();
        let window = if causal { window } else { None };
        let opts = AttentionOptions { scale: 1.0 / (dk as f64).sqrt(), causal, window };
        check_case(&c, &opts, tol_of(dtype)).unwrap();
    }

    #[test]
    fn rope_matches_reference(
        seed in 0u64..1000,
        dims in (1usize..=2, 1usize..=3, 0usize..=9, 1usize..=8),
        interleaved in any::<bool>(),
        offset in 0usize..50,
        f64_dtype in any::<bool>(),
        transposed in any::<bool>(),
    ) {
        let dtype = if f64_dtype { DType::F64 } else { DType::F32 };
        let (b, h, l, half) = dims;
        let x = if transposed {
            Tensor::randn(seed, (b, l, h, 2 * half), 0.0, 1.0, dtype, &Device::Cpu).unwrap().transpose(1, 2).unwrap()
        } else {
            Tensor::randn(seed, (b, h, l, 2 * half), 0.0, 1.0, dtype, &Device::Cpu).unwrap()
        };
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::RotateHalf };
        let opts = RopeOptions::new(10000.0).with_style(style).with_offset(offset);
        let tol = if f64_dtype { 1e-13 } else { 1e-6 };
        assert_rel(&ops::rope(&x, &opts).unwrap(), &reference::rope(&x, &opts).unwrap(), tol, "rope");
        assert_rel(&ops::rope_backward(&x, &opts).unwrap(), &reference::rope_backward(&x, &opts).unwrap(), tol, "rope_backward");
    }
}

#[test]
fn attention_on_every_simd_path() {
    let shapes = [
        // (b, hkv, rep, lq, lk, dk, dv, window)
        (1, 2, 2, 70, 70, 64, 64, None),
        (1, 1, 3, 5, 133, 17, 40, None),
        (2, 1, 2, 130, 130, 33, 8, Some(40)),
        (1, 2, 1, 1, 1, 2, 3, None),
        // Four q heads per kv head (two stacks of two), 128-row stacked tiles plus a short
        // last one, and a window that hides whole tiles from some rows.
        (1, 1, 4, 131, 131, 64, 64, Some(70)),
        (1, 2, 2, 200, 200, 64, 64, None),
    ];
    for_each_path(|path| {
        for (i, &(b, hkv, rep, lq, lk, dk, dv, window)) in shapes.iter().enumerate() {
            let c = make_case(i as u64, b, hkv, rep, lq, lk, dk, dv, DType::F32, i % 4).unwrap();
            let opts = AttentionOptions { scale: 0.2, causal: true, window };
            check_case(&c, &opts, 2e-5).unwrap_or_else(|e| panic!("path {path:?}, shape {i}: {e}"));
        }
    });
}

#[test]
fn attention_non_causal_and_long_decode() -> Result<()> {
    // Non-causal cross attention with lq > lk, and a decode step against a long cache.
    let c = make_case(5, 1, 2, 2, 90, 40, 16, 24, DType::F64, 0)?;
    check_case(&c, &AttentionOptions { scale: 0.3, causal: false, window: None }, 1e-11)?;
    let c = make_case(6, 2, 1, 4, 1, 200, 16, 16, DType::F32, 1)?;
    check_case(&c, &AttentionOptions { scale: 0.25, causal: true, window: Some(50) }, 2e-5)?;
    // Causal with lq > lk: the first queries see no key (output 0, lse -inf, no gradient).
    let c = make_case(7, 1, 1, 1, 9, 4, 5, 5, DType::F64, 0)?;
    let opts = AttentionOptions { scale: 0.5, causal: true, window: None };
    check_case(&c, &opts, 1e-11)?;
    let fwd = ops::attention(&c.q, &c.k, &c.v, &opts)?;
    assert_eq!(fwd.lse.to_vec::<f64>()?[0], f64::NEG_INFINITY);
    assert!(fwd.out.to_vec::<f64>()?[..5].iter().all(|&x| x == 0.0));
    Ok(())
}

#[test]
fn attention_empty_dims() -> Result<()> {
    let dev = Device::Cpu;
    let opts = AttentionOptions::causal(4);
    for (b, hq, hkv, lq, lk, dk, dv) in [
        (0, 2, 1, 3, 3, 4, 4),
        (1, 2, 1, 0, 3, 4, 4),
        (1, 2, 1, 3, 0, 4, 4),
        (1, 2, 2, 3, 3, 4, 0),
        (1, 1, 1, 3, 3, 0, 2),
    ] {
        let q = Tensor::randn(1, (b, hq, lq, dk), 0.0, 1.0, DType::F32, &dev)?;
        let k = Tensor::randn(2, (b, hkv, lk, dk), 0.0, 1.0, DType::F32, &dev)?;
        let v = Tensor::randn(3, (b, hkv, lk, dv), 0.0, 1.0, DType::F32, &dev)?;
        let go = Tensor::randn(4, (b, hq, lq, dv), 0.0, 1.0, DType::F32, &dev)?;
        let c = Case { q, k, v, go };
        check_case(&c, &opts, 1e-6)?;
    }
    Ok(())
}

#[test]
fn attention_bf16_runs_in_f32() -> Result<()> {
    let c = make_case(9, 1, 2, 2, 33, 33, 16, 16, DType::BF16, 0)?;
    let opts = AttentionOptions::causal(16);
    let fwd = ops::attention(&c.q, &c.k, &c.v, &opts)?;
    assert_eq!((fwd.out.dtype(), fwd.lse.dtype()), (DType::BF16, DType::F32));
    assert_rel(&fwd.out, &reference::attention(&c.q, &c.k, &c.v, &opts)?.out, 1e-2, "bf16 out");
    let (dq, _, _) = ops::attention_backward(&c.q, &c.k, &c.v, &fwd, &c.go, &opts)?;
    assert_eq!(dq.dtype(), DType::BF16);
    assert_rel(&dq, &reference::attention_backward(&c.q, &c.k, &c.v, &c.go, &opts)?.0, 3e-2, "bf16 dq");
    Ok(())
}

#[test]
fn attention_backward_is_deterministic_across_runs_and_chunkings() -> Result<()> {
    // One kv head and one batch: the backward splits the key tiles into chunks whenever more
    // than one thread is available; a one-thread pool runs a single chunk.
    let c = make_case(11, 1, 1, 3, 150, 150, 24, 24, DType::F32, 0)?;
    let opts = AttentionOptions::causal(24);
    let run = || -> Result<Vec<Vec<f32>>> {
        let fwd = ops::attention(&c.q, &c.k, &c.v, &opts)?;
        let (dq, dk, dv) = ops::attention_backward(&c.q, &c.k, &c.v, &fwd, &c.go, &opts)?;
        Ok(vec![fwd.out.to_vec()?, dq.to_vec()?, dk.to_vec()?, dv.to_vec()?])
    };
    let a = run()?;
    assert_eq!(a, run()?, "two runs differ");
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let b = pool.install(run)?;
        assert_eq!(a[0], b[0], "forward depends on the thread count");
        assert_eq!(a[3], b[3], "grad_v depends on the thread count");
        check_case(&c, &opts, 2e-5)?;
        pool.install(|| check_case(&c, &opts, 2e-5))?;
    }
    Ok(())
}

fn err_of(r: Result<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_arguments_are_named() -> Result<()> {
    let dev = Device::Cpu;
    let t = |d: (usize, usize, usize, usize)| Tensor::zeros(d, DType::F32, &dev);
    let opts = AttentionOptions::causal(8);
    let (q, k, v) = (t((1, 4, 5, 8))?, t((1, 2, 5, 8))?, t((1, 2, 5, 8))?);
    assert!(ops::attention(&q, &k, &v, &opts).is_ok());
    let e = err_of(ops::attention(&t((1, 3, 5, 8))?, &k, &v, &opts));
    assert!(e.contains("num_heads") && e.contains("multiple"), "{e}");
    let e = err_of(ops::attention(&q, &t((2, 2, 5, 8))?, &v, &opts));
    assert!(e.contains("`k`") && e.contains("batch"), "{e}");
    let e = err_of(ops::attention(&q, &k, &t((1, 2, 6, 8))?, &opts));
    assert!(e.contains("`v`") && e.contains("keys"), "{e}");
    let e = err_of(ops::attention(&q, &t((1, 2, 5, 7))?, &v, &opts));
    assert!(e.contains("`k`") && e.contains("head dim"), "{e}");
    let e = err_of(ops::attention(&q.squeeze(0)?, &k, &v, &opts));
    assert!(e.contains("`q`") && e.contains("rank 4"), "{e}");
    let e = err_of(ops::attention(&q, &k.to_dtype(DType::F64)?, &v, &opts));
    assert!(e.contains("`k`") && e.contains("dtype"), "{e}");
    let e = err_of(ops::attention(&q, &k, &v, &opts.with_window(0)));
    assert!(e.contains("window"), "{e}");
    let e = err_of(ops::attention(&q, &k, &v, &AttentionOptions { causal: false, ..opts.with_window(3) }));
    assert!(e.contains("window") && e.contains("causal"), "{e}");
    let fwd = ops::attention(&q, &k, &v, &opts)?;
    let e = err_of(ops::attention_backward(&q, &k, &v, &fwd, &t((1, 4, 5, 7))?, &opts));
    assert!(e.contains("grad_out"), "{e}");
    let e = err_of(ops::rope(&t((1, 2, 3, 7))?, &RopeOptions::new(10000.0)));
    assert!(e.contains("odd") && e.contains('7'), "{e}");
    let e = err_of(ops::rope(&Tensor::zeros((3, 4), DType::F32, &dev)?, &RopeOptions::new(10000.0)));
    assert!(e.contains("rank 4"), "{e}");
    let e = err_of(ops::rope(&t((1, 2, 3, 4))?, &RopeOptions::new(0.0)));
    assert!(e.contains("theta"), "{e}");
    Ok(())
}
