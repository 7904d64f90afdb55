//! Metrics: one [`StepLog`] per logged step, appended to `metrics.jsonl` and written as scalars
//! to TensorBoard event files (`tb/`), read back for plots.
//!
//! A non-finite number (a diverging loss, an infinite throughput) is written as JSON `null`
//! (JSON has no NaN) and read back as NaN.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::checkpoint::{write_atomic, CheckpointError};
use crate::tensorboard::{now_wall_time, EventWriter};

/// The metrics file of a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The TensorBoard folder of a run directory.
pub const TB_DIR: &str = "tb";

/// An f64 that may have been written as `null` (NaN or ±inf): read back as NaN.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    /// Optimizer steps done.
    pub step: usize,
    /// Training loss (cross-entropy, nats per token) of this step, averaged over micro-batches.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    /// Learning rate used.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    /// Training tokens per second since the previous log.
    #[serde(deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    /// The weighted MoE aux loss of this step (0 without MoE).
    #[serde(deserialize_with = "f64_or_nan")]
    pub aux_loss: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    /// Expert balance: max over MoE layers of (max expert load / mean load); 1 is perfect.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expert_balance: Option<f64>,
    /// Validation loss (nats per token), on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Validation perplexity, on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_ppl: Option<f64>,
    /// Validation bits per byte, on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_bpb: Option<f64>,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Seconds of training so far.
    #[serde(deserialize_with = "f64_or_nan")]
    pub elapsed_s: f64,
}

impl StepLog {
    /// The TensorBoard scalars of this line: `(tag, value)`, the optional ones when present.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut out = vec![
            ("train/loss", self.loss),
            ("train/lr", self.lr),
            ("train/tokens_per_s", self.tokens_per_s),
            ("train/aux_loss", self.aux_loss),
            ("train/grad_norm", self.grad_norm),
        ];
        let optional = [
            ("train/expert_balance", self.expert_balance),
            ("val/loss", self.val_loss),
            ("val/ppl", self.val_ppl),
            ("val/bpb", self.val_bpb),
        ];
        out.extend(optional.into_iter().filter_map(|(t, v)| v.map(|v| (t, v))));
        out
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io { path: path.display().to_string(), msg: e.to_string() }
}

/// Appends [`StepLog`]s to `<run>/metrics.jsonl` and to TensorBoard events under `<run>/tb/`.
pub struct MetricsWriter {
    jsonl_path: PathBuf,
    jsonl: BufWriter<std::fs::File>,
    tb: EventWriter,
}

impl std::fmt::Debug for MetricsWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsWriter").field("jsonl", &self.jsonl_path).field("tb", &self.tb.path()).finish()
    }
}

impl MetricsWriter {
    /// Opens the writers in `run_dir`. `resume_from_step = Some(s)` keeps the lines of
    /// `metrics.jsonl` up to step `s` (dropping any logged after the checkpoint being resumed);
    /// `None` starts a fresh file.
    ///
    /// Each call starts a new TensorBoard event file in `<run>/tb/`; TensorBoard shows the
    /// events of a resumed run after those of the earlier files (and, with its default
    /// `purge_orphaned_data`, drops the earlier ones past the step the run went back to).
    pub fn open(run_dir: &Path, resume_from_step: Option<usize>) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(run_dir).map_err(|e| io_err(run_dir, e))?;
        let jsonl_path = run_dir.join(METRICS_FILE);
        let file = match resume_from_step {
            None => std::fs::File::create(&jsonl_path).map_err(|e| io_err(&jsonl_path, e))?,
            Some(step) => {
                let kept = match std::fs::read_to_string(&jsonl_path) {
                    Ok(text) => keep_until(&text, step),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(io_err(&jsonl_path, e)),
                };
                write_atomic(&jsonl_path, kept.as_bytes()).map_err(|e| io_err(&jsonl_path, e))?;
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&jsonl_path)
                    .map_err(|e| io_err(&jsonl_path, e))?
            }
        };
        let tb_dir = run_dir.join(TB_DIR);
        let tb = EventWriter::create(&tb_dir).map_err(|e| io_err(&tb_dir, e))?;
        Ok(MetricsWriter { jsonl_path, jsonl: BufWriter::new(file), tb })
    }

    /// The `metrics.jsonl` file.
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl_path
    }

    /// The TensorBoard event file.
    pub fn tb_path(&self) -> &Path {
        self.tb.path()
    }

    /// Writes one log line and its scalars (`train/loss`, `train/lr`, `train/tokens_per_s`,
    /// `train/aux_loss`, `train/grad_norm`, `train/expert_balance`, `val/loss`, `val/ppl`, `val/bpb`).
    ///
    /// Both files are flushed, so a crash loses nothing logged before it.
    pub fn log(&mut self, log: &StepLog) -> Result<(), CheckpointError> {
        let line = serde_json::to_string(log).map_err(|e| io_err(&self.jsonl_path, e))?;
        self.jsonl
            .write_all(line.as_bytes())
            .and_then(|_| self.jsonl.write_all(b"\n"))
            .map_err(|e| io_err(&self.jsonl_path, e))?;
        let now = now_wall_time();
        for (tag, value) in log.scalars() {
            self.tb.add_scalar(tag, value, log.step, now).map_err(|e| io_err(self.tb.path(), e))?;
        }
        self.flush()
    }

    /// Writes a scalar under any tag (for example per-expert usage `moe/layer3/expert5`).
    pub fn scalar(&mut self, tag: &str, value: f64, step: usize) -> Result<(), CheckpointError> {
        self.tb.add_scalar(tag, value, step, now_wall_time()).map_err(|e| io_err(self.tb.path(), e))
    }

    /// Flushes both files.
    pub fn flush(&mut self) -> Result<(), CheckpointError> {
        self.jsonl.flush().map_err(|e| io_err(&self.jsonl_path, e))?;
        self.tb.flush().map_err(|e| io_err(self.tb.path(), e))
    }
}

