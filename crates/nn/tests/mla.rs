//! Multi-head latent attention: against a plain re-implementation of the HF DeepSeek-V2 layer,
//! absorbed decoding over the latent cache against the naive full forward, what the cache holds,
//! gradient checks, the deepseek_v2 fixture's first decoder layer, errors.

use std::collections::HashMap;
use std::path::PathBuf;

use moeba_autograd::{no_grad, Var};
use moeba_kernels::ops;
use moeba_nn::mla::{Mla, MlaCache, MlaConfig};
use moeba_nn::{ParamStore, RmsNorm, RopeConfig, SwiGluMlp};
use moeba_tensor::{DType, Device, Result, Tensor};

// ------------------------------------------------------------------ plain re-implementation

fn lin(x: &[f64], rows: usize, w: &[f64], inf: usize, outf: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * outf];
    for r in 0..rows {
        for o in 0..outf {
            y[r * outf + o] = (0..inf).map(|i| x[r * inf + i] * w[o * inf + i]).sum();
        }
    }
    y
}

fn rms(x: &mut [f64], w: &[f64], eps: f64) {
    let n = w.len();
    for row in x.chunks_mut(n) {
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v *= inv * g;
        }
    }
}

/// Interleaved-pair RoPE of one vector at `pos` (HF DeepSeek-V2: the output stays interleaved).
fn rope_interleaved(v: &mut [f64], pos: usize, theta: f64) {
    let d = v.len();
    for i in 0..d / 2 {
        let (s, c) = (pos as f64 * theta.powf(-2.0 * i as f64 / d as f64)).sin_cos();
        let (e, o) = (v[2 * i], v[2 * i + 1]);
        v[2 * i] = e * c - o * s;
        v[2 * i + 1] = o * c + e * s;
    }
}

fn param(store: &ParamStore, name: &str) -> Vec<f64> {
    store.get(name).unwrap_or_else(|| panic!("no parameter {name}")).tensor().to_vec_f64().unwrap()
}

