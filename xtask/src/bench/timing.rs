//! Timing: warm-up, then the median of repeated samples.
//!
//! A sample runs the call `iters` times back to back and divides by `iters`, where `iters` is
//! chosen after the warm-up so that one sample lasts at least [`Plan::sample_s`] (short calls
//! are otherwise dominated by the clock's resolution). The device is synchronised before a sample
//! starts and after it ends, so queued GPU work is counted where it belongs.

use std::time::Instant;

use anyhow::Result;

/// How long to warm up and how many samples to take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Warm up for at least this long (seconds)…
    pub warmup_s: f64,
    /// …and for at least this many calls.
    pub warmup_calls: usize,
    /// Samples taken; the median, min and max are reported.
    pub samples: usize,
    /// Minimum length of one sample (seconds).
    pub sample_s: f64,
}

/// Per-call times over the samples, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Median over the samples.
    pub median_s: f64,
    /// Fastest sample.
    pub min_s: f64,
    /// Slowest sample.
    pub max_s: f64,
    /// Calls per sample.
    pub iters: usize,
    /// Samples taken.
    pub samples: usize,
}

/// The median of `v` (the mean of the middle two for an even count); NaN for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Times `call` by `plan`; `sync` waits for the device to finish queued work.
pub fn time(
    plan: &Plan,
    mut call: impl FnMut() -> Result<()>,
    sync: &dyn Fn() -> Result<()>,
) -> Result<Timing> {
    sync()?;
    let start = Instant::now();
    let mut fastest = f64::INFINITY;
    let mut calls = 0;
    while calls < plan.warmup_calls.max(1) || start.elapsed().as_secs_f64() < plan.warmup_s {
        let t = Instant::now();
        call()?;
        sync()?;
        fastest = fastest.min(t.elapsed().as_secs_f64());
        calls += 1;
    }
    let iters = if fastest > 0.0 { (plan.sample_s / fastest).ceil().clamp(1.0, 1e6) as usize } else { 1000 };
    let mut per_call = Vec::with_capacity(plan.samples.max(1));
    for _ in 0..plan.samples.max(1) {
        sync()?;
        let t = Instant::now();
        for _ in 0..iters {
            call()?;
        }
        sync()?;
        per_call.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    Ok(Timing {
        median_s: median(&per_call),
        min_s: per_call.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: per_call.iter().copied().fold(0.0, f64::max),
        iters,
        samples: per_call.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn time_counts_calls_and_orders_stats() -> Result<()> {
        let mut n = 0usize;
        let plan = Plan { warmup_s: 0.0, warmup_calls: 3, samples: 5, sample_s: 1e-4 };
        let t = time(
            &plan,
            || {
                n += 1;
                std::hint::black_box((0..1000u64).sum::<u64>());
                Ok(())
            },
            &|| Ok(()),
        )?;
        assert_eq!(t.samples, 5);
        assert!(t.iters >= 1);
        assert_eq!(n, 3 + 5 * t.iters);
        assert!(t.min_s <= t.median_s && t.median_s <= t.max_s && t.min_s > 0.0);
        Ok(())
    }
}