/// The lines of a `metrics.jsonl` text whose step is at most `step` (lines that do not parse,
/// such as a last line cut by a crash, are dropped), each ending in a newline.
fn keep_until(text: &str, step: usize) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if serde_json::from_str::<StepLog>(line).is_ok_and(|l| l.step <= step) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Reads `metrics.jsonl`; errors name the file and line.
///
/// A last line without its newline that does not parse (a writer interrupted mid-line) is
/// skipped; any other bad line is an error.
pub fn read_metrics(path: &Path) -> Result<Vec<StepLog>, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepLog>(line) {
            Ok(l) => out.push(l),
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => {
                return Err(CheckpointError::Invalid {
                    path: format!("{}:{}", path.display(), i + 1),
                    msg: format!("not a metrics line: {e}"),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::read_scalars;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moeba-metrics-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn log(step: usize) -> StepLog {
        StepLog {
            step,
            loss: 5.0 / (step as f64 + 1.0),
            lr: 1e-3,
            tokens_per_s: 1234.5,
            aux_loss: 0.01,
            grad_norm: 0.7,
            expert_balance: step.is_multiple_of(2).then_some(1.25),
            val_loss: step.is_multiple_of(4).then_some(2.0),
            val_ppl: step.is_multiple_of(4).then_some(2f64.exp()),
            val_bpb: step.is_multiple_of(4).then_some(2.0 / std::f64::consts::LN_2),
            tokens: 64 * step as u64,
            elapsed_s: 0.1 * step as f64,
        }
    }

    #[test]
    fn writes_reads_and_resumes() {
        let dir = tmp("resume");
        let mut w = MetricsWriter::open(&dir, None).unwrap();
        for s in 1..=8 {
            w.log(&log(s)).unwrap();
        }
        w.scalar("moe/layer1/expert3", 0.25, 8).unwrap();
        w.flush().unwrap();
        let logs = read_metrics(&dir.join(METRICS_FILE)).unwrap();
        assert_eq!(logs, (1..=8).map(log).collect::<Vec<_>>());
        // The optional fields are left out of lines that do not have them.
        let text = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        assert!(!text.lines().next().unwrap().contains("val_loss"));

        let tb = read_scalars(w.tb_path()).unwrap();
        let tb1 = w.tb_path().to_path_buf();
        let at = |tag: &str, step: i64| tb.iter().find(|(t, s, _)| t == tag && *s == step).map(|x| x.2);
        assert_eq!(at("train/loss", 3), Some((5.0f64 / 4.0) as f32));
        assert_eq!(at("val/loss", 4), Some(2.0));
        assert_eq!(at("val/loss", 3), None);
        assert_eq!(at("train/expert_balance", 2), Some(1.25));
        assert_eq!(at("moe/layer1/expert3", 8), Some(0.25));
        drop(w);

        // Resume from step 5: lines 6..8 go, new ones follow; a new event file is started.
        let mut w = MetricsWriter::open(&dir, Some(5)).unwrap();
        assert_ne!(w.tb_path(), tb1);
        w.log(&log(6)).unwrap();
        let logs = read_metrics(&dir.join(METRICS_FILE)).unwrap();
        assert_eq!(logs.iter().map(|l| l.step).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
        drop(w);

        // A fresh start truncates.
        let mut w = MetricsWriter::open(&dir, None).unwrap();
        w.log(&log(1)).unwrap();
        assert_eq!(read_metrics(&dir.join(METRICS_FILE)).unwrap().len(), 1);
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_values_read_back_as_nan() {
        let dir = tmp("nan");
        let mut w = MetricsWriter::open(&dir, None).unwrap();
        let mut l = log(1);
        l.loss = f64::NAN;
        l.tokens_per_s = f64::INFINITY;
        w.log(&l).unwrap();
        drop(w);
        let back = read_metrics(&dir.join(METRICS_FILE)).unwrap();
        assert!(back[0].loss.is_nan());
        assert!(back[0].tokens_per_s.is_nan());
        assert_eq!(back[0].lr, l.lr);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_lines() {
        let dir = tmp("bad");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(METRICS_FILE);
        let good = serde_json::to_string(&log(1)).unwrap();
        // A cut-off last line is skipped.
        std::fs::write(&p, format!("{good}\n{}", &good[..good.len() / 2])).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 1);
        // A bad complete line is an error naming the file and the line.
        std::fs::write(&p, format!("{good}\n{{\"step\": \"x\"}}\n{good}\n")).unwrap();
        let err = read_metrics(&p).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:2"), "{err}");
        // Resuming drops the bad line and keeps the good ones up to the step.
        let mut w = MetricsWriter::open(&dir, Some(1)).unwrap();
        w.flush().unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 2);
        drop(w);
        assert!(read_metrics(&dir.join("missing.jsonl")).unwrap_err().to_string().contains("missing.jsonl"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
