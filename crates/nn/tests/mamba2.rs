//! Mamba2Block: the HF Mamba2 fixture (every layer's output, prefill caches), decode equals
//! forward, packed documents, a gradient check, config errors.

use std::collections::HashMap;
use std::path::PathBuf;

use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_kernels::ops;
use moeba_nn::mamba2::{Mamba2Block, Mamba2Config};
use moeba_nn::{rms_norm, ParamStore};
use moeba_tensor::{DType, Device, Tensor};

fn hf(name: &str) -> Option<HashMap<String, Tensor>> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf/mamba2").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_nn::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

/// max |a - b| / max(max |b|, 1e-30).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn hf_config(chunk: usize) -> Mamba2Config {
    Mamba2Config {
        d_model: 48,
        d_state: 12,
        d_conv: 4,
        expand: 2,
        head_dim: 16,
        num_heads: 6,
        n_groups: 1,
        chunk_size: chunk,
        conv_bias: true,
        bias: false,
        dt_min: 0.001,
        dt_max: 0.1,
        dt_init_floor: 1e-4,
        norm_eps: 1e-5,
    }
}

/// Layer `i`'s mixer with the fixture's weights.
fn hf_block(store: &ParamStore, w: &HashMap<String, Tensor>, i: usize, chunk: usize) -> Mamba2Block {
    let path = store.root().pp("backbone").pp("layers").pp(i).pp("mixer");
    let block = Mamba2Block::new(&path, &hf_config(chunk)).unwrap();
    let prefix = format!("backbone.layers.{i}.mixer.");
    for p in store.params() {
        if let Some(k) = p.name().strip_prefix(&prefix) {
            p.set(w[&format!("{prefix}{k}")].clone()).unwrap();
        }
    }
    block
}

#[test]
fn matches_hf_layer_outputs() {
    let (Some(w), Some(e)) = (hf("model.safetensors"), hf("expected.safetensors")) else { return };
    for chunk in [16, 5, 64] {
        let store = ParamStore::new(DType::F32, Device::Cpu, 0);
        let mut h = e["embed_out"].clone();
        for i in 0..3 {
            let block = hf_block(&store, &w, i, chunk);
            let nw = Var::constant(w[&format!("backbone.layers.{i}.norm.weight")].clone());
            let normed = rms_norm(&Var::constant(h.clone()), &nw, 1e-5).unwrap();
            let out = block.forward(&normed, None).unwrap();
            h = ops::add(&h, out.tensor()).unwrap();
            let err = rel(&h, &e[&format!("layer_out.{i}")]);
            assert!(err < 2e-5, "chunk {chunk} layer {i}: rel err {err:e}");
        }
    }
}

#[test]
fn prefill_matches_hf_caches() {
    let (Some(w), Some(e)) = (hf("model.safetensors"), hf("expected.safetensors")) else { return };
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let mut h = ops::embedding(&w["backbone.embeddings.weight"], &e["generate_prompt"]).unwrap();
    for i in 0..3 {
        let block = hf_block(&store, &w, i, 16);
        let nw = Var::constant(w[&format!("backbone.layers.{i}.norm.weight")].clone());
        let normed = rms_norm(&Var::constant(h.clone()), &nw, 1e-5).unwrap();
        let (out, cache) = block.prefill(normed.tensor()).unwrap();
        let err = rel(&cache.conv_state, &e[&format!("prefill_conv_state.{i}")]);
        assert!(err < 1e-5, "layer {i} conv_state rel err {err:e}");
        let err = rel(&cache.ssm_state, &e[&format!("prefill_ssm_state.{i}")]);
        assert!(err < 1e-5, "layer {i} ssm_state rel err {err:e}");
        h = ops::add(&h, &out).unwrap();
    }
}

fn small_config(g: usize, chunk: usize) -> Mamba2Config {
    Mamba2Config {
        d_model: 12,
        d_state: 5,
        d_conv: 4,
        expand: 2,
        head_dim: 6,
        num_heads: 4,
        n_groups: g,
        chunk_size: chunk,
        ..Mamba2Config::new(12)
    }
}

