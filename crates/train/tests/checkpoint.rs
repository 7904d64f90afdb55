//! Checkpoints (atomic directories, manifest checks, pruning, `best/`, resolving), the training
//! state's exact round trip, the AdamW state round trip, and the fused AdamW step against the
//! op-by-op one, bit for bit, on every SIMD path this CPU has.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use moeba_autograd::Grads;
use moeba_kernels::cpu::simd;
use moeba_nn::{Init, Param, ParamStore};
use moeba_tensor::{DType, Device, Tensor};
use moeba_train::checkpoint::{
    crc32, load_checkpoint, resolve_checkpoint, Checkpoint, CheckpointError, Checkpointer, TrainState,
};
use moeba_train::data::BatcherState;
use moeba_train::optim::{AdamW, AdamWConfig};
use proptest::prelude::*;

/// Tests that compare bits across optimizer runs hold this: one of them switches the process-wide
/// SIMD path.
static SIMD: Mutex<()> = Mutex::new(());

fn simd_lock() -> std::sync::MutexGuard<'static, ()> {
    SIMD.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-ckpt-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn state(step: usize) -> TrainState {
    TrainState {
        step,
        rng: [1, u64::MAX, 0x0123_4567_89ab_cdef, step as u64],
        data: BatcherState { rng: [5, 6, 7, u64::MAX - 1], batches: 3 * step as u64 },
        tokens_seen: 1024 * step as u64,
        elapsed_s: 0.1 + step as f64 / 3.0,
        val_loss: step.is_multiple_of(2).then_some(1.0 / (step as f64 + 7.0)),
        best_val_loss: Some(0.123_456_789_012_345_67),
        balancing_bias: vec![("model.layers.1.moe".into(), vec![0.1, -0.2 / 3.0, 1e-300, -0.0])],
    }
}

