//! The training loop end to end on a tiny hybrid (Mamba + attention + MoE): the loss falls, the
//! run directory holds metrics, checkpoints and plots, the run reloads and generates; a
//! diverging run stops with an error naming the step and leaves the last checkpoint loadable.

mod common;

use common::{config, tmpdir, TINY_HYBRID};
use moeba_train::checkpoint::{load_checkpoint, Checkpointer};
use moeba_train::metrics::read_metrics;
use moeba_train::{
    generate, load_run, train, train_with, RunControl, SampleOptions, StepLog, TrainError, TrainOptions,
};

fn opts(out: &std::path::Path) -> TrainOptions {
    TrainOptions { out: out.to_path_buf(), resume: false, progress: false }
}

#[test]
fn tiny_hybrid_trains_writes_its_run_and_generates() {
    let cfg = config(TINY_HYBRID, &[]);
    let dir = tmpdir("loop");
    let mut logs: Vec<StepLog> = Vec::new();
    let summary = train(&cfg, &opts(&dir), |l| logs.push(l.clone())).unwrap();
    assert_eq!(summary.steps, 30);

    // Logged every 5 steps, evaluated at 15 and 30.
    let steps: Vec<usize> = logs.iter().map(|l| l.step).collect();
    assert_eq!(steps, vec![5, 10, 15, 20, 25, 30]);
    let vals: Vec<f64> = logs.iter().filter_map(|l| l.val_loss).collect();
    assert_eq!(vals.len(), 2, "{logs:?}");
    assert!(vals[1] < vals[0], "validation loss did not fall: {vals:?}");
    let uniform = (256f64).ln();
    assert!(vals[1] < uniform - 1.0, "val loss {} (uniform is ln 256 = {uniform:.2})", vals[1]);
    assert!(logs.last().unwrap().loss < logs[0].loss, "training loss did not fall: {logs:?}");
    for l in &logs {
        assert!(l.loss.is_finite() && l.lr > 0.0 && l.tokens_per_s > 0.0 && l.grad_norm > 0.0, "{l:?}");
        assert!(l.aux_loss > 0.0, "the MoE layer adds an aux loss: {l:?}");
        let bal = l.expert_balance.expect("an MoE model reports its expert balance");
        assert!((1.0..=4.0).contains(&bal), "{l:?}");
        assert_eq!(l.tokens, (l.step * 4 * 16) as u64);
    }
    let ev = summary.final_eval.unwrap();
    assert_eq!(Some(ev.loss), vals.last().copied());
    assert!((ev.ppl - ev.loss.exp()).abs() < 1e-9 * ev.ppl);
    assert!((ev.bpb - ev.loss / std::f64::consts::LN_2).abs() < 1e-12, "byte tokenizer: 1 byte per token");
    assert_eq!(summary.best_val_loss, Some(vals[0].min(vals[1])));
    assert!(summary.params.active < summary.params.total);

    // metrics.jsonl: one line per log, with the documented fields.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), logs.len());
    for key in ["\"step\"", "\"loss\"", "\"lr\"", "\"tokens_per_s\"", "\"aux_loss\"", "\"expert_balance\""] {
        assert!(text.lines().all(|l| l.contains(key)), "{key} missing in {text}");
    }
    assert!(text.lines().last().unwrap().contains("\"val_loss\""));
    assert_eq!(read_metrics(&dir.join("metrics.jsonl")).unwrap(), logs);

    // Checkpoints at the eval steps, best/, config, plots.
    let ckpts = Checkpointer::new(&dir, 3).unwrap();
    let latest = ckpts.latest().unwrap().unwrap();
    assert!(latest.ends_with("step-000030"), "{latest:?}");
    assert_eq!(summary.checkpoint, latest);
    assert!(dir.join("checkpoints/step-000015").is_dir());
    let best = ckpts.best().expect("a best checkpoint");
    assert_eq!(load_checkpoint(&best).unwrap().state.val_loss, summary.best_val_loss);
    assert!(dir.join("config.toml").is_file());
    for f in ["loss.png", "loss.svg", "experts.png", "experts.svg"] {
        let len = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }

    // The run reloads (newest checkpoint) and generates deterministically.
    let run = load_run(&dir, false).unwrap();
    assert_eq!(run.step, 30);
    assert_eq!(run.config, cfg);
    let greedy = SampleOptions { max_new_tokens: 24, temperature: 0.0, ..SampleOptions::default() };
    let mut streamed = String::new();
    let a = generate(&run.model, &run.tokenizer, "ROMEO:", &greedy, |s| streamed.push_str(s)).unwrap();
    assert_eq!(a, streamed, "the streamed pieces make up the returned text");
    let b = generate(&run.model, &run.tokenizer, "ROMEO:", &greedy, |_| {}).unwrap();
    assert_eq!(a, b, "greedy decoding is deterministic");
    assert!(!a.is_empty());
    // The reloaded model evaluates to the same validation loss the run reported.
    let data = moeba_train::data::Dataset::load("tinyshakespeare", &run.tokenizer, 0.1, 7).unwrap();
    let evals =
        moeba_train::data::eval_batches(&data.val, None, 4, 16, 2, &moeba_tensor::Device::Cpu).unwrap();
    let again = moeba_train::evaluate(&run.model, &evals, data.bytes_per_token).unwrap();
    assert_eq!(again.loss, ev.loss);

    // A fresh run into a directory with checkpoints is refused, naming the way out.
    let e = train(&cfg, &opts(&dir), |_| {}).unwrap_err().to_string();
    assert!(e.contains("already holds checkpoints") && e.contains("--resume"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn divergence_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let cfg = config(TINY_HYBRID, &["trainer.max_steps=12", "trainer.eval_every=12"]);
    let dir = tmpdir("nan");
    // Train 4 steps and stop as if interrupted: a checkpoint at step 4.
    let stop = RunControl { stop_after: Some(4), ..RunControl::default() };
    let s = train_with(&cfg, &opts(&dir), &stop, |_| {}).unwrap();
    assert_eq!(s.steps, 4);
    assert!(s.checkpoint.ends_with("step-000004"));
    // Continue with an absurd learning rate and no clipping: the loss blows up.
    let mut bad = cfg.clone();
    bad.apply_overrides(&[
        "trainer.learning_rate=1e30",
        "trainer.min_lr=1e30",
        "trainer.warmup_steps=0",
        "trainer.grad_clip=0",
        "trainer.weight_decay=0",
    ])
    .unwrap();
    let resume = TrainOptions { resume: true, ..opts(&dir) };
    let err = train(&bad, &resume, |_| {}).unwrap_err();
    let step = match &err {
        TrainError::NonFinite { step, loss } => {
            assert!(!loss.is_finite());
            *step
        }
        other => panic!("expected NonFinite, got {other}"),
    };
    assert!(step > 4, "diverged at step {step}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("at step {step}")) && msg.contains("HINT"), "{msg}");
    // The last good checkpoint is intact and loads with finite weights.
    let latest = Checkpointer::new(&dir, 3).unwrap().latest().unwrap().unwrap();
    let run = load_run(&latest, false).unwrap();
    assert!(run.step >= 4 && run.step < step, "checkpoint at {} (diverged at {step})", run.step);
    for p in run.store.params() {
        let v = p.tensor().to_vec_f64().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{} is not finite", p.name());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
