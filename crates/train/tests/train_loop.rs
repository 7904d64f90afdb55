//! The training loop end to end on small data: the loss falls, files are written, bad options
//! and bad checkpoints are refused with messages that name them.

use moeba_train::data::{ByteTokenizer, TokenDataset};
use moeba_train::{generate, load_run, train, ModelOptions, TrainError, TrainOptions};

fn tiny_opts() -> TrainOptions {
    TrainOptions {
        model: ModelOptions { context: 8, embed_dim: 8, hidden: 32, intermediate: 64, layers: 1 },
        max_steps: 120,
        batch_size: 32,
        learning_rate: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 10,
        eval_every: 60,
        eval_batches: 4,
        ..TrainOptions::default()
    }
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn loss_falls_and_run_reloads() {
    let text = moeba_train::data::TINY_SHAKESPEARE[..200_000].to_string();
    let data = TokenDataset::split(ByteTokenizer::encode(&text), 0.1);
    let dir = tmpdir("falls");
    let mut logs = Vec::new();
    let summary = train(&tiny_opts(), &data, &dir, |l| logs.push(l.clone())).unwrap();
    let vals: Vec<f64> = logs.iter().filter_map(|l| l.val_loss).collect();
    assert_eq!(vals.len(), 2, "{logs:?}");
    assert!(vals[1] < vals[0], "validation loss did not fall: {vals:?}");
    assert!(summary.final_val_loss < 3.3, "val loss {} (uniform is ln 256 = 5.55)", summary.final_val_loss);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), logs.len());
    assert!(metrics.lines().last().unwrap().contains("val_loss"));
    let (opts, _, model) = load_run(&dir).unwrap();
    assert_eq!(opts, tiny_opts());
    let a = generate(&model, "ROMEO:", 20, 0.0, 0).unwrap();
    assert_eq!(a, generate(&model, "ROMEO:", 20, 0.0, 0).unwrap(), "greedy decoding is deterministic");
    assert!(!a.is_empty());
    // A truncated checkpoint is refused with a message naming the file.
    let ckpt = dir.join("model.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_run(&dir).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nan_loss_stops_the_run_and_keeps_the_checkpoint() {
    let data =
        TokenDataset::split(ByteTokenizer::encode(&moeba_train::data::TINY_SHAKESPEARE[..50_000]), 0.1);
    let dir = tmpdir("nan");
    let mut opts = tiny_opts();
    opts.learning_rate = 1e30;
    opts.min_lr = 0.0;
    opts.warmup_steps = 0;
    opts.grad_clip = 0.0;
    opts.eval_every = 1;
    let err = train(&opts, &data, &dir, |_| {}).unwrap_err();
    match &err {
        TrainError::NonFinite { step, .. } => assert!(*step >= 2, "{err}"),
        TrainError::Tensor(e) => assert!(e.to_string().contains("non-finite"), "{err}"),
        other => panic!("unexpected error {other}"),
    }
    // The checkpoint written before the failure still loads.
    load_run(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_options_are_named() {
    let data = TokenDataset::split(ByteTokenizer::encode("abc"), 0.1);
    let dir = tmpdir("bad");
    let mut o = tiny_opts();
    o.batch_size = 0;
    assert!(train(&o, &data, &dir, |_| {}).unwrap_err().to_string().contains("batch_size"));
    let mut o = tiny_opts();
    o.learning_rate = -1.0;
    assert!(train(&o, &data, &dir, |_| {}).unwrap_err().to_string().contains("learning_rate"));
    let e = train(&tiny_opts(), &data, &dir, |_| {}).unwrap_err().to_string();
    assert!(e.contains("seq_len") || e.contains("tokens"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
