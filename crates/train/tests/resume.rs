//! Resume is bit-exact: 2N steps straight and N steps + resume + N steps give identical
//! parameters, optimizer state, balancing biases and metrics, with MoE router jitter,
//! aux-loss-free bias balancing and gradient accumulation on.

mod common;

use common::{config, tmpdir, TINY_HYBRID};
use moeba_train::checkpoint::load_checkpoint;
use moeba_train::metrics::read_metrics;
use moeba_train::{load_run, train, train_with, RunControl, StepLog, TrainOptions};

const N: usize = 5;

fn overrides() -> Vec<String> {
    vec![
        format!("trainer.max_steps={}", 2 * N),
        "trainer.grad_accum_steps=2".into(),
        "trainer.batch_size=2".into(),
        "trainer.log_every=1".into(),
        "trainer.eval_every=4".into(),
        "trainer.warmup_steps=2".into(),
        "model.routing.jitter_noise=0.2".into(),
        "model.routing.bias_balancing_rate=0.01".into(),
        "model.moe_layers=[0, 1]".into(),
    ]
}

/// The metrics without the wall-clock fields.
fn timeless(logs: Vec<StepLog>) -> Vec<StepLog> {
    logs.into_iter().map(|l| StepLog { tokens_per_s: 0.0, elapsed_s: 0.0, ..l }).collect()
}

#[test]
fn resume_is_bit_exact() {
    let o = overrides();
    let refs: Vec<&str> = o.iter().map(String::as_str).collect();
    let cfg = config(TINY_HYBRID, &refs);

    let straight = tmpdir("resume-straight");
    let opts = TrainOptions { out: straight.clone(), resume: false, progress: false };
    let a = train(&cfg, &opts, |_| {}).unwrap();
    assert_eq!(a.steps, 2 * N);

    let split = tmpdir("resume-split");
    let opts = TrainOptions { out: split.clone(), resume: false, progress: false };
    let first =
        train_with(&cfg, &opts, &RunControl { stop_after: Some(N), ..Default::default() }, |_| {}).unwrap();
    assert_eq!(first.steps, N);
    let mut resumed_logs = Vec::new();
    let b = train(&cfg, &TrainOptions { resume: true, ..opts }, |l| resumed_logs.push(l.step)).unwrap();
    assert_eq!(b.steps, 2 * N);
    assert_eq!(resumed_logs, (N + 1..=2 * N).collect::<Vec<_>>(), "the resumed run starts after step {N}");

    // Parameters.
    let (ra, rb) = (load_run(&straight, false).unwrap(), load_run(&split, false).unwrap());
    assert_eq!(ra.step, 2 * N);
    assert_eq!(rb.step, 2 * N);
    let (pa, pb) = (ra.store.params(), rb.store.params());
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(x.name(), y.name());
        let (vx, vy) = (x.tensor().to_vec::<f32>().unwrap(), y.tensor().to_vec::<f32>().unwrap());
        assert!(
            vx.iter().zip(&vy).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{} differs after resume",
            x.name()
        );
    }
    // Optimizer state, RNG, data position and balancing biases.
    let (ca, cb) = (load_checkpoint(&a.checkpoint).unwrap(), load_checkpoint(&b.checkpoint).unwrap());
    assert_eq!(ca.model, cb.model);
    assert_eq!(ca.optimizer, cb.optimizer);
    assert_eq!(ca.state.rng, cb.state.rng);
    assert_eq!(ca.state.data, cb.state.data);
    assert_eq!(ca.state.tokens_seen, cb.state.tokens_seen);
    assert_eq!(ca.state.val_loss, cb.state.val_loss);
    assert_eq!(ca.state.best_val_loss, cb.state.best_val_loss);
    assert_eq!(ca.state.balancing_bias.len(), 2, "both MoE layers balance by bias");
    assert!(ca.state.balancing_bias.iter().any(|(_, b)| b.iter().any(|&x| x != 0.0)), "the bias moved");
    assert_eq!(ca.state.balancing_bias, cb.state.balancing_bias);
    for ((_, layer_a), (_, layer_b)) in ra.model.moe_layers().iter().zip(rb.model.moe_layers().iter()) {
        assert_eq!(layer_a.balancing_bias(), layer_b.balancing_bias());
    }

    // Metrics: every step logged once, identical apart from wall-clock fields.
    let ma = timeless(read_metrics(&straight.join("metrics.jsonl")).unwrap());
    let mb = timeless(read_metrics(&split.join("metrics.jsonl")).unwrap());
    assert_eq!(ma.iter().map(|l| l.step).collect::<Vec<_>>(), (1..=2 * N).collect::<Vec<_>>());
    assert_eq!(ma, mb);
    assert_eq!(a.final_eval, b.final_eval);

    // Resuming a finished run does nothing more; resuming where there is nothing fails clearly.
    let empty = tmpdir("resume-empty");
    let e = train(&cfg, &TrainOptions { out: empty.clone(), resume: true, progress: false }, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("resume") && e.contains("no checkpoint"), "{e}");
    for d in [straight, split, empty] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn resume_with_another_model_is_refused() {
    let cfg = config(TINY_HYBRID, &["trainer.max_steps=4", "trainer.eval_every=4"]);
    let dir = tmpdir("resume-mismatch");
    let opts = TrainOptions { out: dir.clone(), resume: false, progress: false };
    train_with(&cfg, &opts, &RunControl { stop_after: Some(2), ..Default::default() }, |_| {}).unwrap();
    let mut other = cfg.clone();
    other.set("model.hidden_size", "64").unwrap();
    let e = train(&other, &TrainOptions { resume: true, ..opts }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("step-000002") && e.contains("[model]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
