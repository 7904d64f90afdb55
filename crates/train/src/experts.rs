//! `moeba experts`: which inputs go to which expert. Runs a trained MoE model over held-out data
//! and reports, per MoE layer, each expert's share of tokens, the routing entropy, the share of
//! each token class (letters, digits, punctuation, whitespace, operators, and for task datasets
//! each task) per expert, the top tokens per expert, and the purity with which a class (e.g. the
//! `+` and `-` operator positions) goes to its favourite expert.
//!
//! A token's class comes from its text: `letters`, `digits`, `whitespace` and `punctuation` when
//! every character is of that kind, the operators `+`, `-` and `=` on their own (a `-` right after
//! `=` is the sign of a negative result, not an operator: class `- (sign)`), and `other` for the
//! rest (mixed text, bytes of a multi-byte character). These classes split the tokens: their
//! counts add up to the tokens analysed. Task datasets add `task +` / `task -` (arithmetic) or
//! `task N`, a second split of the same tokens. Shares and the top tokens use each token's first
//! choice of expert.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use moeba_nn::moe::MoeContext;
use moeba_nn::{ForwardOptions, Recompute};
use moeba_tensor::{Device, Tensor};

use crate::data::Dataset;
use crate::plots::{plot_heatmap, Heatmap};
use crate::tokenizer::Tokenizer;
use crate::trainer::{LoadedRun, TrainError};

/// The report for one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerExperts {
    /// Block index.
    pub layer: usize,
    /// Each expert's share of the routed tokens (first choice).
    pub usage: Vec<f64>,
    /// Mean router entropy (nats), when the strategy has a router.
    pub entropy: Option<f64>,
    /// Per class (name, tokens of that class, share of them per expert).
    pub classes: Vec<(String, usize, Vec<f64>)>,
    /// Per expert, its most frequent tokens (as text) with counts.
    pub top_tokens: Vec<Vec<(String, usize)>>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertReport {
    /// One entry per MoE layer.
    pub layers: Vec<LayerExperts>,
    /// Tokens analysed.
    pub tokens: usize,
}

/// The class names that split the tokens by their text, in report order.
pub const TEXT_CLASSES: [&str; 9] =
    ["letters", "digits", "whitespace", "punctuation", "+", "-", "- (sign)", "=", "other"];

/// Most frequent tokens listed per expert.
pub const TOP_TOKENS: usize = 8;

/// The text class of a token's text (one of [`TEXT_CLASSES`]).
pub fn token_class(text: &str) -> &'static str {
    match text {
        "+" => return "+",
        "-" => return "-",
        "=" => return "=",
        "" => return "other",
        _ => {}
    }
    let all = |f: fn(&char) -> bool| text.chars().all(|c| f(&c));
    if all(|c| c.is_alphabetic()) {
        "letters"
    } else if all(|c| c.is_ascii_digit()) {
        "digits"
    } else if all(|c| c.is_whitespace()) {
        "whitespace"
    } else if all(|c| {
        c.is_ascii_punctuation() || (!c.is_alphanumeric() && !c.is_whitespace() && *c != '\u{fffd}')
    }) {
        "punctuation"
    } else {
        "other"
    }
}

/// The class of a token in context: [`token_class`] of its text, except that a `-` right after a
/// `=` is `- (sign)`.
pub fn token_class_after(text: &str, previous: Option<&str>) -> &'static str {
    match token_class(text) {
        "-" if previous == Some("=") => "- (sign)",
        c => c,
    }
}

/// The name of task `id` of dataset `dataset` (`task +` / `task -` for the arithmetic set).
pub fn task_name(dataset: &str, id: u32) -> String {
    match (dataset, id) {
        ("arithmetic", 0) => "task +".into(),
        ("arithmetic", 1) => "task -".into(),
        _ => format!("task {id}"),
    }
}