fn ckpt(step: usize) -> Checkpoint {
    let model: Vec<u8> = (0..1000 + step).map(|i| (i * 31 + step) as u8).collect();
    let optimizer: Vec<u8> = (0..777).map(|i| (i * 7 + step) as u8).collect();
    Checkpoint {
        config_toml: format!("[model]\nhidden_size = 32\n# step {step}\n"),
        model,
        optimizer,
        state: state(step),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn same(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.config_toml, b.config_toml);
    assert_eq!(a.model, b.model);
    assert_eq!(a.optimizer, b.optimizer);
    assert_eq!(a.state, b.state);
}

#[test]
fn save_load_prune_best() {
    let run = tmp("save");
    let ck = Checkpointer::new(&run, 2).unwrap();
    assert_eq!(ck.latest().unwrap(), None);
    assert_eq!(ck.best(), None);

    let d1 = ck.save(&ckpt(100), true).unwrap();
    assert_eq!(d1, run.join("checkpoints/step-000100"));
    assert_eq!(names(&d1), ["config.toml", "model.safetensors", "optimizer.safetensors", "state.json"]);
    same(&load_checkpoint(&d1).unwrap(), &ckpt(100));
    same(&load_checkpoint(&ck.best().unwrap()).unwrap(), &ckpt(100));

    ck.save(&ckpt(200), false).unwrap();
    ck.save(&ckpt(300), true).unwrap();
    // keep_last = 2: step 100 is gone; best/ follows the last is_best save.
    assert_eq!(names(ck.dir()), ["best", "step-000200", "step-000300"]);
    same(&load_checkpoint(&ck.best().unwrap()).unwrap(), &ckpt(300));
    assert_eq!(ck.latest().unwrap(), Some(run.join("checkpoints/step-000300")));
    assert_eq!(ck.list().unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), [200, 300]);

    // Saving a step again (a rerun) replaces it whole, leaving nothing temporary.
    let mut again = ckpt(300);
    again.model.truncate(10);
    again.state.tokens_seen = 1;
    ck.save(&again, false).unwrap();
    same(&load_checkpoint(&run.join("checkpoints/step-000300")).unwrap(), &again);
    assert_eq!(names(ck.dir()), ["best", "step-000200", "step-000300"]);
    // best/ still holds the first step-300 contents (it was linked or copied, not shared by name).
    same(&load_checkpoint(&ck.best().unwrap()).unwrap(), &ckpt(300));

    // An older step saved after newer ones is kept (the just-written one is never pruned).
    ck.save(&ckpt(50), false).unwrap();
    assert!(run.join("checkpoints/step-000050").is_dir());
    assert_eq!(ck.list().unwrap().len(), 2);
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn keep_last_zero_means_one() {
    let run = tmp("keep0");
    let ck = Checkpointer::new(&run, 0).unwrap();
    assert_eq!(ck.keep_last(), 1);
    for s in [1, 2, 3] {
        ck.save(&ckpt(s), false).unwrap();
    }
    assert_eq!(names(ck.dir()), ["step-000003"]);
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn crash_leftovers_are_ignored_and_cleaned() {
    let run = tmp("crash");
    let ck = Checkpointer::new(&run, 3).unwrap();
    ck.save(&ckpt(10), false).unwrap();
    let dir = ck.dir().to_path_buf();
    // An interrupted save: a temporary directory, and a step dir with no state.json.
    std::fs::create_dir_all(dir.join(".tmp-step-000020-999")).unwrap();
    std::fs::write(dir.join(".tmp-step-000020-999/model.safetensors"), b"partial").unwrap();
    std::fs::create_dir_all(dir.join("step-000030")).unwrap();
    std::fs::write(dir.join("step-000030/model.safetensors"), b"x").unwrap();
    // A step dir whose state.json does not parse.
    std::fs::create_dir_all(dir.join("step-000040")).unwrap();
    std::fs::write(dir.join("step-000040/state.json"), b"{\"version\": 1, \"sta").unwrap();
    // A replaced checkpoint moved aside whose replacement never arrived: it is restored.
    let mut moved = ckpt(5);
    moved.state.step = 5;
    ck.save(&moved, false).unwrap();
    std::fs::rename(dir.join("step-000005"), dir.join(".old-step-000005-4242")).unwrap();

    assert_eq!(ck.latest().unwrap(), Some(dir.join("step-000010")));
    assert_eq!(resolve_checkpoint(&run, false).unwrap(), dir.join("step-000010"));

    let ck = Checkpointer::new(&run, 3).unwrap();
    let left = names(&dir);
    assert!(!left.iter().any(|n| n.starts_with('.')), "{left:?}");
    assert!(left.contains(&"step-000005".to_string()), "{left:?}");
    same(&load_checkpoint(&dir.join("step-000005")).unwrap(), &moved);
    assert_eq!(ck.latest().unwrap(), Some(dir.join("step-000010")));
    std::fs::remove_dir_all(&run).unwrap();
}

fn err(dir: &Path) -> String {
    match load_checkpoint(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file() {
    let run = tmp("damage");
    let ck = Checkpointer::new(&run, 5).unwrap();
    let d = ck.save(&ckpt(7), false).unwrap();
    let model = std::fs::read(d.join("model.safetensors")).unwrap();

    // Truncated.
    std::fs::write(d.join("model.safetensors"), &model[..500]).unwrap();
    let e = err(&d);
    assert!(
        e.contains(&format!("model.safetensors is 500 bytes, the manifest says {}: truncated", model.len())),
        "{e}"
    );
    // Longer.
    let mut long = model.clone();
    long.push(0);
    std::fs::write(d.join("model.safetensors"), &long).unwrap();
    assert!(err(&d).contains("longer than written"), "{}", err(&d));
    // Same length, one bit flipped.
    let mut flipped = model.clone();
    flipped[123] ^= 1;
    std::fs::write(d.join("model.safetensors"), &flipped).unwrap();
    let e = err(&d);
    assert!(e.contains("model.safetensors: CRC32 is") && e.contains("corrupt"), "{e}");
    std::fs::write(d.join("model.safetensors"), &model).unwrap();
    load_checkpoint(&d).unwrap();

    // A missing file.
    std::fs::remove_file(d.join("optimizer.safetensors")).unwrap();
    assert!(err(&d).contains("optimizer.safetensors is missing"), "{}", err(&d));
    std::fs::write(d.join("optimizer.safetensors"), &ckpt(7).optimizer).unwrap();
    load_checkpoint(&d).unwrap();

    // state.json: unparsable, from the future, absent.
    let sj = std::fs::read_to_string(d.join("state.json")).unwrap();
    std::fs::write(d.join("state.json"), &sj[..sj.len() / 2]).unwrap();
    assert!(err(&d).contains("state.json does not parse"), "{}", err(&d));
    std::fs::write(d.join("state.json"), sj.replacen("\"version\": 1", "\"version\": 99", 1)).unwrap();
    assert!(err(&d).contains("format version 99"), "{}", err(&d));
    std::fs::remove_file(d.join("state.json")).unwrap();
    assert!(err(&d).contains("state.json is missing"), "{}", err(&d));
    // Not a directory at all.
    assert!(err(&run.join("nope")).contains("nope"));
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn resolve_finds_the_checkpoint() {
    let run = tmp("resolve");
    // Nothing there yet.
    let e = resolve_checkpoint(&run, false).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
    std::fs::create_dir_all(&run).unwrap();
    let e = resolve_checkpoint(&run, false).unwrap_err().to_string();
    assert!(e.contains("no checkpoint found") && e.contains("HINT"), "{e}");

    let ck = Checkpointer::new(&run, 3).unwrap();
    ck.save(&ckpt(1), false).unwrap();
    ck.save(&ckpt(2), false).unwrap();
    let step2 = run.join("checkpoints/step-000002");
    // No best/ yet: prefer_best falls back to the newest.
    assert_eq!(resolve_checkpoint(&run, true).unwrap(), step2);
    ck.save(&ckpt(3), false).unwrap();
    let step1 = run.join("checkpoints/step-000001");
    let best = {
        // Make step 1 the best by saving it again with is_best.
        ck.save(&ckpt(1), true).unwrap();
        run.join("checkpoints/best")
    };
    assert_eq!(resolve_checkpoint(&run, false).unwrap(), run.join("checkpoints/step-000003"));
    assert_eq!(resolve_checkpoint(&run, true).unwrap(), best);
    assert_eq!(
        resolve_checkpoint(&run.join("checkpoints"), false).unwrap(),
        run.join("checkpoints/step-000003")
    );
    assert_eq!(resolve_checkpoint(&step1, true).unwrap(), step1);
    let file = step1.join("state.json");
    assert!(resolve_checkpoint(&file, false).is_err());
    std::fs::remove_dir_all(&run).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Every f64 of the training state (biases, losses, time) reads back with the same bits.
    #[test]
    fn train_state_round_trips_exactly(
        bits in proptest::collection::vec(any::<u64>(), 0..20),
        elapsed in any::<f64>().prop_filter("finite", |x| x.is_finite()),
        val in proptest::option::of(any::<f64>().prop_filter("finite", |x| x.is_finite())),
        rng in any::<[u64; 4]>(),
    ) {
        let bias: Vec<f64> = bits.iter().map(|&b| f64::from_bits(b)).filter(|x| x.is_finite()).collect();
        let mut c = ckpt(11);
        c.state.elapsed_s = elapsed;
        c.state.val_loss = val;
        c.state.rng = rng;
        c.state.balancing_bias = vec![("a".into(), bias.clone()), ("b".into(), vec![])];
        let run = tmp(&format!("prop-{}", rng[0] % 1000));
        let d = Checkpointer::new(&run, 1).unwrap().save(&c, false).unwrap();
        let back = load_checkpoint(&d).unwrap().state;
        std::fs::remove_dir_all(&run).unwrap();
        let bb: Vec<u64> = back.balancing_bias[0].1.iter().map(|x| x.to_bits()).collect();
        prop_assert_eq!(bb, bias.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        prop_assert_eq!(back.elapsed_s.to_bits(), elapsed.to_bits());
        prop_assert_eq!(back.val_loss.map(f64::to_bits), val.map(f64::to_bits));
        prop_assert_eq!(back, c.state);
    }
}

#[test]
fn crc32_of_files_is_the_zlib_one() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

// ------------------------------------------------------------------------------ AdamW

/// A store of a few parameters of `dtype` (names chosen to exercise decay rules).
fn store(dtype: DType, seed: u64) -> (ParamStore, Vec<Param>) {
    let s = ParamStore::new(dtype, Device::Cpu, seed);
    let specs: [(&str, Vec<usize>); 4] = [
        ("embed.weight", vec![11, 4]),
        ("layer.w", vec![5, 13]),
        ("layer.b", vec![13]),
        ("norm.weight", vec![1]),
    ];
    let params = specs
        .into_iter()
        .map(|(n, shape)| s.get_or_init(n, shape, Init::Normal { std: 0.5 }).unwrap())
        .collect();
    (s, params)
}

/// Seeded gradients for the current values of `params`.
fn grads(params: &[Param], seed: u64) -> Grads {
    let mut g = Grads::default();
    for (i, p) in params.iter().enumerate() {
        let v = p.var();
        let t = Tensor::randn(seed * 31 + i as u64, v.shape().clone(), 0.0, 1.0, v.dtype(), &Device::Cpu)
            .unwrap();
        g.insert(&v, t);
    }
    g
}

fn bits(t: &Tensor) -> Vec<u64> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap().iter().map(|x| x.to_bits() as u64).collect(),
        _ => t.to_vec::<f64>().unwrap().iter().map(|x| x.to_bits()).collect(),
    }
}

fn cfg() -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
}

#[test]
fn adamw_state_round_trip_is_bit_exact() {
    let _g = simd_lock();
    for dtype in [DType::F32, DType::F64] {
        // Straight: 6 steps. Split: 3 steps, save, a fresh optimizer loads, 3 more steps.
        let (_s1, p1) = store(dtype, 3);
        let mut straight = AdamW::new(p1.clone(), cfg()).unwrap();
        for step in 0..6 {
            straight.step(&grads(&p1, step), 1e-2, 0.8).unwrap();
        }
        let (_s2, p2) = store(dtype, 3);
        let mut first = AdamW::new(p2.clone(), cfg()).unwrap();
        // `norm.weight` gets no gradient in the first half: it has no state to save.
        for step in 0..3 {
            let mut g = grads(&p2, step);
            g.remove(&p2[3].var());
            first.step(&g, 1e-2, 0.8).unwrap();
        }
        let bytes = first.state_to_safetensors().unwrap();
        let mut second = AdamW::new(p2.clone(), cfg()).unwrap();
        second.load_state_safetensors(&bytes).unwrap();
        assert_eq!(second.steps(), 3);
        assert!(second.moments("norm.weight").is_none());
        for name in ["embed.weight", "layer.w", "layer.b"] {
            let (a, b) = (first.moments(name).unwrap(), second.moments(name).unwrap());
            assert_eq!(bits(a.0), bits(b.0), "{name}");
            assert_eq!(bits(a.1), bits(b.1), "{name}");
        }
        assert_eq!(second.state_to_safetensors().unwrap(), bytes, "save → load → save changes the bytes");
        // The split run, with the same gradients as the straight one in its second half.
        let (_s3, p3) = store(dtype, 3);
        let mut ref_first = AdamW::new(p3.clone(), cfg()).unwrap();
        for step in 0..3 {
            let mut g = grads(&p3, step);
            g.remove(&p3[3].var());
            ref_first.step(&g, 1e-2, 0.8).unwrap();
        }
        for step in 3..6 {
            second.step(&grads(&p2, step), 1e-2, 0.8).unwrap();
            ref_first.step(&grads(&p3, step), 1e-2, 0.8).unwrap();
        }
        for (a, b) in p2.iter().zip(&p3) {
            assert_eq!(bits(&a.tensor()), bits(&b.tensor()), "{} ({dtype:?})", a.name());
        }
        // And the straight run differs only by what norm.weight missed: the others' moment
        // history is the same, so their values agree.
        for i in 0..3 {
            assert_eq!(bits(&p1[i].tensor()), bits(&p2[i].tensor()), "{} ({dtype:?})", p1[i].name());
        }
    }
}

/// Named tensors, as safetensors files hold them.
type Named = Vec<(String, Tensor)>;

#[test]
fn adamw_state_errors_name_the_tensor() {
    let (_s, p) = store(DType::F32, 1);
    let mut opt = AdamW::new(p.clone(), cfg()).unwrap();
    opt.step(&grads(&p, 0), 1e-3, 1.0).unwrap();
    let good = opt.state_to_safetensors().unwrap();
    let tensors = moeba_tensor::safetensors_io::deserialize(&good, &Device::Cpu).unwrap();
    let meta = std::collections::HashMap::from([("step".to_string(), "1".to_string())]);
    let rebuild = |edit: &dyn Fn(&mut Named)| {
        let mut v: Named = tensors.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        edit(&mut v);
        moeba_tensor::safetensors_io::serialize(v, Some(meta.clone())).unwrap()
    };
    let mut fresh = AdamW::new(p.clone(), cfg()).unwrap();
    let load_err = |o: &mut AdamW, b: &[u8]| o.load_state_safetensors(b).unwrap_err().to_string();

    let missing = rebuild(&|v| v.retain(|(n, _)| n != "layer.w.exp_avg_sq"));
    assert!(load_err(&mut fresh, &missing).contains("missing tensor `layer.w.exp_avg_sq`"));
    let extra =
        rebuild(&|v| v.push(("ghost.exp_avg".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())));
    assert!(load_err(&mut fresh, &extra).contains("unexpected tensor `ghost.exp_avg`"));
    let shaped = rebuild(&|v| {
        for (n, t) in v.iter_mut() {
            if n == "layer.b.exp_avg" {
                *t = Tensor::zeros(12, DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    let e = load_err(&mut fresh, &shaped);
    assert!(e.contains("`layer.b.exp_avg` has shape") && e.contains("[12]") && e.contains("[13]"), "{e}");
    let e = load_err(&mut fresh, &good[..good.len() - 9]);
    assert!(e.contains("truncated") || e.contains("parse"), "{e}");
    let no_step = moeba_tensor::safetensors_io::serialize(vec![], None).unwrap();
    assert!(load_err(&mut fresh, &no_step).contains("`step`"));
    // Nothing changed by the failures; the good state still loads.
    assert_eq!(fresh.steps(), 0);
    fresh.load_state_safetensors(&good).unwrap();
    assert_eq!(fresh.steps(), 1);
}

/// A parameter value of `shape` and `dtype`, contiguous or a transposed/narrowed view.
fn value(shape: &[usize], dtype: DType, seed: u64, layout: u8) -> Tensor {
    let dev = Device::Cpu;
    let rand = |s: Vec<usize>| Tensor::randn(seed, s, 0.0, 1.0, dtype, &dev).unwrap();
    match (layout, shape) {
        (1, [a, b]) => rand(vec![*b, *a]).t().unwrap(),
        (2, [a, b]) => rand(vec![*a, b + 3]).narrow(1, 2, *b).unwrap(),
        (3, [a, b]) => rand(vec![1, *b]).broadcast_as(vec![*a, *b]).unwrap(),
        _ => rand(shape.to_vec()),
    }
}

/// Runs `steps` AdamW steps on one parameter with the fused path on or off; returns the bits of
/// the value and moments after each step.
#[allow(clippy::too_many_arguments)]
fn run_adam(
    fused: bool,
    shape: &[usize],
    dtype: DType,
    name: &str,
    layouts: (u8, u8),
    hyper: (f64, f64, f64),
    steps: usize,
    seed: u64,
) -> Vec<(Vec<u64>, Vec<u64>, Vec<u64>)> {
    let s = ParamStore::new(dtype, Device::Cpu, 0);
    let p = s.get_or_init(name, shape.to_vec(), Init::Zeros).unwrap();
    p.set(value(shape, dtype, seed, layouts.0)).unwrap();
    let (lr, scale, wd) = hyper;
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig { weight_decay: wd, ..cfg() }).unwrap();
    opt.set_fused(fused);
    let mut out = Vec::new();
    for k in 0..steps {
        let mut g = Grads::default();
        g.insert(&p.var(), value(shape, dtype, seed + 100 + k as u64, layouts.1));
        opt.step(&g, lr, scale).unwrap();
        let (m, v) = opt.moments(name).unwrap();
        out.push((bits(&p.tensor()), bits(m), bits(v)));
    }
    out
}

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (0usize..40).prop_map(|n| vec![n]),
        (0usize..9, 0usize..37).prop_map(|(a, b)| vec![a, b]),
        Just(vec![1]),
        Just(vec![1, 1]),
        (1usize..4, 1usize..5, 1usize..9).prop_map(|(a, b, c)| vec![a, b, c]),
    ]
}

/// The fused CPU step equals the op-by-op step bit for bit on random shapes, dtypes, layouts
/// and hyper-parameters, on every SIMD path this CPU can run (the f32 ops round as their path
/// does: fused multiply-adds on AVX2/AVX-512/NEON, separate ones on the scalar path).
#[test]
fn fused_step_equals_op_step_bit_for_bit() {
    let _g = simd_lock();
    let paths: Vec<simd::Path> = [simd::Path::Scalar, simd::Path::Neon, simd::Path::Avx2, simd::Path::Avx512]
        .into_iter()
        .filter(|&p| simd::is_supported(p))
        .collect();
    let before = simd::path();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(32));
    let strategy = (
        shape_strategy(),
        prop_oneof![Just(DType::F32), Just(DType::F64)],
        0u8..4,
        0u8..4,
        (1e-4f64..0.3, 0.01f64..1.0, 0.0f64..0.2),
        any::<bool>(),
        any::<u64>(),
    );
    let result = runner.run(&strategy, |(shape, dtype, lp, lg, hyper, embed, seed)| {
        // Param layouts 1-3 need rank 2 (and broadcast only as a gradient).
        let lp = if shape.len() == 2 && lp < 3 { lp } else { 0 };
        let lg = if shape.len() == 2 { lg } else { 0 };
        let name = if embed { "tok_embed.weight" } else { "blocks.0.w" };
        for &path in &paths {
            simd::set_path(path).unwrap();
            let a = run_adam(true, &shape, dtype, name, (lp, lg), hyper, 3, seed);
            let b = run_adam(false, &shape, dtype, name, (lp, lg), hyper, 3, seed);
            prop_assert_eq!(a, b, "path {:?}, shape {:?}, {:?}", path, shape, dtype);
        }
        Ok(())
    });
    simd::set_path(before).unwrap();
    result.unwrap();
}

/// Large parameters take the parallel chunked path; it gives the same bits too.
#[test]
fn fused_step_large_parameter() {
    let _g = simd_lock();
    for dtype in [DType::F32, DType::F64] {
        let shape = [301, 257];
        let a = run_adam(true, &shape, dtype, "big.w", (0, 0), (3e-3, 0.5, 0.1), 2, 9);
        let b = run_adam(false, &shape, dtype, "big.w", (0, 0), (3e-3, 0.5, 0.1), 2, 9);
        assert!(a == b, "{dtype:?}: fused and op steps differ");
    }
}

/// A non-finite gradient is an error naming the parameter, and nothing is updated.
#[test]
fn non_finite_update_changes_nothing() {
    for dtype in [DType::F32, DType::F64] {
        for fused in [true, false] {
            let (_s, p) = store(dtype, 5);
            let mut opt = AdamW::new(p.clone(), cfg()).unwrap();
            opt.set_fused(fused);
            opt.step(&grads(&p, 0), 1e-3, 1.0).unwrap();
            let before: Vec<_> = p.iter().map(|p| bits(&p.tensor())).collect();
            let moments_before = bits(opt.moments("layer.b").unwrap().0);
            let mut g = grads(&p, 1);
            let n = p[2].var().elem_count();
            let mut bad = vec![0.5; n];
            bad[n - 1] = f64::NAN;
            g.insert(&p[2].var(), Tensor::from_vec(bad, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap());
            let e = opt.step(&g, 1e-3, 1.0).unwrap_err().to_string();
            assert!(e.contains("non-finite update for `layer.b`"), "{e}");
            let after: Vec<_> = p.iter().map(|p| bits(&p.tensor())).collect();
            assert_eq!(before, after, "{dtype:?} fused={fused}");
            assert_eq!(opt.steps(), 1);
            assert_eq!(bits(opt.moments("layer.b").unwrap().0), moments_before);
        }
    }
}
