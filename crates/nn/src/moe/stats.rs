//! Monitoring: [`RoutingStats`] (per-expert load, routing entropy, dropped tokens) returned by
//! every MoE forward, and the [`CollapseDetector`] a trainer feeds them to, step by step.

use moeba_kernels::ops;
use moeba_tensor::{Result, Tensor};

/// What one MoE forward did with its tokens. Plain values (no tape), for logging.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingStats {
    /// Tokens routed (for multi-task layers: tokens × tasks).
    pub tokens: usize,
    /// Assignments per expert before capacity dropping (`E`; sums to `tokens · k` for top-k).
    pub counts: Vec<f64>,
    /// Assignments per expert that were processed (after capacity dropping).
    pub kept: Vec<f64>,
    /// Assignments dropped by the capacity limit.
    pub dropped: usize,
    /// Mean over tokens of the entropy (nats) of the router's score distribution over experts
    /// (`None` when there is no learned router, e.g. hash routing; sigmoid scores are normalised
    /// to sum to 1 first).
    pub entropy: Option<f64>,
}

impl RoutingStats {
    /// Stats from per-expert assignment `counts`, the kept counts, the number dropped and the
    /// router `scores (T, E)` (if any) for the entropy.
    pub fn new(
        tokens: usize,
        counts: Vec<f64>,
        kept: Vec<f64>,
        dropped: usize,
        scores: Option<&Tensor>,
    ) -> Result<Self> {
        let entropy = match scores {
            Some(s) if s.elem_count() > 0 => Some(mean_entropy(s)?),
            _ => None,
        };
        Ok(RoutingStats { tokens, counts, kept, dropped, entropy })
    }

    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.counts.len()
    }

    /// Each expert's share of the assignments, `counts / Σ counts` (all 0 when nothing was routed).
    pub fn usage(&self) -> Vec<f64> {
        let total: f64 = self.counts.iter().sum();
        self.counts.iter().map(|c| if total > 0.0 { c / total } else { 0.0 }).collect()
    }

    /// Total assignments.
    pub fn assignments(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Dropped assignments over all assignments (0 when dropless).
    pub fn dropped_fraction(&self) -> f64 {
        let total = self.assignments();
        if total > 0.0 {
            self.dropped as f64 / total
        } else {
            0.0
        }
    }

    /// The entropy (nats) of the usage distribution: `ln E` when perfectly balanced, 0 when one
    /// expert takes everything.
    pub fn usage_entropy(&self) -> f64 {
        self.usage().iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum()
    }

    /// The largest share over the mean share (1 = balanced, E = everything on one expert).
    pub fn max_load_ratio(&self) -> f64 {
        let u = self.usage();
        let mean = 1.0 / u.len().max(1) as f64;
        u.iter().copied().fold(0.0, f64::max) / mean
    }

    /// Merges the stats of two routings over the same experts (e.g. two tasks).
    pub fn merge(&self, other: &RoutingStats) -> RoutingStats {
        let add = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<_>>();
        let entropy = match (self.entropy, other.entropy) {
            (Some(a), Some(b)) => {
                let (na, nb) = (self.tokens as f64, other.tokens as f64);
                Some(if na + nb > 0.0 { (a * na + b * nb) / (na + nb) } else { 0.0 })
            }
            (a, b) => a.or(b),
        };
        RoutingStats {
            tokens: self.tokens + other.tokens,
            counts: add(&self.counts, &other.counts),
            kept: add(&self.kept, &other.kept),
            dropped: self.dropped + other.dropped,
            entropy,
        }
    }
}

/// Mean over rows of `-Σ p ln p` for `scores (T, E)` normalised per row.
fn mean_entropy(scores: &Tensor) -> Result<f64> {
    let dims = scores.dims();
    let (t, e) = (dims[0], dims.get(1).copied().unwrap_or(1));
    // Tiny (T·E) host read at the end of the forward, for logging only.
    let s = ops::contiguous(scores)?.to_vec_f64()?;
    let mut total = 0.0;
    for row in s.chunks(e.max(1)) {
        let z: f64 = row.iter().sum();
        if z > 0.0 {
            total -= row.iter().filter(|&&p| p > 0.0).map(|&p| (p / z) * (p / z).ln()).sum::<f64>();
        }
    }
    Ok(total / t.max(1) as f64)
}

/// One expert that has stayed below the threshold share for at least `patience` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapsedExpert {
    /// The expert's index.
    pub expert: usize,
    /// Its share of the assignments at the latest step.
    pub share: f64,
    /// For how many consecutive steps it has been below the threshold.
    pub steps_below: usize,
}

/// The detector's finding at one step: the experts that are collapsing.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseWarning {
    /// The step the warning was raised at (the detector's own step count, from 1).
    pub step: usize,
    /// The threshold share the experts are below.
    pub threshold: f64,
    /// The experts below it for `patience` steps or more.
    pub experts: Vec<CollapsedExpert>,
}

impl std::fmt::Display for CollapseWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MoE collapse at step {}: ", self.step)?;
        for (i, e) in self.experts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "expert {} share {:.4} < {} for {} steps",
                e.expert, e.share, self.threshold, e.steps_below
            )?;
        }
        Ok(())
    }
}

/// Watches expert usage over training steps and warns when an expert stays below `threshold`
/// share of the assignments for `patience` consecutive steps (routing collapse).
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseDetector {
    /// The share below which an expert counts as starved (e.g. `0.1 / E`).
    pub threshold: f64,
    /// Consecutive steps below the threshold before warning (≥ 1).
    pub patience: usize,
    below: Vec<usize>,
    step: usize,
}

impl CollapseDetector {
    /// A detector with no history.
    pub fn new(threshold: f64, patience: usize) -> Self {
        CollapseDetector { threshold, patience: patience.max(1), below: Vec::new(), step: 0 }
    }

    /// Feeds one step's stats; see [`CollapseDetector::observe_usage`].
    pub fn observe(&mut self, stats: &RoutingStats) -> Option<CollapseWarning> {
        self.observe_usage(&stats.usage())
    }

    /// Feeds one step's usage shares (one per expert). Returns a warning listing every expert
    /// whose share has been below the threshold for `patience` or more consecutive steps (and
    /// keeps warning while it stays there); `None` otherwise. A change in the number of experts
    /// resets the history.
    pub fn observe_usage(&mut self, usage: &[f64]) -> Option<CollapseWarning> {
        if self.below.len() != usage.len() {
            self.below = vec![0; usage.len()];
        }
        self.step += 1;
        let mut experts = Vec::new();
        for (i, &share) in usage.iter().enumerate() {
            if share < self.threshold {
                self.below[i] += 1;
            } else {
                self.below[i] = 0;
            }
            if self.below[i] >= self.patience {
                experts.push(CollapsedExpert { expert: i, share, steps_below: self.below[i] });
            }
        }
        (!experts.is_empty()).then_some(CollapseWarning {
            step: self.step,
            threshold: self.threshold,
            experts,
        })
    }

    /// Consecutive steps below the threshold, per expert.
    pub fn steps_below(&self) -> &[usize] {
        &self.below
    }

    /// Forgets the history.
    pub fn reset(&mut self) {
        self.below.clear();
        self.step = 0;
    }
}