/// Counts for one MoE layer, built token by token.
#[derive(Debug, Clone)]
struct LayerCounts {
    layer: usize,
    experts: usize,
    /// First-choice assignments per expert.
    first: Vec<u64>,
    /// Router assignment counts (all k choices) when no first choice is reported.
    counts: Vec<f64>,
    entropy_sum: f64,
    entropy_tokens: usize,
    has_assignments: bool,
    /// class name → per expert counts.
    classes: HashMap<String, Vec<u64>>,
    /// token id → per expert counts.
    tokens: HashMap<u32, Vec<u64>>,
    /// The last token seen (the stream continues across calls).
    last: Option<u32>,
}

/// Builds an [`ExpertReport`] from per-token observations: feed each MoE layer's first-choice
/// experts with the token ids (and tasks) they belong to, then [`ReportBuilder::finish`]. Used by
/// [`expert_report`]; public so that reports can be built from any routing source.
#[derive(Debug, Clone)]
pub struct ReportBuilder {
    dataset: String,
    layers: Vec<LayerCounts>,
    tokens: usize,
}

impl ReportBuilder {
    /// An empty builder for the data set named `dataset` (names its tasks, see [`task_name`]).
    pub fn new(dataset: &str) -> Self {
        ReportBuilder { dataset: dataset.to_string(), layers: Vec::new(), tokens: 0 }
    }

    fn layer_mut(&mut self, layer: usize, experts: usize) -> &mut LayerCounts {
        let pos = match self.layers.iter().position(|l| l.layer == layer) {
            Some(p) => p,
            None => {
                self.layers.push(LayerCounts {
                    layer,
                    experts,
                    first: vec![0; experts],
                    counts: vec![0.0; experts],
                    entropy_sum: 0.0,
                    entropy_tokens: 0,
                    has_assignments: false,
                    classes: HashMap::new(),
                    tokens: HashMap::new(),
                    last: None,
                });
                self.layers.sort_by_key(|l| l.layer);
                self.layers.iter().position(|l| l.layer == layer).unwrap_or(0)
            }
        };
        let l = &mut self.layers[pos];
        if experts > l.experts {
            l.experts = experts;
            l.first.resize(experts, 0);
            l.counts.resize(experts, 0.0);
            for v in l.classes.values_mut().chain(l.tokens.values_mut()) {
                v.resize(experts, 0);
            }
        }
        l
    }

    /// Adds `tokens` analysed tokens to the report's total (once per batch, not per layer).
    pub fn add_tokens(&mut self, tokens: usize) {
        self.tokens += tokens;
    }

    /// Records the router statistics of one layer on one batch: assignment counts per expert and
    /// the mean router entropy over `tokens` tokens.
    pub fn add_stats(&mut self, layer: usize, counts: &[f64], entropy: Option<f64>, tokens: usize) {
        let l = self.layer_mut(layer, counts.len());
        for (a, c) in l.counts.iter_mut().zip(counts) {
            *a += c;
        }
        if let Some(e) = entropy {
            l.entropy_sum += e * tokens as f64;
            l.entropy_tokens += tokens;
        }
    }

