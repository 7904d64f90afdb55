//! `moeba train`: load the config, print the plan, train, print the summary.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use moeba_tensor::Device;
use moeba_train::inspect::{human_count, inspect, render_layers};
use moeba_train::{build_model, train, StepLog, TrainOptions};

use crate::configs;

/// One log line: step, loss, lr, throughput, aux loss, balance and, on evaluation steps, the
/// validation figures.
pub fn log_line(log: &StepLog) -> String {
    let mut s = format!(
        "step {:>6}  loss {:.4}  lr {:.2e}  {:>7.0} tok/s  |g| {:.3}",
        log.step, log.loss, log.lr, log.tokens_per_s, log.grad_norm
    );
    if log.aux_loss != 0.0 {
        s.push_str(&format!("  aux {:.4}", log.aux_loss));
    }
    if let Some(b) = log.expert_balance {
        s.push_str(&format!("  balance {b:.2}"));
    }
    if let Some(v) = log.val_loss {
        s.push_str(&format!("  val {v:.4}"));
        if let Some(bpb) = log.val_bpb {
            s.push_str(&format!(" ({bpb:.3} bpb)"));
        }
    }
    s.push_str(&format!("  {:.1}s", log.elapsed_s));
    s
}

/// Runs `moeba train`.
pub fn run(
    config: Option<&str>,
    out: Option<PathBuf>,
    set: &[String],
    resume: bool,
    no_progress: bool,
    hf: Option<&std::path::Path>,
) -> Result<()> {
    let mut loaded = configs::load(config, set)?;
    if let Some(dir) = hf {
        super::train_hf::configure(&mut loaded, dir, set)?;
    }
    let mut cfg = loaded.config;
    let out = out.unwrap_or_else(|| PathBuf::from(&cfg.trainer.output_dir));
    cfg.trainer.output_dir = out.display().to_string();
    let (m, t) = (&cfg.model, &cfg.trainer);
    println!("moeba train: {} → {}{}", loaded.source, out.display(), if resume { " (resuming)" } else { "" });
    // The trainer prints the config's warnings (and collapse warnings) itself, as they happen.
    let hc = m.to_hybrid(t).context("cannot build the model")?;
    {
        let (_store, model) = build_model(&hc, t.seed, &Device::Cpu).context("cannot build the model")?;
        let ins = inspect(&cfg, &model, m.max_seq_len).context("cannot inspect the model")?;
        println!("layers:");
        print!("{}", render_layers(&ins));
        println!(
            "parameters: {} total, {} active per token",
            human_count(ins.total_params),
            human_count(ins.active_params)
        );
    }
    println!(
        "data: {}, {} steps of {} × {} tokens{}, lr {:.1e} {:?}",
        t.dataset,
        t.max_steps,
        t.batch_size,
        t.seq_len,
        if t.grad_accum_steps > 1 {
            format!(" × {} accumulated", t.grad_accum_steps)
        } else {
            String::new()
        },
        t.learning_rate,
        t.schedule
    );
    let progress = !no_progress && std::io::stderr().is_terminal();
    let opts = TrainOptions { out: out.clone(), resume, progress };
    let summary = train(&cfg, &opts, |log| {
        // With a progress bar only the evaluations get a line; without one, every logged step.
        if !progress || log.val_loss.is_some() {
            println!("{}", log_line(log));
        }
    })
    .with_context(|| format!("training {} failed", loaded.source))?;
    println!(
        "done: {} steps in {:.1} s, {:.0} tokens/s",
        summary.steps, summary.seconds, summary.tokens_per_s
    );
    if let Some(e) = summary.final_eval {
        println!(
            "validation: loss {:.4} nats/token, perplexity {:.3}, {:.4} bits/byte{}",
            e.loss,
            e.ppl,
            e.bpb,
            summary.best_val_loss.map(|b| format!(" (best loss {b:.4})")).unwrap_or_default()
        );
    }
    println!(
        "parameters: {} total, {} active per token",
        human_count(summary.params.total),
        human_count(summary.params.active)
    );
    println!("run dir: {}", summary.run_dir.display());
    println!("checkpoint: {}", summary.checkpoint.display());
    Ok(())
}
