//! The `expert-patterns` lab: which tokens go to which expert.
//!
//! It trains a small MoE language model (laid out like moeba's default hybrid, see
//! [`SmallMoe::run_config`]) on
//! tiny Shakespeare — or on the arithmetic set with `--set dataset=arithmetic` — or loads a
//! trained checkpoint (`--set checkpoint=DIR`), routes held-out tokens through it, and measures per
//! MoE layer: each expert's share of the tokens (first choice), the router entropy, where each
//! token class (letters, digits, whitespace, punctuation, operators, …) and each of the most
//! frequent tokens goes, the top tokens per expert, and which experts specialised and how purely.
//! On a data set with tasks (arithmetic: `+` and `-` problems) it also measures how cleanly the
//! tasks separate, on the operator tokens and on the positions whose prediction depends on the
//! operator (the `=` and the result).
//!
//! Definitions used in the report:
//! - **purity** of an expert: the share of its tokens that belong to its most over-represented
//!   class (the class with the largest odds ratio, see below);
//! - **odds ratio** of class `c` in expert `e`: `(p / (1 - p)) / (b / (1 - b))` with `p` the
//!   share of `c` among `e`'s tokens and `b` the share of `c` among all tokens; an expert
//!   **specialised** when its best odds ratio is at least [`SPECIALISED_ODDS_RATIO`] and that
//!   class is at least [`SPECIALISED_PURITY`] of its tokens (classes that reach that purity are
//!   preferred when picking an expert's best class);
//! - **task purity** of a set of positions: `Σ_e max_task n(e, task) / Σ n` (clustering purity of
//!   the experts with respect to the task labels): 1 when every expert serves one task only, the
//!   majority task's share (≈ 0.5) when routing ignores the task.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use moeba_nn::moe::MoeContext;
use moeba_nn::{ForwardOptions, Recompute};
use moeba_tensor::{Device, Tensor};
use moeba_train::config::{MixerKind, ModelConfig, RoutingConfig, RoutingStrategyKind, TrainerConfig};
use moeba_train::data::Dataset;
use moeba_train::experts::{task_name, ExpertReport, ReportBuilder, TEXT_CLASSES};
use moeba_train::{load_run, train_with, LoadedRun, RunConfig, RunControl, TrainOptions, TrainSummary};
use serde_json::{json, Value};

use crate::plot::{plot_heatmap, Heatmap};
use crate::report::md_table;
use crate::{report, LabError, LabOptions, LabRun, Report, Result};

/// The lab's name.
pub const LAB: &str = "expert-patterns";

/// The `--set` keys of this lab.
pub const SETTINGS: [&str; 11] = [
    "checkpoint",
    "dataset",
    "steps",
    "layers",
    "hidden",
    "experts",
    "experts_per_tok",
    "load_balance_alpha",
    "tokens",
    "frequent",
    "seed",
];

/// The odds ratio from which an expert counts as specialised on a class.
pub const SPECIALISED_ODDS_RATIO: f64 = 4.0;

/// The least share of an expert's tokens its class must have for the expert to count as
/// specialised on it (a rare class that one expert takes whole is not what the expert does).
pub const SPECIALISED_PURITY: f64 = 0.1;

/// Classes (or tokens) rarer than this many analysed tokens are not considered for an expert's
/// specialisation (too few to say anything).
const MIN_CLASS_TOKENS: usize = 20;

/// The sizes of the small MoE language model the labs train.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SmallMoe {
    /// Data set spec (`tinyshakespeare`, `arithmetic`).
    pub dataset: String,
    /// Blocks (each attention + MoE).
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub experts_per_tok: usize,
    /// Weight of the Switch load-balancing loss.
    pub load_balance_alpha: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequence length.
    pub seq_len: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Seed.
    pub seed: u64,
}

impl SmallMoe {
    /// The quick (`--quick`) or full sizes.
    pub fn new(quick: bool) -> Self {
        if quick {
            SmallMoe {
                dataset: "tinyshakespeare".into(),
                layers: 2,
                hidden: 32,
                experts: 4,
                experts_per_tok: 1,
                load_balance_alpha: 0.01,
                steps: 30,
                seq_len: 32,
                batch: 4,
                seed: 1337,
            }
        } else {
            SmallMoe {
                dataset: "tinyshakespeare".into(),
                layers: 4,
                hidden: 64,
                experts: 8,
                experts_per_tok: 1,
                load_balance_alpha: 0.01,
                steps: 300,
                seq_len: 128,
                batch: 8,
                seed: 1337,
            }
        }
    }