    /// Records first-choice experts of one layer: `first[i]` for the token `ids[i]` (of task
    /// `tasks[i]` when given), whose text is `text(ids[i])`. `ids` are consecutive tokens of the
    /// data stream, continuing the previous call's (the class of a `-` depends on the token before
    /// it). Errors name a length mismatch or an expert id out of range.
    pub fn add_assignments(
        &mut self,
        layer: usize,
        num_experts: usize,
        first: &[u32],
        ids: &[u32],
        tasks: Option<&[u32]>,
        text: &dyn Fn(u32) -> String,
    ) -> Result<(), TrainError> {
        if first.len() != ids.len() || tasks.is_some_and(|t| t.len() != ids.len()) {
            return Err(TrainError::Invalid {
                key: "experts".into(),
                msg: format!(
                    "layer {layer}: {} expert assignments for {} tokens ({} task ids)",
                    first.len(),
                    ids.len(),
                    tasks.map_or(0, |t| t.len())
                ),
            });
        }
        if let Some(&bad) = first.iter().find(|&&e| e as usize >= num_experts) {
            return Err(TrainError::Invalid {
                key: "experts".into(),
                msg: format!("layer {layer}: expert id {bad} out of range for {num_experts} experts"),
            });
        }
        let dataset = self.dataset.clone();
        let l = self.layer_mut(layer, num_experts);
        let e_count = l.experts;
        l.has_assignments = true;
        let mut text_of: HashMap<u32, String> = HashMap::new();
        for (i, (&e, &id)) in first.iter().zip(ids).enumerate() {
            let e = e as usize;
            l.first[e] += 1;
            let previous = l.last.map(|p| text_of.entry(p).or_insert_with(|| text(p)).clone());
            let own = text_of.entry(id).or_insert_with(|| text(id));
            let class = token_class_after(own, previous.as_deref());
            l.last = Some(id);
            l.classes.entry(class.to_string()).or_insert_with(|| vec![0; e_count])[e] += 1;
            if let Some(t) = tasks {
                l.classes.entry(task_name(&dataset, t[i])).or_insert_with(|| vec![0; e_count])[e] += 1;
            }
            l.tokens.entry(id).or_insert_with(|| vec![0; e_count])[e] += 1;
        }
        Ok(())
    }

    /// The report; `text` turns a token id into its text for the top-token lists.
    pub fn finish(&self, text: &dyn Fn(u32) -> String) -> ExpertReport {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let usage = if l.has_assignments {
                    shares(&l.first)
                } else {
                    let total: f64 = l.counts.iter().sum();
                    l.counts.iter().map(|&c| if total > 0.0 { c / total } else { 0.0 }).collect()
                };
                let entropy = (l.entropy_tokens > 0).then(|| l.entropy_sum / l.entropy_tokens as f64);
                let mut classes: Vec<(String, usize, Vec<f64>)> = Vec::new();
                for name in TEXT_CLASSES {
                    if let Some(c) = l.classes.get(name) {
                        classes.push((name.to_string(), c.iter().sum::<u64>() as usize, shares(c)));
                    }
                }
                let mut tasks: Vec<(&String, &Vec<u64>)> =
                    l.classes.iter().filter(|(k, _)| !TEXT_CLASSES.contains(&k.as_str())).collect();
                tasks.sort_by(|a, b| a.0.cmp(b.0));
                for (name, c) in tasks {
                    classes.push((name.clone(), c.iter().sum::<u64>() as usize, shares(c)));
                }
                let top_tokens = (0..l.experts)
                    .map(|e| {
                        let mut v: Vec<(u32, u64)> =
                            l.tokens.iter().filter(|(_, c)| c[e] > 0).map(|(&id, c)| (id, c[e])).collect();
                        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                        v.truncate(TOP_TOKENS);
                        v.into_iter().map(|(id, n)| (text(id), n as usize)).collect()
                    })
                    .collect();
                LayerExperts { layer: l.layer, usage, entropy, classes, top_tokens }
            })
            .collect();
        ExpertReport { layers, tokens: self.tokens }
    }
}

fn shares(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| if total > 0 { c as f64 / total as f64 } else { 0.0 }).collect()
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))
}

