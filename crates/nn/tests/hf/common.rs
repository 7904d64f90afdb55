//! Shared helpers: load a fixture directory into a moeba model, compare tensors, decode greedily.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use moeba_nn::hf::{load_weights, HfSpec, LoadReport};
use moeba_nn::safetensors_io;
use moeba_nn::{ForwardOptions, HybridModel, ParamStore};
use moeba_tensor::{DType, Device, Tensor};

/// `../shared/fixtures/hf/{family}`.
pub fn fixture_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf").join(family)
}

/// The named tensors of a safetensors file.
pub fn read_safetensors(path: &std::path::Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()
}

/// A fixture loaded into moeba: the spec, the store, the model and `expected.safetensors`.
pub struct Fixture {
    /// The mapped config.
    pub spec: HfSpec,
    /// The model's parameters.
    pub store: ParamStore,
    /// The model.
    pub model: HybridModel,
    /// What `load_weights` reported.
    pub report: LoadReport,
    /// `model.safetensors` as read.
    pub weights: HashMap<String, Tensor>,
    /// `expected.safetensors`.
    pub expected: HashMap<String, Tensor>,
}

impl Fixture {
    /// Expected tensor `name` (panics with the name when absent).
    pub fn want(&self, name: &str) -> &Tensor {
        self.expected.get(name).unwrap_or_else(|| panic!("expected.safetensors has no `{name}`"))
    }

    /// Expected `input_ids` as U32 `(b, l)`.
    pub fn input_ids(&self) -> Tensor {
        self.want("input_ids").to_dtype(DType::U32).unwrap()
    }
}

/// Builds the spec from `config.json`, the model from the spec, and loads `model.safetensors`.
pub fn load_fixture(family: &str) -> Fixture {
    let dir = fixture_dir(family);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let spec = HfSpec::from_config(&json).unwrap_or_else(|e| panic!("{family}: config: {e}"));
    let weights = read_safetensors(&dir.join("model.safetensors"));
    let (store, model, report) = build(&spec, &weights);
    let expected = read_safetensors(&dir.join("expected.safetensors"));
    Fixture { spec, store, model, report, weights, expected }
}

/// A model for `spec` with `weights` loaded.
pub fn build(spec: &HfSpec, weights: &HashMap<String, Tensor>) -> (ParamStore, HybridModel, LoadReport) {
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let model = HybridModel::new(&store.root(), &spec.config).unwrap();
    let report = load_weights(spec, &store, weights).unwrap_or_else(|e| panic!("load_weights: {e}"));
    (store, model, report)
}

/// Full no-cache logits `(b, l, V)` of `ids (b, l)`.
pub fn logits(model: &HybridModel, ids: &Tensor) -> Tensor {
    let _guard = moeba_autograd::no_grad();
    let out = model.forward(ids, &ForwardOptions::default()).unwrap();
    out.logits.tensor().clone()
}

/// Largest |got - want| over largest |want|: the "relative" error the 1e-4 refers to.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let g = got.to_vec_f64().unwrap();
    let w = want.to_vec_f64().unwrap();
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// Asserts `rel_err(got, want) <= tol`, naming `what`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// Greedy decoding with the model's caches: prefill `prompt`, then `n` steps of `forward_step`.
/// Returns the prompt followed by the `n` new tokens, and the `(n, V)` logits that chose them.
pub fn greedy(model: &HybridModel, prompt: &[u32], n: usize) -> (Vec<u32>, Tensor) {
    let mut cache = model.new_cache(1, prompt.len() + n).unwrap();
    let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &Device::Cpu).unwrap();
    let mut last = model.prefill(&ids, &mut cache).unwrap();
    let mut out = prompt.to_vec();
    let mut steps = Vec::new();
    for i in 0..n {
        let row = last.to_vec::<f32>().unwrap();
        let next = argmax(&row);
        steps.extend_from_slice(&row);
        out.push(next);
        if i + 1 < n {
            let step = Tensor::from_vec(vec![next], 1, &Device::Cpu).unwrap();
            last = model.forward_step(&step, &mut cache).unwrap();
        }
    }
    let v = steps.len() / n.max(1);
    (out, Tensor::from_vec(steps, (n, v), &Device::Cpu).unwrap())
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks a fixture end to end: the no-cache logits (1e-4 relative), `lm_loss`, and greedy
/// generation with caches token for token, with the step logits that chose each token.
pub fn check_logits_and_generation(fx: &Fixture) {
    let ids = fx.input_ids();
    let got = logits(&fx.model, &ids);
    assert_close("logits", &got, fx.want("logits"), 1e-4);

    let l = ids.dims()[1];
    let v = moeba_autograd::Var::constant(got.narrow(1, 0, l - 1).unwrap().contiguous().unwrap());
    let t = ids.narrow(1, 1, l - 1).unwrap().contiguous().unwrap();
    let loss = HybridModel::lm_loss(&v, &t).unwrap();
    assert_close("lm_loss", loss.tensor(), fx.want("lm_loss"), 1e-4);

    let prompt: Vec<u32> = fx.want("generate_prompt").to_dtype(DType::U32).unwrap().to_vec().unwrap();
    let want: Vec<u32> = fx.want("generate_out").to_dtype(DType::U32).unwrap().to_vec().unwrap();
    let n = want.len() - prompt.len();
    let (out, step_logits) = greedy(&fx.model, &prompt, n);
    assert_eq!(out, want, "greedy generation with caches differs from transformers'");
    assert_close("generate_step_logits", &step_logits, fx.want("generate_step_logits"), 1e-4);
}
