//! HuggingFace model directories end to end: `HfDir` / `load_hf_model` on the transformers-made
//! fixtures (`../shared/fixtures/hf/<family>`: logits to 1e-4 relative, greedy generation with
//! caches token for token), sharded and bf16/f16 copies, malformed directories (each error names
//! the file, key or tensor), and fine-tuning: the trainer starting from HF weights, and a
//! checkpoint of a fine-tuned HF model loading back bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use moeba_nn::hf::TensorSource;
use moeba_nn::safetensors_io;
use moeba_nn::{ForwardOptions, HybridModel};
use moeba_tensor::{DType, Device, Tensor};
use moeba_train::checkpoint::{Checkpoint, Checkpointer, TrainState};
use moeba_train::data::Batcher;
use moeba_train::hf::{
    configure_run, generate_until, load_hf_model, logits_of, parse_id_rows, write_safetensors, HfDir,
};
use moeba_train::optim::{AdamW, AdamWConfig};
use moeba_train::{load_run, RunConfig, SampleOptions, TrainOptions};

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf").join(family)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-hfdir-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read_st(path: &Path) -> HashMap<String, Tensor> {
    safetensors_io::deserialize(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    let t = t.to_dtype(DType::U32).unwrap();
    let (b, l) = (t.dims()[0], t.dims()[1]);
    let v: Vec<u32> = t.to_vec().unwrap();
    (0..b).map(|i| v[i * l..(i + 1) * l].to_vec()).collect()
}

/// Largest |got - want| over largest |want|.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    let g = got.to_vec_f64().unwrap();
    let w = want.to_vec_f64().unwrap();
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// Copies the fixture's config.json and generation_config.json into `dst`.
fn copy_config(family: &str, dst: &Path) {
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(fixture(family).join(f), dst.join(f)).unwrap();
    }
}

/// A character-level `tokenizer.json` (printable ASCII and newline → ids 3..=98, `<unk>` 0),
/// small enough for every fixture's vocabulary.
fn write_char_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), 0.into());
    vocab.insert("<s>".into(), 1.into());
    vocab.insert("</s>".into(), 2.into());
    let chars: Vec<char> = std::iter::once('\n').chain((32u8..127).map(char::from)).collect();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i + 3).into());
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
}