/// Routes up to `max_tokens` validation tokens of `data` through `run`'s model and builds the report.
pub fn expert_report(run: &LoadedRun, data: &Dataset, max_tokens: usize) -> Result<ExpertReport, TrainError> {
    let model = &run.model;
    let t = &run.config.trainer;
    let moe_layers: Vec<(usize, usize)> =
        model.moe_layers().iter().map(|(i, l)| (*i, l.config().num_experts)).collect();
    if moe_layers.is_empty() {
        return Err(TrainError::Invalid {
            key: "checkpoint".into(),
            msg: format!(
                "{}: the model has no MoE layers (model.num_experts = {}), so there are no experts to report",
                run.checkpoint.display(),
                run.config.model.num_experts
            ),
        });
    }
    let n = data.val.len().min(max_tokens);
    if n == 0 {
        return Err(TrainError::Invalid {
            key: "data".into(),
            msg: format!("`{}` has no validation tokens to route (or --tokens is 0)", data.name),
        });
    }
    let tokens = &data.val[..n];
    let tasks = data.val_tasks.as_ref().map(|t| &t[..n.min(t.len())]).filter(|t| t.len() == n);
    let seq = t.seq_len.min(run.config.model.max_seq_len).max(1);
    let rows_per_batch = t.batch_size.max(1);
    let device = Device::Cpu;
    let text = |id: u32| token_text(&run.tokenizer, id);
    let mut builder = ReportBuilder::new(&data.name);

    // Full rows of `seq` tokens in batches, then the remainder as one shorter row.
    let full_rows = n / seq;
    let mut starts: Vec<(usize, usize, usize)> = Vec::new(); // (start, rows, len)
    let mut r = 0;
    while r < full_rows {
        let rows = rows_per_batch.min(full_rows - r);
        starts.push((r * seq, rows, seq));
        r += rows;
    }
    if !n.is_multiple_of(seq) {
        starts.push((full_rows * seq, 1, n % seq));
    }
    let _guard = moeba_autograd::no_grad();
    for (start, rows, len) in starts {
        let count = rows * len;
        let ids_v: Vec<u32> = tokens[start..start + count].to_vec();
        let ids = Tensor::from_vec(ids_v.clone(), (rows, len), &device)?;
        let task_v: Option<Vec<u32>> =
            tasks.map(|t| t[start..start + count].iter().map(|&x| u32::from(x)).collect());
        let mut ctx = MoeContext::default().with_causal(true);
        if let Some(tv) = &task_v {
            ctx = ctx.with_task_ids(Tensor::from_vec(tv.clone(), (rows, len), &device)?);
        }
        let opts = ForwardOptions { recompute: Recompute::None, moe: ctx };
        let out = model.forward(&ids, &opts)?;
        builder.add_tokens(count);
        for (layer, stats) in &out.routing {
            builder.add_stats(*layer, &stats.counts, stats.entropy, count);
        }
        for (layer, assign) in &out.assignments {
            let e = moe_layers.iter().find(|(i, _)| i == layer).map_or(0, |(_, e)| *e);
            let first: Vec<u32> = first_choice(assign, count)?;
            builder.add_assignments(*layer, e, &first, &ids_v, task_v.as_deref(), &text)?;
        }
    }
    Ok(builder.finish(&text))
}

/// The first-choice expert per token from an assignment tensor `(T)` or `(T, k)` of U32 (or I64).
pub fn first_choice(assign: &Tensor, tokens: usize) -> Result<Vec<u32>, TrainError> {
    let flat: Vec<u32> = match assign.dtype() {
        moeba_tensor::DType::U32 => assign.to_vec::<u32>()?,
        _ => assign
            .to_dtype(moeba_tensor::DType::I64)?
            .to_vec::<i64>()?
            .into_iter()
            .map(|v| v.max(0) as u32)
            .collect(),
    };
    if tokens == 0 || !flat.len().is_multiple_of(tokens) {
        return Err(TrainError::Invalid {
            key: "experts".into(),
            msg: format!("an assignment of shape {:?} does not match {tokens} tokens", assign.dims()),
        });
    }
    let k = flat.len() / tokens;
    Ok(flat.chunks(k).map(|c| c[0]).collect())
}

/// The purity of `class` in `layer`: the share of its tokens that go to its most used expert,
/// and that expert.
pub fn purity(layer: &LayerExperts, class: &str) -> Option<(usize, f64)> {
    let (_, count, shares) = layer.classes.iter().find(|(name, _, _)| name == class)?;
    if *count == 0 {
        return None;
    }
    let mut best: Option<(usize, f64)> = None;
    for (e, &s) in shares.iter().enumerate() {
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((e, s));
        }
    }
    best
}

