//! Layers against the fixtures and gradient checks; the parameter store's naming and I/O.

use std::path::PathBuf;

use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_nn::{rms_norm, Init, Linear, ParamStore, RmsNorm, SwiGluMlp, WindowLm, WindowLmConfig};
use moeba_tensor::{DType, Device, Tensor};

fn fixture(name: &str) -> Option<std::collections::HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/ops").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_nn::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn rmsnorm_matches_fixture_f64_and_f32() {
    let Some(f) = fixture("rmsnorm.safetensors") else { return };
    let eps = f["eps"].to_scalar::<f64>().unwrap();
    for dtype in [DType::F64, DType::F32] {
        let x = Var::param(f["x"].to_dtype(dtype).unwrap());
        let w = Var::param(f["weight"].to_dtype(dtype).unwrap());
        let out = rms_norm(&x, &w, eps).unwrap();
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        assert!(max_rel(out.tensor(), &f["out"]) < tol, "{dtype} out");
        let go = f["grad_out"].to_dtype(dtype).unwrap();
        let grads = out.backward_with(go).unwrap();
        assert!(max_rel(grads.get(&x).unwrap(), &f["grad_x"]) < tol, "{dtype} grad_x");
        assert!(max_rel(grads.get(&w).unwrap(), &f["grad_weight"]) < tol, "{dtype} grad_weight");
    }
}

#[test]
fn layers_gradient_check() {
    let store = ParamStore::new(DType::F64, Device::Cpu, 3);
    let lin = Linear::new(&store.root().pp("lin"), 5, 3, true).unwrap();
    let mlp = SwiGluMlp::new(&store.root().pp("mlp"), 3, 4).unwrap();
    let norm = RmsNorm::new(&store.root().pp("norm"), 3, 1e-6).unwrap();
    let x = Tensor::randn(9, (2, 3, 5), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
    let params: Vec<Tensor> = store.params().iter().map(|p| p.tensor()).collect();
    let names: Vec<String> = store.params().iter().map(|p| p.name().to_string()).collect();
    let mut inputs = vec![x];
    inputs.extend(params);
    let report = check_gradients(
        |vs: &[Var]| {
            // Feed the checker's Vars in as the parameters, by name.
            for (p, v) in names.iter().zip(&vs[1..]) {
                store.get(p).unwrap().set(v.tensor().clone()).unwrap();
            }
            let _ = &vs;
            let h = lin_forward(&lin, &vs[0], &vs[1..], &names)?;
            let h = norm_forward(&norm, &h, &vs[1..], &names)?;
            mlp_forward(&mlp, &h, &vs[1..], &names)
        },
        &inputs,
        &GradCheckOptions::default(),
    );
    report.unwrap();
}

// The layers read their parameters from the store; for a gradient check the checker's own Vars
// must be used, so these helpers rebuild each layer's computation from the named inputs.
fn by_name<'a>(vs: &'a [Var], names: &[String], n: &str) -> &'a Var {
    &vs[names.iter().position(|x| x == n).unwrap()]
}
fn lin_forward(l: &Linear, x: &Var, vs: &[Var], names: &[String]) -> moeba_tensor::Result<Var> {
    let w = by_name(vs, names, l.weight.name());
    let b = by_name(vs, names, l.bias.as_ref().unwrap().name());
    let (b0, l0, i) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    x.reshape((b0 * l0, i))?.matmul(&w.t()?)?.add(b)?.reshape((b0, l0, l.out_features()))
}
fn norm_forward(n: &RmsNorm, x: &Var, vs: &[Var], names: &[String]) -> moeba_tensor::Result<Var> {
    rms_norm(x, by_name(vs, names, n.weight.name()), 1e-6)
}
fn mlp_forward(m: &SwiGluMlp, x: &Var, vs: &[Var], names: &[String]) -> moeba_tensor::Result<Var> {
    let g = by_name(vs, names, m.gate_proj.weight.name());
    let u = by_name(vs, names, m.up_proj.weight.name());
    let d = by_name(vs, names, m.down_proj.weight.name());
    x.matmul(&g.t()?)?.silu()?.mul(&x.matmul(&u.t()?)?)?.matmul(&d.t()?)
}

#[test]
fn layer_forward_equals_manual_computation() {
    // The layers themselves (reading the store) agree with the helpers above.
    let store = ParamStore::new(DType::F64, Device::Cpu, 5);
    let lin = Linear::new(&store.root().pp("lin"), 5, 3, true).unwrap();
    let mlp = SwiGluMlp::new(&store.root().pp("mlp"), 3, 4).unwrap();
    let x = Var::constant(Tensor::randn(1, (2, 3, 5), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap());
    let names: Vec<String> = store.params().iter().map(|p| p.name().to_string()).collect();
    let vs: Vec<Var> = store.params().iter().map(|p| p.var()).collect();
    let a = mlp.forward(&lin.forward(&x).unwrap()).unwrap();
    let b = mlp_forward(&mlp, &lin_forward(&lin, &x, &vs, &names).unwrap(), &vs, &names).unwrap();
    assert!(max_rel(a.tensor(), b.tensor()) < 1e-12);
    assert_eq!(a.dims(), &[2, 3, 3]);
    let e =
        lin.forward(&Var::constant(Tensor::zeros((2, 4), DType::F64, &Device::Cpu).unwrap())).unwrap_err();
    assert!(e.to_string().contains("lin.weight"), "{e}");
}

#[test]
fn param_store_names_init_and_round_trip() {
    let store = ParamStore::new(DType::F32, Device::Cpu, 7);
    let cfg = WindowLmConfig { vocab: 11, context: 3, embed_dim: 2, hidden: 8, intermediate: 6, layers: 2 };
    let model = WindowLm::new(&store.root().pp("model"), cfg).unwrap();
    let names: Vec<String> = store.params().iter().map(|p| p.name().to_string()).collect();
    assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()), "{names:?}");
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    // Initial values depend on the seed and the name only.
    let again = ParamStore::new(DType::F32, Device::Cpu, 7);
    let p = again
        .get_or_init("model.in_proj.weight", (8, 6), Init::Uniform { bound: 1.0 / 6f64.sqrt() })
        .unwrap();
    assert_eq!(
        p.tensor().to_vec::<f32>().unwrap(),
        store.get("model.in_proj.weight").unwrap().tensor().to_vec::<f32>().unwrap()
    );
    // Save, perturb, load back.
    let bytes = store.to_safetensors(None).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 6], (2, 3), &Device::Cpu).unwrap();
    let before = model.forward(&ids).unwrap().tensor().to_vec::<f32>().unwrap();
    let w = store.get("model.norm.weight").unwrap();
    w.set(Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_ne!(model.forward(&ids).unwrap().tensor().to_vec::<f32>().unwrap(), before);
    store.load_safetensors(&bytes).unwrap();
    assert_eq!(model.forward(&ids).unwrap().tensor().to_vec::<f32>().unwrap(), before);
    // Errors name the tensor.
    let e = store.load_safetensors(&bytes[..bytes.len() / 2]).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    let other = ParamStore::new(DType::F32, Device::Cpu, 7);
    let _ = other.get_or_init("model.norm.weight", 9, Init::Ones).unwrap();
    let e = other.load_safetensors(&bytes).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("[8]") && e.contains("[9]"), "{e}");
    let e = w.set(Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
    let e = store.get_or_init("model.norm.weight", 4, Init::Ones).unwrap_err().to_string();
    assert!(e.contains("[8]") && e.contains("[4]"), "{e}");
    let e = model.forward(&Tensor::zeros((2, 5), DType::U32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("WindowLm") && e.contains("[2, 5]"), "{e}");
}