/// A writable copy of a fixture (config, generation config, weights) with a tokenizer.json.
fn copy_with_tokenizer(family: &str, name: &str) -> PathBuf {
    let dir = tmpdir(name);
    copy_config(family, &dir);
    std::fs::copy(fixture(family).join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    write_char_tokenizer(&dir);
    dir
}

/// `moeba logits` and `moeba generate --prompt-ids … --temperature 0` through the library on a
/// fixture: logits (written to and read back from a safetensors file) within 1e-4 relative, and
/// the greedy generation equal to transformers' `generate_out`.
fn check_fixture(family: &str) {
    let dir = fixture(family);
    let hf = load_hf_model(&dir).unwrap_or_else(|e| panic!("{family}: {e}"));
    let expected = read_st(&dir.join("expected.safetensors"));
    let rows = ids_of(&expected["input_ids"]);
    let text =
        rows.iter().map(|r| r.iter().map(u32::to_string).collect::<Vec<_>>().join(",")).collect::<Vec<_>>();
    let parsed = parse_id_rows(&text.join(";"), "--ids").unwrap();
    assert_eq!(parsed, rows);
    let out = tmpdir(&format!("logits-{family}")).join("logits.safetensors");
    write_safetensors(&out, vec![("logits".into(), logits_of(&hf.model, &parsed).unwrap())]).unwrap();
    let got = read_st(&out).remove("logits").unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let e = rel_err(&got, &expected["logits"]);
    assert!(e <= 1e-4, "{family}: logits relative error {e:.3e}");

    let prompt = ids_of(&expected["generate_prompt"]).remove(0);
    let want = ids_of(&expected["generate_out"]).remove(0);
    let opts =
        SampleOptions { max_new_tokens: want.len() - prompt.len(), temperature: 0.0, ..Default::default() };
    let new = generate_until(&hf.model, &prompt, &opts, &[], |_| {}).unwrap();
    let all: Vec<u32> = prompt.iter().chain(&new).copied().collect();
    assert_eq!(all, want, "{family}: greedy generation differs from transformers'");
    assert_eq!(hf.eos_token_ids.len(), 1, "{family}: eos from generation_config.json");
    assert!(hf.tokenizer.is_none());
    assert_eq!(hf.report.params_set, hf.store.params().len());
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

#[test]
fn fixture_mamba() {
    check_fixture("mamba");
}

#[test]
fn fixture_mamba2() {
    check_fixture("mamba2");
}

#[test]
fn fixture_mixtral() {
    check_fixture("mixtral");
}

#[test]
fn fixture_qwen2_moe() {
    check_fixture("qwen2_moe");
}

#[test]
fn fixture_jamba() {
    check_fixture("jamba");
}

#[test]
fn fixture_deepseek_v2() {
    check_fixture("deepseek_v2");
}

/// The family the tests below run on (any loads; this one has MoE layers and attention).
const FAMILY: &str = "mixtral";

fn logits_of_dir(dir: &Path) -> Tensor {
    let hf = load_hf_model(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let expected = read_st(&fixture(FAMILY).join("expected.safetensors"));
    logits_of(&hf.model, &ids_of(&expected["input_ids"])).unwrap()
}

#[test]
fn sharded_copy_loads_identically() {
    let weights = read_st(&fixture(FAMILY).join("model.safetensors"));
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let dir = tmpdir("sharded");
    copy_config(FAMILY, &dir);
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors = part.iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
        write_safetensors(&dir.join(&file), tensors).unwrap();
        for n in part {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let src = HfDir::open(&dir).unwrap();
    assert_eq!(src.files().len(), 2);
    assert_eq!(src.names().len(), weights.len());
    let single = logits_of_dir(&fixture(FAMILY));
    let sharded = logits_of_dir(&dir);
    assert_eq!(single.to_vec::<f32>().unwrap(), sharded.to_vec::<f32>().unwrap(), "sharded logits differ");

    // The index names a tensor that its shard does not hold.
    let good = std::fs::read(dir.join("model.safetensors.index.json")).unwrap();
    let mut bad_map = map.clone();
    bad_map.insert("model.bogus.weight".into(), "model-00001-of-00002.safetensors".into());
    let bad = serde_json::json!({ "weight_map": bad_map });
    std::fs::write(dir.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let err = HfDir::open(&dir).unwrap_err().to_string();
    assert!(err.contains("model.bogus.weight") && err.contains("model-00001-of-00002"), "{err}");
    std::fs::write(dir.join("model.safetensors.index.json"), good).unwrap();

    // A tensor that both shards hold.
    let dup = dir.join("model-00002-of-00002.safetensors");
    let mut second: Vec<(String, Tensor)> =
        names[half..].iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
    second.push((names[0].clone(), weights[names[0]].clone()));
    write_safetensors(&dup, second).unwrap();
    let err = HfDir::open(&dir).unwrap_err().to_string();
    assert!(err.contains(names[0].as_str()) && err.contains("two shards"), "{err}");

    // The index names a shard that is missing.
    std::fs::remove_file(&dup).unwrap();
    let err = HfDir::open(&dir).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn half_precision_copies_load() {
    let weights = read_st(&fixture(FAMILY).join("model.safetensors"));
    let want = read_st(&fixture(FAMILY).join("expected.safetensors")).remove("logits").unwrap();
    for (dtype, tol) in [(DType::BF16, 5e-2), (DType::F16, 5e-3)] {
        let dir = tmpdir(&format!("half-{dtype}"));
        copy_config(FAMILY, &dir);
        let tensors = weights.iter().map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap())).collect();
        write_safetensors(&dir.join("model.safetensors"), tensors).unwrap();
        let src = HfDir::open(&dir).unwrap();
        let name = src.names()[0].clone();
        assert_eq!(src.get(&name).unwrap().dtype(), DType::F32, "converted to f32 when read");
        let got = logits_of_dir(&dir);
        let e = rel_err(&got, &want);
        assert!(e <= tol && e > 0.0, "{dtype}: logits relative error {e:.3e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The error of loading `dir`, which must fail.
fn load_err(dir: &Path) -> String {
    match load_hf_model(dir) {
        Ok(_) => panic!("{} loaded but is malformed", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_directories_give_clear_errors() {
    let weights = read_st(&fixture(FAMILY).join("model.safetensors"));
    let write = |dir: &Path, w: &HashMap<String, Tensor>| {
        let tensors = w.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        write_safetensors(&dir.join("model.safetensors"), tensors).unwrap();
    };

    // No config.json.
    let dir = tmpdir("no-config");
    write(&dir, &weights);
    let err = load_err(&dir);
    assert!(err.contains("config.json") && err.contains("missing"), "{err}");

    // config.json that is not JSON.
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let err = load_err(&dir);
    assert!(err.contains("config.json") && err.contains("not valid JSON"), "{err}");

    // An unknown model_type.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(FAMILY).join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "llama".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("config.json") && err.contains("`llama`") && err.contains("mixtral"), "{err}");

    // No weights at all.
    let dir = tmpdir("no-weights");
    copy_config(FAMILY, &dir);
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors"), "{err}");

    // A truncated safetensors file.
    let dir = tmpdir("truncated");
    copy_config(FAMILY, &dir);
    let bytes = std::fs::read(fixture(FAMILY).join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");

    // A missing tensor.
    let dir = tmpdir("missing-tensor");
    copy_config(FAMILY, &dir);
    let gone = "model.layers.1.self_attn.k_proj.weight";
    let mut w = weights.clone();
    w.remove(gone).unwrap();
    write(&dir, &w);
    let err = load_err(&dir);
    assert!(err.contains(gone) && err.contains("missing"), "{err}");

    // A tensor of the wrong shape names the tensor and both shapes.
    let mut w = weights.clone();
    let t = Tensor::zeros((20, 48), DType::F32, &Device::Cpu).unwrap();
    w.insert(gone.into(), t);
    write(&dir, &w);
    let err = load_err(&dir);
    assert!(err.contains(gone) && err.contains("[20, 48]") && err.contains("[24, 48]"), "{err}");

    // An unexpected tensor.
    let mut w = weights.clone();
    w.insert("model.layers.0.extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    write(&dir, &w);
    let err = load_err(&dir);
    assert!(err.contains("model.layers.0.extra.weight"), "{err}");

    // A dtype moeba does not load names the tensor and the dtype.
    let mut w = weights.clone();
    w.insert(gone.into(), weights[gone].to_dtype(DType::I64).unwrap());
    write(&dir, &w);
    let err = load_err(&dir);
    assert!(err.contains(gone) && err.contains("I64"), "{err}");

    // Not a directory.
    let err = load_err(&dir.join("nope"));
    assert!(err.contains("nope") && err.contains("no such"), "{err}");
    for name in ["no-config", "no-weights", "truncated", "missing-tensor"] {
        std::fs::remove_dir_all(tmpdir(name)).unwrap();
    }
}

#[test]
fn tokenizer_and_eos_are_read() {
    let dir = copy_with_tokenizer(FAMILY, "tokenizer");
    let hf = load_hf_model(&dir).unwrap();
    let tok = hf.tokenizer.as_ref().expect("tokenizer.json is read");
    let ids = tok.encode("To be\n").unwrap();
    assert_eq!(ids.len(), 6);
    assert!(ids.iter().all(|&i| (3..99).contains(&i)), "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), "To be\n");
    assert_eq!(hf.eos_token_ids, vec![2]);
    // Stops after the end-of-sequence token: with every id a stop id, one token comes out.
    let stop: Vec<u32> = (0..hf.spec.config.vocab_size as u32).collect();
    let opts = SampleOptions { max_new_tokens: 5, temperature: 0.0, ..Default::default() };
    assert_eq!(generate_until(&hf.model, &ids, &opts, &stop, |_| {}).unwrap().len(), 1);
    assert_eq!(generate_until(&hf.model, &ids, &opts, &[], |_| {}).unwrap().len(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The logits of `model` on fixed ids.
fn probe(model: &HybridModel) -> Vec<f32> {
    let rows = vec![(3..40u32).collect::<Vec<_>>(), (50..87u32).collect()];
    logits_of(model, &rows).unwrap().to_vec().unwrap()
}

#[test]
fn fine_tuned_checkpoint_loads_back_bit_identically() {
    let dir = copy_with_tokenizer(FAMILY, "finetune");
    let hf = load_hf_model(&dir).unwrap();
    let before = probe(&hf.model);
    // A few AdamW steps on random ids.
    let params = hf.store.params();
    let mut opt =
        AdamW::new(params, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }).unwrap();
    let mut rng = moeba_tensor::Rng::new(7);
    for _ in 0..3 {
        let ids: Vec<u32> = (0..2 * 17).map(|_| 3 + (rng.next_u64() % 90) as u32).collect();
        let t = Tensor::from_vec(ids, (2, 17), &Device::Cpu).unwrap();
        let (x, y) = (
            t.narrow(1, 0, 16).unwrap().contiguous().unwrap(),
            t.narrow(1, 1, 16).unwrap().contiguous().unwrap(),
        );
        let out = hf.model.forward(&x, &ForwardOptions::default()).unwrap();
        let mut loss = HybridModel::lm_loss(&out.logits, &y).unwrap();
        if let Some(aux) = &out.aux_loss {
            loss = loss.add(aux).unwrap();
        }
        let grads = loss.backward().unwrap();
        opt.step(&grads, 1e-2, 1.0).unwrap();
    }
    let after = probe(&hf.model);
    assert_ne!(before, after, "the optimizer steps changed nothing");

    // Save as a moeba checkpoint of an HF fine-tuning run, load it back.
    let mut cfg = RunConfig::default();
    configure_run(&mut cfg, &dir, false).unwrap();
    cfg.validate().unwrap();
    let hcfg = cfg.model.to_hybrid(&cfg.trainer).unwrap();
    assert_eq!(hcfg.blocks.len(), hf.spec.config.blocks.len());
    let run = tmpdir("finetune-run");
    let ck = Checkpoint {
        config_toml: cfg.to_toml().unwrap(),
        model: hf.store.to_safetensors(None).unwrap(),
        optimizer: opt.state_to_safetensors().unwrap(),
        state: TrainState {
            step: 3,
            rng: [1, 2, 3, 4],
            data: Batcher::new(0).state(),
            tokens_seen: 0,
            elapsed_s: 0.0,
            val_loss: None,
            best_val_loss: None,
            balancing_bias: Vec::new(),
        },
    };
    let saved = Checkpointer::new(&run, 2).unwrap().save(&ck, false).unwrap();
    let loaded = load_run(&saved, false).unwrap();
    assert_eq!(loaded.model.config(), &hcfg);
    assert_eq!(probe(&loaded.model), after, "the reloaded fine-tuned model's logits differ");
    assert!(cfg.to_toml().unwrap().contains("hf_config"));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn trainer_starts_from_the_hf_weights() {
    let dir = copy_with_tokenizer(FAMILY, "trainer");
    let data = dir.join("data.txt");
    let text: String = (0..200).map(|i| format!("line {i}: to be or not to be\n")).collect();
    std::fs::write(&data, text).unwrap();
    let mut cfg = RunConfig::default();
    cfg.apply_overrides(&[
        "trainer.batch_size=2",
        "trainer.seq_len=16",
        "trainer.max_steps=2",
        "trainer.warmup_steps=0",
        "trainer.eval_every=2",
        "trainer.eval_steps=1",
        "trainer.learning_rate=1e-9",
        "trainer.min_lr=0.0",
    ])
    .unwrap();
    cfg.trainer.dataset = data.display().to_string();
    configure_run(&mut cfg, &dir, false).unwrap();
    cfg.validate().unwrap();
    let out = tmpdir("trainer-run");
    let summary =
        moeba_train::train(&cfg, &TrainOptions { out: out.clone(), resume: false, progress: false }, |_| {})
            .unwrap();
    assert_eq!(summary.steps, 2);
    assert!(summary.final_eval.is_some_and(|e| e.loss.is_finite()));
    // A learning rate of 1e-9 leaves the weights as loaded up to rounding: the run started from
    // the HF weights (a fresh init would differ completely).
    let loaded = load_run(&out, false).unwrap();
    let hf = load_hf_model(&dir).unwrap();
    let (a, b) = (probe(&loaded.model), probe(&hf.model));
    let n = a.len();
    let a = Tensor::from_vec(a, n, &Device::Cpu).unwrap();
    let b = Tensor::from_vec(b, n, &Device::Cpu).unwrap();
    let e = rel_err(&a, &b);
    assert!(e < 1e-5, "the run did not start from the HF weights: relative difference {e:.3e}");
    assert_eq!(loaded.tokenizer.vocab_size(), 99);

    // Without tokenizer.json, fine-tuning is refused with a message naming the file.
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = configure_run(&mut RunConfig::default(), &dir, false).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}