    /// The run config, laid out like moeba's default model (`configs/tiny-hybrid.toml`): Mamba
    /// mixers with one attention layer in the middle, MoE feed-forwards in the odd layers (every
    /// layer when there are fewer than 4) and dense SwiGLU MLPs elsewhere; top-k softmax routing
    /// (weights renormalised for k > 1; for k = 1 the output is scaled by the router
    /// probability, Switch style, so the router learns from the language-model loss), byte
    /// tokenizer, AdamW with warmup and cosine decay, evaluation four times per run.
    pub fn run_config(&self) -> RunConfig {
        let heads = if self.hidden.is_multiple_of(4) { 4 } else { 1 };
        let n = self.layers;
        let mixers =
            (0..n).map(|i| if i == n / 2 { MixerKind::Attention } else { MixerKind::Mamba }).collect();
        let moe_layers = if n >= 4 { (0..n).filter(|i| i % 2 == 1).collect() } else { (0..n).collect() };
        let model = ModelConfig {
            vocab_size: 256,
            hidden_size: self.hidden,
            num_layers: n,
            max_seq_len: self.seq_len,
            tie_embeddings: true,
            layer_mixers: Some(mixers),
            num_heads: heads,
            kv_heads: heads,
            intermediate_size: 3 * self.hidden,
            num_experts: self.experts,
            experts_per_tok: self.experts_per_tok,
            moe_intermediate_size: Some((3 * self.hidden).div_ceil(2)),
            moe_layers: Some(moe_layers),
            routing: RoutingConfig {
                strategy: RoutingStrategyKind::Topk,
                normalize: self.experts_per_tok > 1,
                ..RoutingConfig::default()
            },
            ..ModelConfig::default()
        };
        let trainer = TrainerConfig {
            dataset: self.dataset.clone(),
            seq_len: self.seq_len,
            batch_size: self.batch,
            learning_rate: 3e-3,
            min_lr: 3e-4,
            warmup_steps: (self.steps / 10).max(1),
            max_steps: self.steps,
            eval_every: (self.steps / 4).max(1),
            eval_steps: if self.seq_len <= 32 { 2 } else { 8 },
            save_every: 0,
            keep_last: 1,
            log_every: (self.steps / 200).max(1),
            load_balance_alpha: self.load_balance_alpha,
            router_z_loss_alpha: 0.001,
            seed: self.seed,
            ..TrainerConfig::default()
        };
        RunConfig { model, trainer }
    }
}

/// Trains `cfg` into `dir` (emptied first: the lab owns it), with the lab's progress setting.
pub(crate) fn train_into(cfg: &RunConfig, dir: &Path, progress: bool) -> Result<TrainSummary> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| LabError::Io { path: dir.to_path_buf(), source })?;
    }
    let opts = TrainOptions { out: dir.to_path_buf(), resume: false, progress };
    Ok(train_with(cfg, &opts, &RunControl::default(), |_| {})?)
}

/// What the routing of one MoE layer looked like, beyond moeba-train's [`ExpertReport`].
#[derive(Debug, Clone, Default)]
struct LayerTally {
    /// Token id → first choices per expert.
    tokens: HashMap<u32, Vec<u64>>,
    /// Per task: first choices per expert of the answer positions (`=` and the result).
    answer: Vec<Vec<u64>>,
}

/// Routing statistics of a model over a token stream.
struct Analysis {
    report: ExpertReport,
    /// Block index → tally.
    tallies: Vec<(usize, LayerTally)>,
    /// Analysed tokens' frequency, most frequent first.
    frequency: Vec<(u32, usize)>,
    /// Number of tasks (0 for plain text).
    tasks: usize,
}

/// Per position: `Some(task)` when the position is part of the answer of an arithmetic line
/// (the `=` and every character after it up to the newline), else `None`.
fn answer_positions(texts: &[String], tasks: Option<&[u8]>) -> Vec<Option<u8>> {
    let Some(tasks) = tasks else { return vec![None; texts.len()] };
    let mut in_answer = false;
    texts
        .iter()
        .zip(tasks)
        .map(|(t, &task)| {
            if t.contains('\n') {
                in_answer = false;
                None
            } else {
                if t.contains('=') {
                    in_answer = true;
                }
                in_answer.then_some(task)
            }
        })
        .collect()
}