/// Text rendering of the report.
pub fn render(report: &ExpertReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "routed {} tokens through {} MoE layer(s)", report.tokens, report.layers.len());
    for l in &report.layers {
        let e = l.usage.len();
        let _ = write!(s, "\nlayer {} ({e} experts)", l.layer);
        if let Some(h) = l.entropy {
            let _ = write!(s, ", router entropy {h:.3} nats (uniform: {:.3})", (e.max(1) as f64).ln());
        }
        s.push('\n');
        let name_w =
            l.classes.iter().map(|(n, c, _)| format!("{n} ({c})").chars().count()).max().unwrap_or(0).max(12);
        let _ = write!(s, "  {:<name_w$}", "");
        for i in 0..e {
            let _ = write!(s, " {:>6}", format!("e{i}"));
        }
        s.push('\n');
        let _ = write!(s, "  {:<name_w$}", "usage");
        for u in &l.usage {
            let _ = write!(s, " {:>5.1}%", 100.0 * u);
        }
        s.push('\n');
        for (name, count, shares) in &l.classes {
            let _ = write!(s, "  {:<name_w$}", format!("{name} ({count})"));
            for v in shares {
                let _ = write!(s, " {:>5.1}%", 100.0 * v);
            }
            s.push('\n');
        }
        for class in ["+", "-"] {
            if let Some((e, p)) = purity(l, class) {
                let _ = writeln!(s, "  purity of `{class}`: {:.1}% to e{e}", 100.0 * p);
            }
        }
        if let (Some((a, _)), Some((b, _))) = (purity(l, "+"), purity(l, "-")) {
            let verdict = if a == b { "the same expert" } else { "different experts" };
            let _ = writeln!(s, "  `+` and `-` operator positions go mostly to {verdict} (e{a}, e{b})");
        }
        if l.top_tokens.iter().any(|t| !t.is_empty()) {
            s.push_str("  top tokens:\n");
            for (i, toks) in l.top_tokens.iter().enumerate() {
                let list: Vec<String> = toks.iter().map(|(t, n)| format!("{t:?} {n}")).collect();
                let _ = writeln!(s, "    e{i}: {}", list.join(", "));
            }
        }
    }
    s
}

/// Heatmaps of the report: usage per layer × expert, and class share × expert per layer; written
/// into `dir` as PNG and SVG.
///
/// Files: `experts_usage.{png,svg}` and `experts_classes_layer{N}.{png,svg}` for each layer
/// whose class shares are known.
pub fn plot_report(report: &ExpertReport, dir: &Path) -> Result<Vec<Heatmap>, TrainError> {
    let mut maps = Vec::new();
    if report.layers.is_empty() {
        return Ok(maps);
    }
    let experts = report.layers.iter().map(|l| l.usage.len()).max().unwrap_or(0);
    let cols: Vec<String> = (0..experts).map(|e| format!("e{e}")).collect();
    let usage = Heatmap {
        title: format!("expert usage (first choice, {} tokens)", report.tokens),
        rows: report.layers.iter().map(|l| format!("layer {}", l.layer)).collect(),
        cols: cols.clone(),
        values: report
            .layers
            .iter()
            .map(|l| {
                let mut v = l.usage.clone();
                v.resize(experts, 0.0);
                v
            })
            .collect(),
    };
    plot_heatmap(&usage, dir, "experts_usage")?;
    maps.push(usage);
    for l in &report.layers {
        if l.classes.is_empty() {
            continue;
        }
        let e = l.usage.len();
        let map = Heatmap {
            title: format!("layer {}: share of each token class per expert", l.layer),
            rows: l.classes.iter().map(|(n, c, _)| format!("{n} ({c})")).collect(),
            cols: (0..e).map(|i| format!("e{i}")).collect(),
            values: l.classes.iter().map(|(_, _, v)| v.clone()).collect(),
        };
        plot_heatmap(&map, dir, &format!("experts_classes_layer{}", l.layer))?;
        maps.push(map);
    }
    Ok(maps)
}