/// Prefill of a prompt, then token-by-token steps, equal the full-sequence forward.
#[test]
fn decode_equals_forward() {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
        for (g, prompt) in [(1, 5), (2, 2), (2, 0)] {
            let store = ParamStore::new(dtype, Device::Cpu, 42);
            let block = Mamba2Block::new(&store.root().pp("mixer"), &small_config(g, 4)).unwrap();
            let (b, l) = (2, 11);
            let x = Tensor::randn(7, (b, l, 12), 0.0, 1.0, dtype, &Device::Cpu).unwrap();
            let full = block.forward(&Var::constant(x.clone()), None).unwrap();
            let (pre, mut cache) = if prompt > 0 {
                block.prefill(&x.narrow(1, 0, prompt).unwrap()).unwrap()
            } else {
                (Tensor::zeros((b, 0, 12), dtype, &Device::Cpu).unwrap(), block.empty_cache(b).unwrap())
            };
            let mut outs = vec![pre];
            for t in prompt..l {
                let xt = x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
                outs.push(block.forward_step(&xt, &mut cache).unwrap().unsqueeze(1).unwrap());
            }
            let got = ops::concat(&outs.iter().collect::<Vec<_>>(), 1).unwrap();
            let err = rel(&got, full.tensor());
            assert!(err < tol, "{dtype} g {g} prompt {prompt}: rel err {err:e}");
        }
    }
}

/// Two documents packed in one row with seq_idx give the outputs of two separate forwards.
#[test]
fn packed_documents_do_not_mix() {
    let store = ParamStore::new(DType::F64, Device::Cpu, 3);
    let block = Mamba2Block::new(&store.root(), &small_config(2, 3)).unwrap();
    let x = Tensor::randn(9, (1, 10, 12), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let seq = Tensor::from_vec(vec![0i64, 0, 0, 0, 0, 0, 0, 1, 1, 1], (1, 10), &Device::Cpu).unwrap();
    let packed = block.forward(&Var::constant(x.clone()), Some(&seq)).unwrap();
    for (s, len) in [(0, 7), (7, 3)] {
        let one = block.forward(&Var::constant(x.narrow(1, s, len).unwrap()), None).unwrap();
        let err = rel(&packed.tensor().narrow(1, s, len).unwrap(), one.tensor());
        assert!(err < 1e-12, "document at {s}: rel err {err:e}");
    }
}

#[test]
fn gradcheck_block_input() {
    let store = ParamStore::new(DType::F64, Device::Cpu, 5);
    let block = Mamba2Block::new(&store.root(), &small_config(2, 3)).unwrap();
    let x = Tensor::randn(1, (2, 7, 12), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let seq =
        Tensor::from_vec(vec![0u32, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], (2, 7), &Device::Cpu).unwrap();
    let report = check_gradients(
        |v| block.forward(&v[0], Some(&seq)),
        &[x],
        &GradCheckOptions::default().with_tolerances(1e-7, 1e-5),
    )
    .unwrap();
    assert!(report.inputs[0].had_gradient);
    // Every parameter receives a gradient.
    let xv = Var::constant(Tensor::randn(2, (1, 5, 12), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap());
    let grads = block.forward(&xv, None).unwrap().sum_all().unwrap().backward().unwrap();
    for p in store.params() {
        assert!(grads.get(&p.var()).is_some(), "{} has no gradient", p.name());
    }
}

#[test]
fn init_follows_the_paper() {
    let store = ParamStore::new(DType::F64, Device::Cpu, 1);
    let cfg = Mamba2Config { num_heads: 64, head_dim: 1, ..Mamba2Config::new(32) };
    let block = Mamba2Block::new(&store.root(), &cfg).unwrap();
    let a: Vec<f64> = block.a_log.tensor().to_vec().unwrap();
    assert!(a.iter().all(|&v| v >= 0.0 && v <= 16f64.ln()), "A_log = log U(1, 16)");
    let dt: Vec<f64> = block.dt_bias.tensor().to_vec().unwrap();
    for v in dt {
        let sp = (1.0 + v.exp()).ln();
        assert!((cfg.dt_min - 1e-12..=cfg.dt_max + 1e-12).contains(&sp), "softplus(dt_bias) = {sp}");
    }
    assert!(block.d.tensor().to_vec::<f64>().unwrap().iter().all(|&v| v == 1.0));
    let names: Vec<String> = store.params().iter().map(|p| p.name().to_string()).collect();
    for n in [
        "A_log",
        "D",
        "dt_bias",
        "conv1d.weight",
        "conv1d.bias",
        "in_proj.weight",
        "norm.weight",
        "out_proj.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n} in {names:?}");
    }
}

#[test]
fn bad_config_and_input_are_errors() {
    let store = ParamStore::new(DType::F32, Device::Cpu, 1);
    let bad = Mamba2Config { num_heads: 5, ..small_config(1, 4) };
    assert!(Mamba2Block::new(&store.root(), &bad).unwrap_err().to_string().contains("num_heads"));
    let bad = Mamba2Config { n_groups: 3, ..small_config(1, 4) };
    assert!(Mamba2Block::new(&store.root(), &bad).unwrap_err().to_string().contains("n_groups"));
    let block = Mamba2Block::new(&store.root(), &small_config(1, 4)).unwrap();
    let x = Var::constant(Tensor::zeros((1, 3, 7), DType::F32, &Device::Cpu).unwrap());
    assert!(block.forward(&x, None).is_err());
}
