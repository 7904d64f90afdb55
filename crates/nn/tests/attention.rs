//! The GQA attention layer: against a plain materialised re-implementation, decoding with a KV
//! cache against the full forward, gradient checks, parameter names, cache mechanics, errors.

use moeba_autograd::{no_grad, Var};
use moeba_kernels::ops::{self, RopeStyle};
use moeba_nn::{Attention, AttentionConfig, KvCache, ParamStore, RopeConfig};
use moeba_tensor::{DType, Device, Result, Tensor};

// ------------------------------------------------------------------ plain re-implementation

/// `x (rows, in)` times `w (out, in)ᵀ` plus `b`.
fn lin(x: &[f64], rows: usize, w: &[f64], b: Option<&[f64]>, inf: usize, outf: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * outf];
    for r in 0..rows {
        for o in 0..outf {
            let mut s = b.map_or(0.0, |b| b[o]);
            for i in 0..inf {
                s += x[r * inf + i] * w[o * inf + i];
            }
            y[r * outf + o] = s;
        }
    }
    y
}

/// RMS-normalises each `w.len()`-wide chunk of `x` in place.
fn rms(x: &mut [f64], w: &[f64], eps: f64) {
    let n = w.len();
    for row in x.chunks_mut(n) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v *= inv * g;
        }
    }
}

/// Rotates one head vector at position `pos`.
fn rope(v: &mut [f64], pos: usize, theta: f64, style: RopeStyle) {
    let d = v.len();
    for i in 0..d / 2 {
        let ang = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
        let (s, c) = ang.sin_cos();
        let (a, b) = match style {
            RopeStyle::RotateHalf => (i, i + d / 2),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x0, x1) = (v[a], v[b]);
        v[a] = x0 * c - x1 * s;
        v[b] = x1 * c + x0 * s;
    }
}

fn param(store: &ParamStore, name: &str) -> Vec<f64> {
    store.get(name).unwrap_or_else(|| panic!("no parameter {name}")).tensor().to_vec_f64().unwrap()
}