/// reference_models.py's MLA, with loops: the naive form (per-head keys and values).
fn naive_mla(store: &ParamStore, p: &str, c: &MlaConfig, x: &Tensor) -> Vec<f64> {
    let (b, l, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let (h, nope, dr, dv, kvr) = (c.num_heads, c.qk_nope_head_dim, c.d_rope, c.v_head_dim, c.kv_latent_dim);
    let qk = nope + dr;
    let xs = x.to_vec_f64().unwrap();
    let w = |n: &str| param(store, &format!("{p}.{n}.weight"));
    let mut q = match c.q_latent_dim {
        None => lin(&xs, b * l, &w("q_proj"), d, h * qk),
        Some(r) => {
            let mut a = lin(&xs, b * l, &w("q_a_proj"), d, r);
            rms(&mut a, &w("q_a_layernorm"), c.norm_eps);
            lin(&a, b * l, &w("q_b_proj"), r, h * qk)
        }
    };
    let ckv = lin(&xs, b * l, &w("kv_a_proj_with_mqa"), d, kvr + dr);
    let mut latent: Vec<f64> = ckv.chunks(kvr + dr).flat_map(|r| r[..kvr].to_vec()).collect();
    let mut k_rot: Vec<f64> = ckv.chunks(kvr + dr).flat_map(|r| r[kvr..].to_vec()).collect();
    rms(&mut latent, &w("kv_a_layernorm"), c.norm_eps);
    let kv = lin(&latent, b * l, &w("kv_b_proj"), kvr, h * (nope + dv));
    for bt in 0..b * l {
        for hh in 0..h {
            rope_interleaved(&mut q[(bt * h + hh) * qk + nope..][..dr], bt % l, c.rope.theta);
        }
        rope_interleaved(&mut k_rot[bt * dr..][..dr], bt % l, c.rope.theta);
    }
    let scale = c.scale();
    let mut o = vec![0.0; b * l * h * dv];
    for bi in 0..b {
        for hh in 0..h {
            for t in 0..l {
                let qv = &q[((bi * l + t) * h + hh) * qk..][..qk];
                let sc: Vec<f64> = (0..=t)
                    .map(|s| {
                        let row = (bi * l + s) * h + hh;
                        let kn = &kv[row * (nope + dv)..][..nope];
                        let kr = &k_rot[(bi * l + s) * dr..][..dr];
                        let dot: f64 = qv[..nope].iter().zip(kn).map(|(a, b)| a * b).sum::<f64>()
                            + qv[nope..].iter().zip(kr).map(|(a, b)| a * b).sum::<f64>();
                        dot * scale
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                for (s, &sv) in sc.iter().enumerate() {
                    let pr = (sv - m).exp() / z;
                    let row = (bi * l + s) * h + hh;
                    for e in 0..dv {
                        o[((bi * l + t) * h + hh) * dv + e] += pr * kv[row * (nope + dv) + nope + e];
                    }
                }
            }
        }
    }
    lin(&o, b * l, &w("o_proj"), h * dv, d)
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

// ------------------------------------------------------------------ configurations

fn small(q_latent_dim: Option<usize>) -> MlaConfig {
    MlaConfig {
        d_model: 12,
        num_heads: 3,
        q_latent_dim,
        kv_latent_dim: 10,
        qk_nope_head_dim: 5,
        d_rope: 4,
        v_head_dim: 6,
        rope: RopeConfig::interleaved(10000.0),
        norm_eps: 1e-6,
        softmax_scale: None,
    }
}

fn perturb(store: &ParamStore, seed: u64) {
    for (i, p) in store.params().iter().enumerate() {
        let t = p.tensor();
        let noise = Tensor::randn(seed + i as u64, t.shape(), 0.0, 0.2, t.dtype(), t.device()).unwrap();
        p.set(ops::add(&t, &noise).unwrap()).unwrap();
    }
}

fn layer(cfg: &MlaConfig, dtype: DType) -> (ParamStore, Mla) {
    let store = ParamStore::new(dtype, Device::Cpu, 23);
    let mla = Mla::new(&store.root().pp("model.layers.0.self_attn"), cfg).unwrap();
    perturb(&store, 7);
    (store, mla)
}

// ------------------------------------------------------------------ forward

#[test]
fn forward_matches_plain_reimplementation() {
    for q_latent in [None, Some(7)] {
        for cfg in [small(q_latent), MlaConfig { softmax_scale: Some(0.2), ..small(q_latent) }] {
            let (store, mla) = layer(&cfg, DType::F64);
            let x = Tensor::randn(2, (2, 6, 12), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
            let out = mla.forward(&Var::constant(x.clone())).unwrap();
            let want = naive_mla(&store, "model.layers.0.self_attn", &cfg, &x);
            let err = max_rel(&out.tensor().to_vec_f64().unwrap(), &want);
            assert!(err < 1e-12, "q_latent {q_latent:?}: {err}");
        }
    }
}

#[test]
fn parameters_have_hf_names_and_shapes() {
    let p = "model.layers.0.self_attn";
    for (q_latent, q_names) in [
        (None, vec![("q_proj.weight", vec![27, 12])]),
        (
            Some(7),
            vec![
                ("q_a_layernorm.weight", vec![7]),
                ("q_a_proj.weight", vec![7, 12]),
                ("q_b_proj.weight", vec![27, 7]),
            ],
        ),
    ] {
        let (store, _) = layer(&small(q_latent), DType::F32);
        let mut want: Vec<(String, Vec<usize>)> = vec![
            (format!("{p}.kv_a_layernorm.weight"), vec![10]),
            (format!("{p}.kv_a_proj_with_mqa.weight"), vec![14, 12]),
            (format!("{p}.kv_b_proj.weight"), vec![33, 10]),
            (format!("{p}.o_proj.weight"), vec![12, 18]),
        ];
        want.extend(q_names.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
        want.sort();
        let got: Vec<(String, Vec<usize>)> =
            store.params().iter().map(|p| (p.name().to_string(), p.tensor().dims().to_vec())).collect();
        assert_eq!(got, want);
    }
}

// ------------------------------------------------------------------ decoding

fn decode(mla: &Mla, x: &Tensor, first: usize, capacity: usize) -> (Tensor, MlaCache) {
    let (b, l) = (x.dims()[0], x.dims()[1]);
    let mut cache = mla.new_cache(b, capacity).unwrap();
    let mut outs = vec![mla.forward_step(&x.narrow(1, 0, first).unwrap(), &mut cache).unwrap()];
    for t in first..l {
        outs.push(mla.forward_step(&x.narrow(1, t, 1).unwrap(), &mut cache).unwrap());
    }
    let refs: Vec<&Tensor> = outs.iter().collect();
    (ops::concat(&refs, 1).unwrap(), cache)
}

#[test]
fn absorbed_decode_equals_naive_forward() {
    for q_latent in [None, Some(7)] {
        let cfg = small(q_latent);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let (_s, mla) = layer(&cfg, dtype);
            let x = Tensor::randn(9, (2, 10, 12), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
            let full = {
                let _g = no_grad();
                mla.forward(&Var::constant(x.clone())).unwrap().tensor().clone()
            };
            for first in [1, 4, 10] {
                let (stepped, cache) = decode(&mla, &x, first, 16);
                let err = max_rel(&stepped.to_vec_f64().unwrap(), &full.to_vec_f64().unwrap());
                assert!(err < tol, "q_latent {q_latent:?} {dtype} prefill {first}: {err}");
                assert_eq!(cache.len(), 10);
            }
        }
    }
}

#[test]
fn cache_holds_only_latent_and_rope_key() {
    let cfg = small(Some(7));
    let (store, mla) = layer(&cfg, DType::F64);
    let x = Tensor::randn(4, (2, 5, 12), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let (_, cache) = decode(&mla, &x, 3, 8);
    // kv_latent_dim + d_rope numbers per token (and layer), nothing per head.
    assert_eq!(cache.numbers_per_token(), cfg.kv_latent_dim + cfg.d_rope);
    assert_eq!(cfg.cache_numbers_per_token(), 14);
    assert_eq!(cache.bytes_per_token(), 14 * 8);
    assert_eq!(cache.entries().unwrap().dims(), &[2, 5, 14]);
    assert_eq!(cache.latent().unwrap().dims(), &[2, 5, 10]);
    assert_eq!(cache.k_rope().unwrap().dims(), &[2, 5, 4]);
    assert!(cache.allocated() <= 8);
    // A GQA cache of the naive form would hold h·(nope + rope + v) = 45 per token.
    let naive = cfg.num_heads * (cfg.qk_head_dim() + cfg.v_head_dim);
    assert!(cache.numbers_per_token() < naive);
    // What it holds: the normalised latent and the rotated shared key.
    let p = "model.layers.0.self_attn";
    let xs = x.to_vec_f64().unwrap();
    let ckv = lin(&xs, 10, &param(&store, &format!("{p}.kv_a_proj_with_mqa.weight")), 12, 14);
    let mut want_lat: Vec<f64> = ckv.chunks(14).flat_map(|r| r[..10].to_vec()).collect();
    rms(&mut want_lat, &param(&store, &format!("{p}.kv_a_layernorm.weight")), cfg.norm_eps);
    let mut want_rot: Vec<f64> = ckv.chunks(14).flat_map(|r| r[10..].to_vec()).collect();
    for bt in 0..10 {
        rope_interleaved(&mut want_rot[bt * 4..][..4], bt % 5, cfg.rope.theta);
    }
    assert!(max_rel(&cache.latent().unwrap().to_vec_f64().unwrap(), &want_lat) < 1e-12);
    assert!(max_rel(&cache.k_rope().unwrap().to_vec_f64().unwrap(), &want_rot) < 1e-12);
}

// ------------------------------------------------------------------ gradients

/// Central differences of `L = Σ f(x) ⊙ c` for `x` and every parameter (set through
/// `Param::set`) against the tape's gradients.
fn check_layer_gradients(store: &ParamStore, x: &Tensor, f: impl Fn(&Var) -> Result<Var>) {
    let xv = Var::param(x.clone());
    let out = f(&xv).unwrap();
    let cot = Tensor::randn(98, out.shape(), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
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
    let diff = |base: &[f64], shape: &[usize], eval: &dyn Fn(Tensor) -> f64| -> Vec<f64> {
        (0..base.len())
            .map(|j| {
                let mut v = base.to_vec();
                v[j] += eps;
                let plus = eval(Tensor::from_vec(v.clone(), shape, &Device::Cpu).unwrap());
                v[j] -= 2.0 * eps;
                let minus = eval(Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
                (plus - minus) / (2.0 * eps)
            })
            .collect()
    };
    let numeric = diff(&x.to_vec_f64().unwrap(), x.dims(), &|t| objective(&t));
    check("x", grads.get(&xv).unwrap().to_vec_f64().unwrap(), numeric);
    for p in store.params() {
        let t = p.tensor();
        let analytic = grads
            .get(&p.var())
            .unwrap_or_else(|| panic!("no gradient for {}", p.name()))
            .to_vec_f64()
            .unwrap();
        let numeric = diff(&t.to_vec_f64().unwrap(), t.dims(), &|v| {
            p.set(v).unwrap();
            objective(x)
        });
        p.set(t).unwrap();
        check(p.name(), analytic, numeric);
    }
}

#[test]
fn gradient_check_mla_layer() {
    for q_latent in [None, Some(3)] {
        let cfg = MlaConfig {
            d_model: 5,
            num_heads: 2,
            q_latent_dim: q_latent,
            kv_latent_dim: 4,
            qk_nope_head_dim: 3,
            d_rope: 2,
            v_head_dim: 3,
            rope: RopeConfig::interleaved(100.0),
            norm_eps: 1e-6,
            softmax_scale: None,
        };
        let (store, mla) = layer(&cfg, DType::F64);
        let x = Tensor::randn(3, (2, 4, 5), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        check_layer_gradients(&store, &x, |x| mla.forward(x));
    }
}

// ------------------------------------------------------------------ the HF fixture

fn hf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf/deepseek_v2")
}

fn load(name: &str) -> Option<HashMap<String, Tensor>> {
    let path = hf_dir().join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_nn::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

/// Layer 0 of the deepseek_v2 fixture (MLA without q latent, dense SwiGLU MLP):
/// `h = x + mla(norm(x)); h + mlp(norm(h))` equals `layer_out.0`, through the full forward and
/// through prefill + decode steps.
#[test]
fn deepseek_v2_fixture_first_layer() {
    let (Some(weights), Some(expected)) = (load("model.safetensors"), load("expected.safetensors")) else {
        return;
    };
    // config.json: hidden 48, 4 heads, q_lora_rank null, kv_lora_rank 20, nope 12, rope 8, v 10.
    let cfg = MlaConfig {
        d_model: 48,
        num_heads: 4,
        q_latent_dim: None,
        kv_latent_dim: 20,
        qk_nope_head_dim: 12,
        d_rope: 8,
        v_head_dim: 10,
        rope: RopeConfig::interleaved(10000.0),
        norm_eps: 1e-6,
        softmax_scale: None,
    };
    for dtype in [DType::F64, DType::F32] {
        let store = ParamStore::new(dtype, Device::Cpu, 0);
        let p = store.root().pp("model.layers.0");
        let mla = Mla::new(&p.pp("self_attn"), &cfg).unwrap();
        let in_norm = RmsNorm::new(&p.pp("input_layernorm"), 48, 1e-6).unwrap();
        let post_norm = RmsNorm::new(&p.pp("post_attention_layernorm"), 48, 1e-6).unwrap();
        let mlp = SwiGluMlp::new(&p.pp("mlp"), 48, 64).unwrap();
        for param in store.params() {
            let t = weights.get(param.name()).unwrap_or_else(|| panic!("fixture lacks {}", param.name()));
            param.set(t.to_dtype(dtype).unwrap()).unwrap();
        }
        let x = expected["embed_out"].to_dtype(dtype).unwrap();
        let want = expected["layer_out.0"].to_vec_f64().unwrap();
        let tol = if dtype == DType::F64 { 1e-5 } else { 2e-5 };
        let block = |attn_out: Tensor| -> Vec<f64> {
            let h = ops::add(&x, &attn_out).unwrap();
            let hv = Var::constant(h.clone());
            let m = mlp.forward(&post_norm.forward(&hv).unwrap()).unwrap();
            ops::add(&h, m.tensor()).unwrap().to_vec_f64().unwrap()
        };
        let normed = in_norm.forward(&Var::constant(x.clone())).unwrap();
        let full = mla.forward(&normed).unwrap().tensor().clone();
        let err = max_rel(&block(full), &want);
        assert!(err < tol, "{dtype} forward: {err}");
        let (stepped, cache) = decode(&mla, normed.tensor(), 20, 27);
        assert_eq!(cache.entries().unwrap().dims(), &[2, 27, 28]);
        let err = max_rel(&block(stepped), &want);
        assert!(err < tol, "{dtype} decode: {err}");
    }
}

// ------------------------------------------------------------------ errors

#[test]
fn bad_configs_name_the_key() {
    let ok = small(Some(7));
    ok.validate().unwrap();
    for (cfg, key) in [
        (MlaConfig { d_rope: 3, ..ok }, "d_rope"),
        (MlaConfig { kv_latent_dim: 0, ..ok }, "kv_latent_dim"),
        (MlaConfig { q_latent_dim: Some(0), ..ok }, "q_latent_dim"),
        (MlaConfig { rope: RopeConfig::interleaved(0.0), ..ok }, "theta"),
        (MlaConfig { norm_eps: -1.0, ..ok }, "norm_eps"),
        (MlaConfig { softmax_scale: Some(f64::INFINITY), ..ok }, "softmax_scale"),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
        let store = ParamStore::new(DType::F32, Device::Cpu, 0);
        assert!(Mla::new(&store.root(), &cfg).is_err());
    }
}

#[test]
fn bad_inputs_and_caches_are_errors_naming_them() {
    let cfg = small(None);
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let m0 = Mla::new(&store.root().pp("layers.0.mla"), &cfg).unwrap();
    let m1 = Mla::new(&store.root().pp("layers.1.mla"), &cfg).unwrap();
    let x = Tensor::randn(1, (1, 3, 12), 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let e = m0.forward(&Var::constant(Tensor::zeros((1, 3, 5), DType::F32, &Device::Cpu).unwrap()));
    assert!(e.unwrap_err().to_string().contains("layers.0.mla"));
    let mut c0 = m0.new_cache(1, 4).unwrap();
    let e = m1.forward_step(&x, &mut c0).unwrap_err().to_string();
    assert!(e.contains("layers.0.mla") && e.contains("layers.1.mla"), "{e}");
    let mut other = MlaCache::new("layers.0.mla", 1, 9, 4, 4, DType::F32, &Device::Cpu).unwrap();
    let e = m0.forward_step(&x, &mut other).unwrap_err().to_string();
    assert!(e.contains("latent 9") && e.contains("latent 10"), "{e}");
    let e = m0.forward_step(&x.to_dtype(DType::F64).unwrap(), &mut c0).unwrap_err().to_string();
    assert!(e.contains("dtype"), "{e}");
    m0.forward_step(&x, &mut c0).unwrap();
    let e = m0.forward_step(&x, &mut c0).unwrap_err().to_string();
    assert!(e.contains("capacity") && e.contains("layers.0.mla"), "{e}");
    assert_eq!(c0.len(), 3);
    let e = c0.append(
        &Tensor::zeros((1, 1, 10), DType::F32, &Device::Cpu).unwrap(),
        &Tensor::zeros((1, 1, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(e.unwrap_err().to_string().contains("k_rope"));
}
