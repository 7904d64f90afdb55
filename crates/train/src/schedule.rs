//! Learning-rate schedules: linear warmup, then cosine, linear or constant decay to `min_lr`.

use serde::{Deserialize, Serialize};

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half a cosine from `lr` down to `min_lr` at `max_steps`.
    Cosine,
    /// A straight line from `lr` down to `min_lr` at `max_steps`.
    Linear,
    /// `lr` after warmup, forever.
    Constant,
}

/// A warmup + decay schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Decay shape.
    pub kind: ScheduleKind,
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Floor of the decay.
    pub min_lr: f64,
    /// Steps of linear warmup from `lr / warmup_steps`.
    pub warmup_steps: usize,
    /// The step at which the decay reaches `min_lr`.
    pub max_steps: usize,
}

impl Schedule {
    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let factor = match self.kind {
            ScheduleKind::Constant => return self.lr,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Linear => 1.0 - progress,
        };
        self.min_lr + (self.lr - self.min_lr) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s =
            Schedule { kind: ScheduleKind::Cosine, lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, max_steps: 110 };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(500) - 1e-4).abs() < 1e-12);
        let l = Schedule { kind: ScheduleKind::Linear, ..s };
        assert!((l.lr_at(60) - 5.5e-4).abs() < 1e-12);
        let c = Schedule { kind: ScheduleKind::Constant, ..s };
        assert_eq!(c.lr_at(100), 1e-3);
    }
}
