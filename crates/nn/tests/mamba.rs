//! The Mamba-1 block: the HF fixture (layer output and prefill cache), decode equals forward,
//! packed documents, a gradient check through every parameter.

use std::collections::HashMap;
use std::path::PathBuf;

use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_kernels::ops;
use moeba_nn::mamba::{MambaBlock, MambaConfig};
use moeba_nn::{rms_norm, ParamStore};
use moeba_tensor::{DType, Device, Tensor};

fn hf_fixture(file: &str) -> Option<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf/mamba").join(file);
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
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

fn hf_config() -> MambaConfig {
    MambaConfig { d_state: 12, dt_rank: 3, ..MambaConfig::new(40) }
}

#[test]
fn layer0_matches_hf_fixture_and_prefill_cache() {
    let (Some(w), Some(e)) = (hf_fixture("model.safetensors"), hf_fixture("expected.safetensors")) else {
        return;
    };
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let block = MambaBlock::new(&store.root().pp("backbone.layers.0.mixer"), &hf_config()).unwrap();
    for p in store.params() {
        p.set(w[p.name()].clone()).unwrap_or_else(|err| panic!("{}: {err}", p.name()));
    }
    let norm_w = Var::constant(w["backbone.layers.0.norm.weight"].clone());
    let h = Var::constant(e["embed_out"].clone());
    let out = block.forward(&rms_norm(&h, &norm_w, 1e-5).unwrap(), None).unwrap();
    let layer = ops::add(h.tensor(), out.tensor()).unwrap();
    let err = rel(&layer, &e["layer_out.0"]);
    assert!(err < 1e-5, "layer_out.0 rel err {err:e}");

    // Prefill of the generation prompt: the cache HF keeps.
    let ids = e["generate_prompt"].squeeze(0).unwrap();
    let emb = ops::embedding(&w["backbone.embeddings.weight"], &ids).unwrap().unsqueeze(0).unwrap();
    let x = rms_norm(&Var::constant(emb), &norm_w, 1e-5).unwrap();
    let (_, cache) = block.prefill(x.tensor()).unwrap();
    let e_conv = rel(&cache.conv_state, &e["prefill_conv_state.0"]);
    let e_ssm = rel(&cache.ssm_state, &e["prefill_ssm_state.0"]);
    assert!(e_conv < 1e-6 && e_ssm < 1e-5, "prefill cache: conv {e_conv:e}, ssm {e_ssm:e}");
}

#[test]
fn prefill_then_steps_equal_the_full_forward() {
    for (prompt, extra_norms) in [(4, false), (2, true), (0, false)] {
        let store = ParamStore::new(DType::F32, Device::Cpu, 7);
        let cfg = MambaConfig { d_state: 5, extra_norms, ..MambaConfig::new(16) };
        let block = MambaBlock::new(&store.root().pp("mixer"), &cfg).unwrap();
        let (b, l) = (2, 11);
        let x = Tensor::randn(3, (b, l, 16), 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
        let full = block.forward(&Var::constant(x.clone()), None).unwrap();
        let mut cache = if prompt > 0 {
            let (out, cache) = block.prefill(&x.narrow(1, 0, prompt).unwrap()).unwrap();
            assert!(rel(&out, &full.tensor().narrow(1, 0, prompt).unwrap()) < 1e-5);
            cache
        } else {
            block.empty_cache(b).unwrap()
        };
        for t in prompt..l {
            let step =
                block.forward_step(&x.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut cache).unwrap();
            let want = full.tensor().narrow(1, t, 1).unwrap().squeeze(1).unwrap();
            let err = rel(&step, &want);
            assert!(err < 1e-5, "prompt {prompt}, step {t}: rel err {err:e}");
        }
    }
}

#[test]
fn packed_documents_equal_separate_forwards() {
    let store = ParamStore::new(DType::F64, Device::Cpu, 11);
    let block = MambaBlock::new(&store.root(), &MambaConfig { d_state: 4, ..MambaConfig::new(8) }).unwrap();
    let (l, cut) = (13, 5);
    let x = Tensor::randn(5, (1, l, 8), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..l).map(|t| u32::from(t >= cut)).collect();
    let seq = Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
    let packed = block.forward(&Var::constant(x.clone()), Some(&seq)).unwrap();
    for (s, n) in [(0, cut), (cut, l - cut)] {
        let alone = block.forward(&Var::constant(x.narrow(1, s, n).unwrap()), None).unwrap();
        assert!(rel(&packed.tensor().narrow(1, s, n).unwrap(), alone.tensor()) < 1e-12, "document at {s}");
    }
}

#[test]
fn block_gradients_match_central_differences() {
    // The input goes through check_gradients; the parameters (which the block reads from the
    // store) are perturbed one element at a time through the store.
    let store = ParamStore::new(DType::F64, Device::Cpu, 3);
    let cfg = MambaConfig { d_state: 3, d_conv: 3, extra_norms: true, ..MambaConfig::new(4) };
    let block = MambaBlock::new(&store.root().pp("m"), &cfg).unwrap();
    assert_eq!(
        store.params().len(),
        12,
        "{:?}",
        store.params().iter().map(|p| p.name().to_string()).collect::<Vec<_>>()
    );
    let x = Tensor::randn(9, (2, 5, 4), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let seq = Tensor::from_vec(vec![0i64, 0, 1, 1, 1, 0, 0, 0, 0, 2], (2, 5), &Device::Cpu).unwrap();
    check_gradients(
        |vs: &[Var]| block.forward(&vs[0], Some(&seq)),
        std::slice::from_ref(&x),
        &GradCheckOptions::default(),
    )
    .unwrap();

    let cot = Tensor::randn(4, (2, 5, 4), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let loss = || -> f64 {
        let _g = moeba_autograd::no_grad();
        let y = block.forward(&Var::constant(x.clone()), Some(&seq)).unwrap();
        y.tensor().to_vec_f64().unwrap().iter().zip(cot.to_vec_f64().unwrap()).map(|(a, b)| a * b).sum()
    };
    let y = block.forward(&Var::constant(x.clone()), Some(&seq)).unwrap();
    let grads = y.backward_with(cot.clone()).unwrap();
    let eps = 1e-6;
    for p in store.params() {
        let g = grads
            .get(&p.var())
            .unwrap_or_else(|| panic!("{} got no gradient", p.name()))
            .to_vec_f64()
            .unwrap();
        let base = p.tensor();
        let v = base.to_vec_f64().unwrap();
        for j in 0..v.len() {
            let at = |delta: f64| {
                let mut w = v.clone();
                w[j] += delta;
                p.set(Tensor::from_vec(w, base.shape().clone(), &Device::Cpu).unwrap()).unwrap();
                loss()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (g[j] - numeric).abs() <= 1e-5 + 1e-3 * numeric.abs(),
                "{}[{j}]: analytic {} vs numeric {numeric}",
                p.name(),
                g[j]
            );
        }
        p.set(base).unwrap();
    }
}