/// The layer written out with loops: materialised scores, K/V heads indexed (not repeated).
fn naive_attention(store: &ParamStore, p: &str, cfg: &AttentionConfig, x: &Tensor) -> Vec<f64> {
    let (b, l, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let (h, hkv, hd) = (cfg.num_heads, cfg.kv_heads, cfg.head_dim);
    let xs = x.to_vec_f64().unwrap();
    let bias = |n: &str| cfg.bias.then(|| param(store, &format!("{p}.{n}_proj.bias")));
    let proj = |n: &str, out: usize| {
        lin(&xs, b * l, &param(store, &format!("{p}.{n}_proj.weight")), bias(n).as_deref(), d, out)
    };
    let (mut q, mut k, v) = (proj("q", h * hd), proj("k", hkv * hd), proj("v", hkv * hd));
    if cfg.qk_norm {
        rms(&mut q, &param(store, &format!("{p}.q_norm.weight")), cfg.norm_eps);
        rms(&mut k, &param(store, &format!("{p}.k_norm.weight")), cfg.norm_eps);
    }
    if let Some(r) = cfg.rope {
        for (m, heads) in [(&mut q, h), (&mut k, hkv)] {
            for bt in 0..b * l {
                for hh in 0..heads {
                    rope(&mut m[(bt * heads + hh) * hd..][..hd], bt % l, r.theta, r.style);
                }
            }
        }
    }
    let scale = cfg.softmax_scale();
    let mut o = vec![0.0; b * l * h * hd];
    for bi in 0..b {
        for hh in 0..h {
            let kh = hh / (h / hkv);
            for t in 0..l {
                let qv = &q[((bi * l + t) * h + hh) * hd..][..hd];
                let keys: Vec<usize> = (0..=t).filter(|&s| cfg.window.is_none_or(|w| t - s < w)).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&s| {
                        let kv = &k[((bi * l + s) * hkv + kh) * hd..][..hd];
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>() * scale
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                for (&s, &sv) in keys.iter().zip(&sc) {
                    let pr = (sv - m).exp() / z;
                    for e in 0..hd {
                        o[((bi * l + t) * h + hh) * hd + e] += pr * v[((bi * l + s) * hkv + kh) * hd + e];
                    }
                }
            }
        }
    }
    let ob = cfg.o_bias.then(|| param(store, &format!("{p}.o_proj.bias")));
    lin(&o, b * l, &param(store, &format!("{p}.o_proj.weight")), ob.as_deref(), h * hd, d)
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

// ------------------------------------------------------------------ configurations

fn configs() -> Vec<(&'static str, AttentionConfig)> {
    let base = AttentionConfig::new(12, 4, 2, 6);
    vec![
        ("gqa_rope", base),
        (
            "qknorm_window_bias",
            AttentionConfig {
                qk_norm: true,
                window: Some(3),
                bias: true,
                o_bias: true,
                rope: Some(RopeConfig::rotate_half(500.0)),
                ..base
            },
        ),
        ("mqa_no_rope", AttentionConfig { kv_heads: 1, rope: None, scale: Some(0.3), ..base }),
        (
            "mha_interleaved",
            AttentionConfig { kv_heads: 4, rope: Some(RopeConfig::interleaved(10000.0)), ..base },
        ),
        ("window1_qknorm", AttentionConfig { qk_norm: true, window: Some(1), ..base }),
    ]
}

/// Perturbs every parameter away from its init (norm weights 1, biases 0 would hide bugs).
fn perturb(store: &ParamStore, seed: u64) {
    for (i, p) in store.params().iter().enumerate() {
        let t = p.tensor();
        let noise = Tensor::randn(seed + i as u64, t.shape(), 0.0, 0.2, t.dtype(), t.device()).unwrap();
        p.set(ops::add(&t, &noise).unwrap()).unwrap();
    }
}

fn layer(cfg: &AttentionConfig, dtype: DType) -> (ParamStore, Attention) {
    let store = ParamStore::new(dtype, Device::Cpu, 17);
    let attn = Attention::new(&store.root().pp("model").pp("layers").pp(0).pp("self_attn"), cfg).unwrap();
    perturb(&store, 100);
    (store, attn)
}

// ------------------------------------------------------------------ forward

#[test]
fn forward_matches_plain_reimplementation() {
    for (name, cfg) in configs() {
        let (store, attn) = layer(&cfg, DType::F64);
        let x = Tensor::randn(3, (2, 7, 12), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        let out = attn.forward(&Var::constant(x.clone())).unwrap();
        assert_eq!(out.dims(), &[2, 7, 12]);
        let want = naive_attention(&store, "model.layers.0.self_attn", &cfg, &x);
        let err = max_rel(&out.tensor().to_vec_f64().unwrap(), &want);
        assert!(err < 1e-12, "{name}: {err}");
        // f32 agrees to rounding.
        let (s32, a32) = layer(&cfg, DType::F32);
        let x32 = x.to_dtype(DType::F32).unwrap();
        let out32 = a32.forward(&Var::constant(x32.clone())).unwrap();
        let want32 = naive_attention(&s32, "model.layers.0.self_attn", &cfg, &x32);
        let err = max_rel(&out32.tensor().to_vec_f64().unwrap(), &want32);
        assert!(err < 1e-5, "{name} f32: {err}");
    }
}

#[test]
fn parameters_have_hf_names_and_shapes() {
    let cfg = AttentionConfig { qk_norm: true, bias: true, ..AttentionConfig::new(16, 4, 2, 8) };
    let store = ParamStore::new(DType::F32, Device::Cpu, 1);
    let attn = Attention::new(&store.root().pp("model.layers.3.self_attn"), &cfg).unwrap();
    assert_eq!(attn.name(), "model.layers.3.self_attn");
    let got: Vec<(String, Vec<usize>)> =
        store.params().iter().map(|p| (p.name().to_string(), p.tensor().dims().to_vec())).collect();
    let p = "model.layers.3.self_attn";
    let want: Vec<(String, Vec<usize>)> = vec![
        (format!("{p}.k_norm.weight"), vec![8]),
        (format!("{p}.k_proj.bias"), vec![16]),
        (format!("{p}.k_proj.weight"), vec![16, 16]),
        (format!("{p}.o_proj.weight"), vec![16, 32]),
        (format!("{p}.q_norm.weight"), vec![8]),
        (format!("{p}.q_proj.bias"), vec![32]),
        (format!("{p}.q_proj.weight"), vec![32, 16]),
        (format!("{p}.v_proj.bias"), vec![16]),
        (format!("{p}.v_proj.weight"), vec![16, 16]),
    ];
    assert_eq!(got, want);
}

// ------------------------------------------------------------------ decoding

/// Prefill `split[0]` tokens, then steps of the sizes in `split[1..]`, then one token at a time.
fn decode(attn: &Attention, x: &Tensor, split: &[usize], capacity: usize) -> (Tensor, KvCache) {
    let (b, l) = (x.dims()[0], x.dims()[1]);
    let mut cache = attn.new_cache(b, capacity).unwrap();
    let mut outs = Vec::new();
    let mut at = 0;
    let mut sizes = split.to_vec();
    while at + sizes.iter().sum::<usize>() < l {
        sizes.push(1);
    }
    for n in sizes {
        let n = n.min(l - at);
        outs.push(attn.forward_step(&x.narrow(1, at, n).unwrap(), &mut cache).unwrap());
        at += n;
        assert_eq!(cache.len(), at);
    }
    let refs: Vec<&Tensor> = outs.iter().collect();
    (ops::concat(&refs, 1).unwrap(), cache)
}

#[test]
fn decode_equals_forward() {
    for (name, cfg) in configs() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let (_store, attn) = layer(&cfg, dtype);
            let x = Tensor::randn(5, (2, 11, 12), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
            let full = {
                let _g = no_grad();
                attn.forward(&Var::constant(x.clone())).unwrap().tensor().clone()
            };
            for split in [&[4usize, 3][..], &[1], &[11]] {
                let (stepped, cache) = decode(&attn, &x, split, 20);
                let err = max_rel(&stepped.to_vec_f64().unwrap(), &full.to_vec_f64().unwrap());
                assert!(err < tol, "{name} {dtype} split {split:?}: {err}");
                assert_eq!(cache.k().unwrap().dims(), &[2, cfg.kv_heads, 11, cfg.head_dim]);
            }
        }
    }
}

#[test]
fn decode_handles_batch_one_and_strided_input() {
    let cfg = AttentionConfig { window: Some(4), ..AttentionConfig::new(12, 6, 3, 4) };
    let (_s, attn) = layer(&cfg, DType::F64);
    // A transposed (non-contiguous) input of shape (1, 9, 12).
    let xt = Tensor::randn(8, (12, 9), 0.0, 1.0, DType::F64, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert!(!xt.is_contiguous());
    let full = attn.forward(&Var::constant(xt.clone())).unwrap().tensor().clone();
    let (stepped, _) = decode(&attn, &xt, &[2], 9);
    assert!(max_rel(&stepped.to_vec_f64().unwrap(), &full.to_vec_f64().unwrap()) < 1e-12);
}

#[test]
fn kv_cache_appends_in_place_and_grows_by_doubling() {
    let mut cache = KvCache::new("layer", 2, 3, 4, 100, DType::F32, &Device::Cpu).unwrap();
    assert!(cache.is_empty());
    assert_eq!(cache.numbers_per_token(), 2 * 3 * 4);
    assert_eq!(cache.bytes_per_token(), 2 * 3 * 4 * 4);
    let mut all_k: Vec<Tensor> = Vec::new();
    let mut allocs = Vec::new();
    for step in 0..40 {
        let n = if step == 0 { 5 } else { 1 };
        // A transposed view (b, hkv, n, hd) of (b, n, hkv, hd), as the layer produces.
        let k = Tensor::randn(step, (2, n, 3, 4), 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let v = ops::affine(&k, 2.0, 1.0).unwrap();
        let before = cache.k().unwrap(); // a view held across the append: copy-on-write keeps it
        let before_vals = before.to_vec::<f32>().unwrap();
        cache.append(&k, &v).unwrap();
        assert_eq!(before.to_vec::<f32>().unwrap(), before_vals);
        all_k.push(k);
        allocs.push(cache.allocated());
    }
    assert_eq!(cache.len(), 44);
    let refs: Vec<&Tensor> = all_k.iter().collect();
    let want_k = ops::concat(&refs, 2).unwrap();
    assert_eq!(cache.k().unwrap().to_vec::<f32>().unwrap(), want_k.to_vec::<f32>().unwrap());
    let want_v = ops::affine(&want_k, 2.0, 1.0).unwrap();
    assert_eq!(cache.v().unwrap().to_vec::<f32>().unwrap(), want_v.to_vec::<f32>().unwrap());
    // Doubling: 16, 32, 64 slots, never more than the capacity, reallocated only 3 times.
    let mut distinct = allocs.clone();
    distinct.dedup();
    assert_eq!(distinct, vec![16, 32, 64]);
    cache.clear();
    assert_eq!((cache.len(), cache.allocated()), (0, 64));
    assert_eq!(cache.k().unwrap().dims(), &[2, 3, 0, 4]);
}

#[test]
fn kv_cache_capacity_is_a_hard_limit() {
    let mut cache = KvCache::new("l", 1, 1, 2, 20, DType::F64, &Device::Cpu).unwrap();
    let k = Tensor::zeros((1, 1, 18, 2), DType::F64, &Device::Cpu).unwrap();
    cache.append(&k, &k).unwrap();
    assert_eq!(cache.allocated(), 18);
    let k2 = Tensor::zeros((1, 1, 2, 2), DType::F64, &Device::Cpu).unwrap();
    cache.append(&k2, &k2).unwrap();
    assert_eq!((cache.len(), cache.allocated()), (20, 20));
    let e = cache.append(&k2, &k2).unwrap_err().to_string();
    assert!(e.contains("20") && e.contains("capacity") || e.contains("at most 20"), "{e}");
    let e = cache.append(&Tensor::zeros((1, 2, 1, 2), DType::F64, &Device::Cpu).unwrap(), &k2).unwrap_err();
    assert!(e.to_string().contains("`l`"), "{e}");
    let e = cache.append(&k2.to_dtype(DType::F32).unwrap(), &k2.to_dtype(DType::F32).unwrap()).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
}

// ------------------------------------------------------------------ gradients

/// Central differences of `L = Σ f(x) ⊙ c` with respect to `x` and every parameter of `store`
/// (perturbed through `Param::set`, so the layer is checked as it reads its parameters), against
/// the gradients the tape gives.
fn check_layer_gradients(store: &ParamStore, x: &Tensor, f: impl Fn(&Var) -> Result<Var>) {
    let xv = Var::param(x.clone());
    let out = f(&xv).unwrap();
    let cot = Tensor::randn(99, out.shape(), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let c = cot.to_vec_f64().unwrap();
    let grads = out.backward_with(cot).unwrap();
    let objective = |x: &Tensor| -> f64 {
        let _g = no_grad();
        let o = f(&Var::constant(x.clone())).unwrap().tensor().to_vec_f64().unwrap();
        o.iter().zip(&c).map(|(a, b)| a * b).sum()
    };
    let eps = 1e-6;
    let check = |what: &str, analytic: Vec<f64>, numeric: Vec<f64>| {
        for (j, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            assert!((a - n).abs() <= 1e-6 + 1e-4 * n.abs(), "{what}[{j}]: analytic {a} vs numeric {n}");
        }
    };
    // x
    let base = x.to_vec_f64().unwrap();
    let numeric: Vec<f64> = (0..base.len())
        .map(|j| {
            let mut v = base.clone();
            v[j] += eps;
            let plus = objective(&Tensor::from_vec(v.clone(), x.shape(), &Device::Cpu).unwrap());
            v[j] -= 2.0 * eps;
            let minus = objective(&Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap());
            (plus - minus) / (2.0 * eps)
        })
        .collect();
    check("x", grads.get(&xv).unwrap().to_vec_f64().unwrap(), numeric);
    // parameters
    for p in store.params() {
        let t = p.tensor();
        let analytic = grads
            .get(&p.var())
            .unwrap_or_else(|| panic!("no gradient for {}", p.name()))
            .to_vec_f64()
            .unwrap();
        let base = t.to_vec_f64().unwrap();
        let numeric: Vec<f64> = (0..base.len())
            .map(|j| {
                let mut v = base.clone();
                v[j] += eps;
                p.set(Tensor::from_vec(v.clone(), t.shape(), &Device::Cpu).unwrap()).unwrap();
                let plus = objective(x);
                v[j] -= 2.0 * eps;
                p.set(Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()).unwrap();
                let minus = objective(x);
                (plus - minus) / (2.0 * eps)
            })
            .collect();
        p.set(t).unwrap();
        check(p.name(), analytic, numeric);
    }
}

#[test]
fn gradient_check_attention_layer() {
    let small = AttentionConfig::new(6, 4, 2, 4);
    for cfg in [
        AttentionConfig { qk_norm: true, bias: true, o_bias: true, window: Some(3), ..small },
        AttentionConfig { kv_heads: 1, rope: None, ..small },
    ] {
        let (store, attn) = layer(&cfg, DType::F64);
        let x = Tensor::randn(4, (2, 5, 6), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        check_layer_gradients(&store, &x, |x| attn.forward(x));
    }
}

// ------------------------------------------------------------------ errors

#[test]
fn bad_configs_name_the_key() {
    let ok = AttentionConfig::new(16, 4, 2, 8);
    ok.validate().unwrap();
    let cases = [
        (AttentionConfig { kv_heads: 3, ..ok }, "num_heads"),
        (AttentionConfig { head_dim: 7, ..ok }, "head_dim"),
        (AttentionConfig { num_heads: 0, ..ok }, "num_heads"),
        (AttentionConfig { window: Some(0), ..ok }, "window"),
        (AttentionConfig { rope: Some(RopeConfig::rotate_half(-1.0)), ..ok }, "theta"),
        (AttentionConfig { qk_norm: true, norm_eps: 0.0, ..ok }, "norm_eps"),
        (AttentionConfig { scale: Some(f64::NAN), ..ok }, "scale"),
    ];
    for (cfg, key) in cases {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
        let store = ParamStore::new(DType::F32, Device::Cpu, 0);
        assert!(Attention::new(&store.root(), &cfg).is_err());
        assert!(store.params().is_empty(), "no parameter is created for a bad config");
    }
    // An odd head_dim is fine without RoPE.
    AttentionConfig { head_dim: 7, rope: None, ..ok }.validate().unwrap();
}

#[test]
fn bad_inputs_and_caches_are_errors_naming_them() {
    let cfg = AttentionConfig::new(8, 2, 1, 4);
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let a0 = Attention::new(&store.root().pp("layers.0.attn"), &cfg).unwrap();
    let a1 = Attention::new(&store.root().pp("layers.1.attn"), &cfg).unwrap();
    let x = Tensor::randn(1, (2, 3, 8), 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    // Wrong width.
    let bad = Tensor::zeros((2, 3, 7), DType::F32, &Device::Cpu).unwrap();
    let e = a0.forward(&Var::constant(bad.clone())).unwrap_err().to_string();
    assert!(e.contains("[2, 3, 7]") && e.contains("layers.0.attn"), "{e}");
    let mut c0 = a0.new_cache(2, 4).unwrap();
    assert!(a0.forward_step(&bad, &mut c0).is_err());
    // Wrong dtype.
    let e = a0.forward_step(&x.to_dtype(DType::F64).unwrap(), &mut c0).unwrap_err().to_string();
    assert!(e.contains("dtype"), "{e}");
    // A cache of another layer.
    let e = a1.forward_step(&x, &mut c0).unwrap_err().to_string();
    assert!(e.contains("layers.0.attn") && e.contains("layers.1.attn"), "{e}");
    // A cache of another batch size.
    let mut c_b1 = a0.new_cache(1, 4).unwrap();
    let e = a0.forward_step(&x, &mut c_b1).unwrap_err().to_string();
    assert!(e.contains("batch 1") && e.contains("batch 2"), "{e}");
    // A cache of another shape for the same layer name.
    let mut c_h = KvCache::new("layers.0.attn", 2, 2, 4, 4, DType::F32, &Device::Cpu).unwrap();
    let e = a0.forward_step(&x, &mut c_h).unwrap_err().to_string();
    assert!(e.contains("2 kv heads") && e.contains("1 kv heads"), "{e}");
    // Past the capacity: 3 fit, 3 more do not; nothing is appended on failure.
    a0.forward_step(&x, &mut c0).unwrap();
    let e = a0.forward_step(&x, &mut c0).unwrap_err().to_string();
    assert!(e.contains("capacity") || e.contains("at most 4"), "{e}");
    assert_eq!(c0.len(), 3);
    a0.forward_step(&x.narrow(1, 0, 1).unwrap(), &mut c0).unwrap();
    assert_eq!(c0.len(), 4);
}