/// Routes the first `max_tokens` validation tokens of `data` through `run`'s model.
fn analyse(run: &LoadedRun, data: &Dataset, max_tokens: usize) -> Result<Analysis> {
    let model = &run.model;
    let moe_layers: Vec<(usize, usize)> =
        model.moe_layers().iter().map(|(i, l)| (*i, l.config().num_experts)).collect();
    if moe_layers.is_empty() {
        return Err(LabError::Invalid(format!(
            "lab `{LAB}`: --set checkpoint={}: the model has no MoE layers (model.num_experts = {}), so \
             there are no experts to study; train a config with MoE layers (e.g. configs/moe-transformer.toml)",
            run.checkpoint.display(),
            run.config.model.num_experts
        )));
    }
    let n = data.val.len().min(max_tokens);
    if n == 0 {
        return Err(LabError::Invalid(format!(
            "lab `{LAB}`: `{}` has no validation tokens to route (or --set tokens=0)",
            data.name
        )));
    }
    let tokens = &data.val[..n];
    let tasks: Option<&[u8]> = data.val_tasks.as_deref().filter(|t| t.len() >= n).map(|t| &t[..n]);
    let num_tasks = tasks.map_or(0, |t| t.iter().map(|&x| x as usize + 1).max().unwrap_or(0));
    let text = |id: u32| run.tokenizer.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"));
    let texts: Vec<String> = tokens.iter().map(|&id| text(id)).collect();
    let answers = answer_positions(&texts, tasks);

    let t = &run.config.trainer;
    let seq = t.seq_len.min(run.config.model.max_seq_len).max(1);
    let rows_per_batch = t.batch_size.max(1);
    let mut builder = ReportBuilder::new(&data.name);
    let mut tallies: Vec<(usize, LayerTally)> = moe_layers
        .iter()
        .map(|&(i, e)| (i, LayerTally { tokens: HashMap::new(), answer: vec![vec![0; e]; num_tasks] }))
        .collect();
    let mut batches: Vec<(usize, usize, usize)> = Vec::new();
    let full_rows = n / seq;
    let mut r = 0;
    while r < full_rows {
        let rows = rows_per_batch.min(full_rows - r);
        batches.push((r * seq, rows, seq));
        r += rows;
    }
    if !n.is_multiple_of(seq) {
        batches.push((full_rows * seq, 1, n % seq));
    }
    let device = Device::Cpu;
    let _guard = moeba_autograd::no_grad();
    for (start, rows, len) in batches {
        let count = rows * len;
        let ids_v = tokens[start..start + count].to_vec();
        let ids = Tensor::from_vec(ids_v.clone(), (rows, len), &device)?;
        let task_v: Option<Vec<u32>> =
            tasks.map(|t| t[start..start + count].iter().map(|&x| u32::from(x)).collect());
        let mut ctx = MoeContext::default().with_causal(true);
        if let Some(tv) = &task_v {
            ctx = ctx.with_task_ids(Tensor::from_vec(tv.clone(), (rows, len), &device)?);
        }
        let out = model.forward(&ids, &ForwardOptions { recompute: Recompute::None, moe: ctx })?;
        builder.add_tokens(count);
        for (layer, stats) in &out.routing {
            builder.add_stats(*layer, &stats.counts, stats.entropy, count);
        }
        for (layer, assign) in &out.assignments {
            let e = moe_layers.iter().find(|(i, _)| i == layer).map_or(0, |(_, e)| *e);
            let first = moeba_train::experts::first_choice(assign, count)?;
            builder.add_assignments(*layer, e, &first, &ids_v, task_v.as_deref(), &text)?;
            if let Some((_, tally)) = tallies.iter_mut().find(|(i, _)| i == layer) {
                for (j, (&ex, &id)) in first.iter().zip(&ids_v).enumerate() {
                    let ex = ex as usize;
                    let row = tally.tokens.entry(id).or_insert_with(|| vec![0; e]);
                    if ex < row.len() {
                        row[ex] += 1;
                    }
                    if let Some(task) = answers[start + j] {
                        if let Some(a) = tally.answer.get_mut(task as usize) {
                            if ex < a.len() {
                                a[ex] += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    let report = builder.finish(&text);
    let mut freq: HashMap<u32, usize> = HashMap::new();
    for &id in tokens {
        *freq.entry(id).or_insert(0) += 1;
    }
    let mut frequency: Vec<(u32, usize)> = freq.into_iter().collect();
    frequency.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(Analysis { report, tallies, frequency, tasks: num_tasks })
}

fn shares(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| if total > 0 { c as f64 / total as f64 } else { 0.0 }).collect()
}

/// Entropy (nats) of a distribution given as shares.
fn entropy(p: &[f64]) -> f64 {
    p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

/// How cleanly tasks separate over a set of positions: per task its counts per expert.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSeparation {
    /// Positions counted per task.
    pub positions: Vec<u64>,
    /// Task purity `Σ_e max_t n(e, t) / Σ n` (1 = each expert serves one task).
    pub purity: f64,
    /// The purity routing that ignores the task would get: the majority task's share.
    pub baseline: f64,
    /// Per task, its favourite expert and the share of its positions that go there.
    pub favourites: Vec<(usize, f64)>,
}

impl TaskSeparation {
    /// From per-task counts per expert; `None` when fewer than two tasks have positions.
    pub fn from_counts(counts: &[Vec<u64>]) -> Option<Self> {
        let positions: Vec<u64> = counts.iter().map(|c| c.iter().sum()).collect();
        let total: u64 = positions.iter().sum();
        if positions.iter().filter(|&&p| p > 0).count() < 2 {
            return None;
        }
        let experts = counts.iter().map(Vec::len).max().unwrap_or(0);
        let majority: u64 = (0..experts)
            .map(|e| counts.iter().map(|c| c.get(e).copied().unwrap_or(0)).max().unwrap_or(0))
            .sum();
        let favourites = counts
            .iter()
            .map(|c| {
                let s = shares(c);
                s.iter().enumerate().fold((0, 0.0), |best, (e, &v)| if v > best.1 { (e, v) } else { best })
            })
            .collect();
        Some(TaskSeparation {
            purity: majority as f64 / total as f64,
            baseline: *positions.iter().max().unwrap_or(&0) as f64 / total as f64,
            positions,
            favourites,
        })
    }

    /// Whether the tasks' favourite experts all differ.
    pub fn separated(&self) -> bool {
        let mut seen: Vec<usize> = self.favourites.iter().map(|f| f.0).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len() == self.favourites.len()
    }

    fn to_json(&self, names: &[String]) -> Value {
        json!({
            "positions": self.positions,
            "task_purity": self.purity,
            "baseline": self.baseline,
            "favourites": self.favourites.iter().zip(names).map(|((e, s), n)| json!({"task": n, "expert": e, "share": s})).collect::<Vec<_>>(),
            "separated": self.separated(),
        })
    }
}

/// An expert's specialisation: its most over-represented class (or frequent token).
#[derive(Debug, Clone, PartialEq)]
struct Specialisation {
    expert: usize,
    usage: f64,
    class: String,
    purity: f64,
    base: f64,
    odds_ratio: f64,
    /// Share of the class's tokens that this expert takes.
    class_share: f64,
}

impl Specialisation {
    fn specialised(&self) -> bool {
        self.odds_ratio >= SPECIALISED_ODDS_RATIO && self.purity >= SPECIALISED_PURITY
    }
}

fn odds_ratio(p: f64, b: f64) -> f64 {
    let odds = |x: f64| x / (1.0 - x).max(1e-12);
    if b <= 0.0 {
        return 0.0;
    }
    odds(p.min(1.0)) / odds(b)
}

/// Everything measured about one layer.
struct LayerResult {
    layer: usize,
    usage: Vec<f64>,
    router_entropy: Option<f64>,
    /// Rows of the class heatmap: (label, tokens, share per expert).
    rows: Vec<(String, usize, Vec<f64>)>,
    frequent: Vec<(String, usize, Vec<f64>)>,
    mutual_information_bits: f64,
    experts: Vec<Specialisation>,
    top_tokens: Vec<Vec<(String, usize)>>,
    operator: Option<TaskSeparation>,
    answer: Option<TaskSeparation>,
    lines: Option<TaskSeparation>,
}

fn layer_results(
    a: &Analysis,
    text: &dyn Fn(u32) -> String,
    frequent: usize,
    dataset: &str,
) -> Vec<LayerResult> {
    let total = a.report.tokens.max(1) as f64;
    a.report
        .layers
        .iter()
        .map(|l| {
            let e = l.usage.len();
            let tally = a.tallies.iter().find(|(i, _)| *i == l.layer).map(|(_, t)| t);
            // Text classes (those that split the tokens) with their counts per expert.
            let class_counts: Vec<(String, usize, Vec<f64>)> = l
                .classes
                .iter()
                .filter(|(name, _, _)| TEXT_CLASSES.contains(&name.as_str()))
                .map(|(name, c, v)| (class_label(name), *c, v.clone()))
                .collect();
            let freq_rows: Vec<(String, usize, Vec<f64>)> = a
                .frequency
                .iter()
                .take(frequent)
                .map(|&(id, n)| {
                    let counts = tally.and_then(|t| t.tokens.get(&id)).cloned().unwrap_or_else(|| vec![0; e]);
                    (format!("{:?}", text(id)), n, shares(&counts))
                })
                .collect();
            // Mutual information between expert and text class, in bits.
            let mut mi = 0.0;
            for (_, count, sh) in &class_counts {
                let pc = *count as f64 / total;
                for (ex, &s) in sh.iter().enumerate() {
                    let joint = pc * s;
                    let pe = l.usage.get(ex).copied().unwrap_or(0.0);
                    if joint > 0.0 && pe > 0.0 {
                        mi += joint * (joint / (pc * pe)).log2();
                    }
                }
            }
            // Per expert: its most over-represented class or frequent token.
            let candidates: Vec<&(String, usize, Vec<f64>)> = class_counts
                .iter()
                .chain(freq_rows.iter())
                .filter(|(name, count, _)| *count >= MIN_CLASS_TOKENS && name != "other")
                .collect();
            let experts = (0..e)
                .map(|ex| {
                    let usage = l.usage[ex];
                    let n_e = usage * total;
                    let mut best = Specialisation {
                        expert: ex,
                        usage,
                        class: "none".into(),
                        purity: 0.0,
                        base: 0.0,
                        odds_ratio: 0.0,
                        class_share: 0.0,
                    };
                    if n_e > 0.0 {
                        for (name, count, sh) in &candidates {
                            let in_e = sh.get(ex).copied().unwrap_or(0.0) * *count as f64;
                            let p = in_e / n_e;
                            let b = *count as f64 / total;
                            let or = odds_ratio(p, b);
                            let key = (p >= SPECIALISED_PURITY, or);
                            if key > (best.purity >= SPECIALISED_PURITY, best.odds_ratio) {
                                best = Specialisation {
                                    expert: ex,
                                    usage,
                                    class: name.clone(),
                                    purity: p,
                                    base: b,
                                    odds_ratio: or,
                                    class_share: sh.get(ex).copied().unwrap_or(0.0),
                                };
                            }
                        }
                    }
                    best
                })
                .collect();
            let class_of = |name: &str| l.classes.iter().find(|(n, _, _)| n == name);
            let counts_of = |name: &str| -> Vec<u64> {
                class_of(name).map_or_else(
                    || vec![0; e],
                    |(_, c, s)| s.iter().map(|&x| (x * *c as f64).round() as u64).collect(),
                )
            };
            let operator = TaskSeparation::from_counts(&[counts_of("+"), counts_of("-")]);
            let lines = if a.tasks >= 2 {
                TaskSeparation::from_counts(
                    &(0..a.tasks).map(|t| counts_of(&task_name(dataset, t as u32))).collect::<Vec<_>>(),
                )
            } else {
                None
            };
            let answer = tally.and_then(|t| TaskSeparation::from_counts(&t.answer));
            let mut rows = class_counts.clone();
            if let Some(t) = tally {
                for (task, c) in t.answer.iter().enumerate() {
                    let n: u64 = c.iter().sum();
                    if n > 0 {
                        rows.push((
                            format!("{} answer", task_name(dataset, task as u32)),
                            n as usize,
                            shares(c),
                        ));
                    }
                }
            }
            LayerResult {
                layer: l.layer,
                usage: l.usage.clone(),
                router_entropy: l.entropy,
                rows,
                frequent: freq_rows,
                mutual_information_bits: mi,
                experts,
                top_tokens: l.top_tokens.clone(),
                operator,
                answer,
                lines,
            }
        })
        .collect()
}

/// How a text class is shown: the operators are named as such (a lone `-` in plain text is a
/// hyphen or a dash, which moeba-train's classes count as the operator).
fn class_label(name: &str) -> String {
    match name {
        "+" | "-" | "=" => format!("operator {name}"),
        "- (sign)" => "sign -".into(),
        other => other.into(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Runs the lab.
pub fn run(opts: &LabOptions) -> Result<LabRun> {
    opts.check_keys(LAB, &SETTINGS)?;
    let defaults = SmallMoe::new(opts.quick);
    let checkpoint: String = opts.get("checkpoint", String::new())?;
    let dataset_set: Option<String> =
        opts.overrides.iter().rev().find(|(k, _)| k == "dataset").map(|(_, v)| v.trim().to_string());
    let mut small = SmallMoe {
        dataset: dataset_set.clone().unwrap_or_else(|| defaults.dataset.clone()),
        layers: opts.get("layers", defaults.layers)?,
        hidden: opts.get("hidden", defaults.hidden)?,
        experts: opts.get("experts", defaults.experts)?,
        experts_per_tok: opts.get("experts_per_tok", defaults.experts_per_tok)?,
        load_balance_alpha: opts.get("load_balance_alpha", defaults.load_balance_alpha)?,
        steps: opts.get("steps", defaults.steps)?,
        seed: opts.get("seed", defaults.seed)?,
        ..defaults.clone()
    };
    if small.dataset == "arithmetic" {
        // Lines are ~9 bytes: a context of 64 holds several problems.
        small.seq_len = small.seq_len.min(64);
    }
    let max_tokens: usize = opts.get("tokens", if opts.quick { 4096 } else { 65536 })?;
    let frequent: usize = opts.get("frequent", 12)?;
    for (key, v) in [("layers", small.layers), ("experts", small.experts), ("steps", small.steps)] {
        if v == 0 && checkpoint.is_empty() {
            return Err(LabError::Invalid(format!("lab `{LAB}`: --set {key}=0: must be at least 1")));
        }
    }
    std::fs::create_dir_all(&opts.out).map_err(|source| LabError::Io { path: opts.out.clone(), source })?;

    // 1. The model: a checkpoint, or a small MoE trained now.
    let (run, training, source) = if checkpoint.is_empty() {
        let cfg = small.run_config();
        let dir = opts.out.join("train");
        let summary = train_into(&cfg, &dir, opts.progress)?;
        let run = load_run(&dir, false)?;
        (run, Some(summary), "trained".to_string())
    } else {
        let run = load_run(Path::new(&checkpoint), true)?;
        (run, None, format!("checkpoint {checkpoint}"))
    };
    if run.model.moe_layers().is_empty() {
        return Err(LabError::Invalid(format!(
            "lab `{LAB}`: --set checkpoint={checkpoint}: the model in {} has no MoE layers (model.num_experts = \
             {}), so there are no experts to study; train a config with MoE layers (e.g. \
             configs/moe-transformer.toml)",
            run.checkpoint.display(),
            run.config.model.num_experts
        )));
    }
    let dataset = dataset_set.unwrap_or_else(|| run.config.trainer.dataset.clone());
    let data =
        Dataset::load(&dataset, &run.tokenizer, run.config.trainer.val_fraction, run.config.trainer.seed)
            .map_err(|e| LabError::Invalid(format!("lab `{LAB}`: --set dataset={dataset}: {e}")))?;

    // 2. Route held-out tokens.
    let started = std::time::Instant::now();
    let analysis = analyse(&run, &data, max_tokens)?;
    let route_seconds = started.elapsed().as_secs_f64();
    let text = |id: u32| run.tokenizer.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"));
    let layers = layer_results(&analysis, &text, frequent, &data.name);

    // 3. Plots.
    let mut plots: Vec<PathBuf> = Vec::new();
    let experts = layers.iter().map(|l| l.usage.len()).max().unwrap_or(0);
    let cols: Vec<String> = (0..experts).map(|e| format!("e{e}")).collect();
    let usage_map = Heatmap {
        title: format!("expert usage per layer (first choice, {} tokens)", analysis.report.tokens),
        rows: layers.iter().map(|l| format!("layer {}", l.layer)).collect(),
        cols: cols.clone(),
        values: layers
            .iter()
            .map(|l| {
                let mut v = l.usage.clone();
                v.resize(experts, 0.0);
                v
            })
            .collect(),
    };
    plots.extend(plot_heatmap(&usage_map, &opts.out, "usage")?);
    let mut figures =
        vec![("Expert usage per MoE layer (share of first choices)".to_string(), "usage.png".into())];
    for l in &layers {
        let rows: Vec<&(String, usize, Vec<f64>)> = l.rows.iter().chain(l.frequent.iter()).collect();
        let map = Heatmap {
            title: format!("layer {}: where each token class / frequent token goes (rows sum to 1)", l.layer),
            rows: rows.iter().map(|(n, c, _)| format!("{n} ({c})")).collect(),
            cols: (0..l.usage.len()).map(|e| format!("e{e}")).collect(),
            values: rows.iter().map(|(_, _, v)| v.clone()).collect(),
        };
        let stem = format!("classes_layer{}", l.layer);
        plots.extend(plot_heatmap(&map, &opts.out, &stem)?);
        figures.push((
            format!(
                "Layer {}: share of each token class and of the {} most frequent tokens per expert",
                l.layer,
                l.frequent.len()
            ),
            format!("{stem}.png"),
        ));
    }

    // 4. Results and report.
    let tok_json = |rows: &[(String, usize, Vec<f64>)]| -> Vec<Value> {
        rows.iter().map(|(n, c, s)| json!({"name": n, "tokens": c, "shares": s})).collect()
    };
    let task_names: Vec<String> =
        (0..analysis.tasks.max(2)).map(|t| task_name(&data.name, t as u32)).collect();
    let layer_json: Vec<Value> = layers
        .iter()
        .map(|l| {
            let e = l.usage.len();
            json!({
                "layer": l.layer,
                "experts": e,
                "usage": l.usage,
                "usage_entropy": entropy(&l.usage),
                "router_entropy": l.router_entropy.map_or(Value::Null, finite_or_null),
                "uniform_entropy": (e.max(1) as f64).ln(),
                "mutual_information_bits": l.mutual_information_bits,
                "classes": tok_json(&l.rows),
                "frequent_tokens": tok_json(&l.frequent),
                "top_tokens": l.top_tokens.iter().map(|t| t.iter().map(|(s, n)| json!({"token": s, "count": n})).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "specialisation": l.experts.iter().map(|s| json!({
                    "expert": s.expert, "usage": s.usage, "class": s.class, "purity": s.purity,
                    "base_rate": s.base, "odds_ratio": finite_or_null(s.odds_ratio),
                    "class_share": s.class_share, "specialised": s.specialised(),
                })).collect::<Vec<_>>(),
                "operator_tokens": l.operator.as_ref().map_or(Value::Null, |t| t.to_json(&["+".into(), "-".into()])),
                "answer_positions": l.answer.as_ref().map_or(Value::Null, |t| t.to_json(&task_names)),
                "task_lines": l.lines.as_ref().map_or(Value::Null, |t| t.to_json(&task_names)),
            })
        })
        .collect();
    let training_json = training.as_ref().map_or(Value::Null, |s| {
        json!({
            "steps": s.steps,
            "seconds": s.seconds,
            "tokens_per_s": s.tokens_per_s,
            "final_val_loss": s.final_eval.map_or(Value::Null, |e| finite_or_null(e.loss)),
            "params_total": s.params.total,
            "params_active": s.params.active,
            "warnings": s.warnings,
        })
    });
    let results = json!({
        "source": source,
        "checkpoint": run.checkpoint.display().to_string(),
        "checkpoint_step": run.step,
        "dataset": data.name,
        "tokens": analysis.report.tokens,
        "route_seconds": route_seconds,
        "training": training_json,
        "layers": layer_json,
    });
    let config = json!({
        "checkpoint": if checkpoint.is_empty() { Value::Null } else { json!(checkpoint) },
        "dataset": dataset,
        "tokens": max_tokens,
        "frequent": frequent,
        "specialised_odds_ratio": SPECIALISED_ODDS_RATIO,
        "model": serde_json::to_value(&run.config.model).map_err(|e| LabError::Msg(e.to_string()))?,
        "trainer": serde_json::to_value(&run.config.trainer).map_err(|e| LabError::Msg(e.to_string()))?,
    });
    let report =
        build_report(opts, &run, &data.name, &source, training.as_ref(), &analysis, &layers, figures);
    report::finish(opts, LAB, config, results, report, plots)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    opts: &LabOptions,
    run: &LoadedRun,
    dataset: &str,
    source: &str,
    training: Option<&TrainSummary>,
    analysis: &Analysis,
    layers: &[LayerResult],
    figures: Vec<(String, String)>,
) -> Report {
    let m = &run.config.model;
    let t = &run.config.trainer;
    let mut setup = format!(
        "Model: {source}; {} layers, hidden {}, {} experts per MoE layer, top-{} routing ({:?}), \
         load_balance_alpha {}, {} steps of batch {} × {} on `{}`. Routed {} held-out tokens (first \
         choice of each token). Machine: {}.",
        m.num_layers,
        m.hidden_size,
        m.num_experts,
        m.experts_per_tok,
        m.routing.strategy,
        t.load_balance_alpha,
        run.step,
        t.batch_size,
        t.seq_len,
        dataset,
        analysis.report.tokens,
        crate::machine::MachineInfo::collect().summary(),
    );
    if let Some(s) = training {
        let _ = write!(
            setup,
            " Training took {:.1} s ({:.0} tokens/s), final validation loss {}.",
            s.seconds,
            s.tokens_per_s,
            s.final_eval.map_or("n/a".into(), |e| format!("{:.3}", e.loss))
        );
    }
    if opts.quick {
        setup.push_str(" `--quick`: a tiny model and few steps; the figures only show that the lab works.");
    }
    setup.push_str(&format!(
        "\n\nDefinitions. *Purity* of an expert: the share of its tokens that belong to its most \
         over-represented class (classes: letters, digits, whitespace, punctuation, operators, and the \
         most frequent single tokens; at least {MIN_CLASS_TOKENS} tokens). *Odds ratio*: that class's odds \
         in the expert over its odds in the data; an expert is called *specialised* when it is at least \
         {SPECIALISED_ODDS_RATIO} and the class is at least {:.0}% of the expert's tokens (classes that \
         reach that share are preferred when picking an expert's best class). *Task purity* \
         (arithmetic): Σ over experts of the larger task's count, \
         over all counted positions — 1 when each expert serves one task, the majority task's share when \
         routing ignores the task. *Answer positions*: the `=` and the result characters of each line, \
         whose next-token prediction depends on the operator.",
        100.0 * SPECIALISED_PURITY
    ));

    let mut tables = Vec::new();
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            let e = l.usage.len();
            vec![
                l.layer.to_string(),
                l.usage.iter().map(|&u| format!("{:.0}", 100.0 * u)).collect::<Vec<_>>().join(" / "),
                l.router_entropy.map_or("n/a".into(), |h| format!("{h:.3}")),
                format!("{:.3}", entropy(&l.usage)),
                format!("{:.3}", (e.max(1) as f64).ln()),
                format!("{:.3}", l.mutual_information_bits),
            ]
        })
        .collect();
    tables.push(format!(
        "Usage and routing entropy per MoE layer (entropies in nats; the router's is the mean entropy \
         of each token's score distribution):\n\n{}",
        md_table(
            &[
                "layer",
                "usage % per expert",
                "router entropy",
                "usage entropy",
                "uniform (ln E)",
                "I(expert; class) bits"
            ],
            &rows
        )
    ));
    let mut spec_rows = Vec::new();
    for l in layers {
        for s in &l.experts {
            spec_rows.push(vec![
                l.layer.to_string(),
                format!("e{}", s.expert),
                pct(s.usage),
                s.class.clone(),
                pct(s.purity),
                pct(s.base),
                if s.odds_ratio.is_finite() { format!("{:.1}", s.odds_ratio) } else { "∞".into() },
                pct(s.class_share),
                if s.specialised() { "yes".into() } else { "no".into() },
                l.top_tokens
                    .get(s.expert)
                    .map(|t| {
                        t.iter().take(5).map(|(x, n)| format!("{x:?} {n}")).collect::<Vec<_>>().join(", ")
                    })
                    .unwrap_or_default(),
            ]);
        }
    }
    tables.push(format!(
        "Each expert's most over-represented class or token, its purity and odds ratio, the share of \
         that class it takes, and its top tokens:\n\n{}",
        md_table(
            &[
                "layer",
                "expert",
                "usage",
                "class",
                "purity",
                "base rate",
                "odds ratio",
                "takes of class",
                "specialised",
                "top tokens"
            ],
            &spec_rows
        )
    ));
    let has_tasks = layers.iter().any(|l| l.answer.is_some() || l.operator.is_some());
    if has_tasks {
        let fav = |t: &Option<TaskSeparation>| {
            t.as_ref().map_or("n/a".to_string(), |t| {
                t.favourites.iter().map(|(e, s)| format!("e{e} {}", pct(*s))).collect::<Vec<_>>().join(" / ")
            })
        };
        let pur = |t: &Option<TaskSeparation>| {
            t.as_ref()
                .map_or("n/a".to_string(), |t| format!("{} (baseline {})", pct(t.purity), pct(t.baseline)))
        };
        let rows: Vec<Vec<String>> = layers
            .iter()
            .map(|l| {
                vec![
                    l.layer.to_string(),
                    fav(&l.operator),
                    pur(&l.operator),
                    fav(&l.answer),
                    pur(&l.answer),
                    pur(&l.lines),
                ]
            })
            .collect();
        tables.push(format!(
            "Task separation (arithmetic: `+` vs `-`): favourite expert and its share per task, and the \
             task purity, on the operator tokens, on the answer positions, and on every position of the \
             lines:\n\n{}",
            md_table(
                &[
                    "layer",
                    "operator `+` / `-` favourites",
                    "operator task purity",
                    "answer `+` / `-` favourites",
                    "answer task purity",
                    "whole-line task purity"
                ],
                &rows
            )
        ));
    }

    // The answer.
    let mut answer = String::new();
    let specialised: Vec<String> = layers
        .iter()
        .flat_map(|l| {
            l.experts.iter().filter(|s| s.specialised()).map(move |s| {
                format!(
                    "layer {} e{} on {} (purity {}, {:.1}× the odds of the data, takes {} of that class)",
                    l.layer,
                    s.expert,
                    s.class,
                    pct(s.purity),
                    s.odds_ratio,
                    pct(s.class_share)
                )
            })
        })
        .collect();
    let total_experts: usize = layers.iter().map(|l| l.usage.len()).sum();
    if specialised.is_empty() {
        let _ = writeln!(
            answer,
            "No expert specialised by this lab's measure (odds ratio ≥ {SPECIALISED_ODDS_RATIO}, purity ≥ 10%) on any class \
             or frequent token: routing is spread across the classes."
        );
    } else {
        let _ = writeln!(
            answer,
            "{} of {} experts specialised (odds ratio ≥ {SPECIALISED_ODDS_RATIO}, purity ≥ {:.0}%):\n\n- {}\n",
            specialised.len(),
            total_experts,
            100.0 * SPECIALISED_PURITY,
            specialised.join("\n- ")
        );
    }
    for l in layers {
        let e = l.usage.len();
        let _ = write!(
            answer,
            "\nLayer {}: usage entropy {:.2} of {:.2} nats",
            l.layer,
            entropy(&l.usage),
            (e.max(1) as f64).ln()
        );
        if let Some(h) = l.router_entropy {
            let _ = write!(answer, ", router entropy {h:.2}");
        }
        let _ = write!(
            answer,
            ", {:.3} bits of mutual information between expert and token class",
            l.mutual_information_bits
        );
        for (name, sep) in [("operator tokens", &l.operator), ("answer positions", &l.answer)] {
            if let Some(s) = sep {
                let favs: Vec<String> =
                    s.favourites.iter().map(|(e, v)| format!("e{e} ({})", pct(*v))).collect();
                let _ = write!(
                    answer,
                    "; {name}: `+`/`-` go mostly to {} — {} experts, task purity {} against {} by chance",
                    favs.join(" / "),
                    if s.separated() { "different" } else { "the same" },
                    pct(s.purity),
                    pct(s.baseline)
                );
            }
        }
        answer.push('.');
    }
    answer.push('\n');
    Report {
        title: "expert-patterns: which tokens go to which expert".into(),
        question: "After training, do the experts of an MoE language model specialise — on letters, \
                   whitespace, punctuation, digits, single frequent tokens, or (on the arithmetic set) on the \
                   `+` and `-` tasks — and how purely?"
            .into(),
        setup,
        tables,
        figures,
        answer,
    }
}
