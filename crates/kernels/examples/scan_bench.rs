//! Times `ops::selective_scan` forward and backward at the shape (b=1, d=1536, n=16,
//! l=2048; f32, the W1 inputs of the benchmarks), channel-last and `(b, d, l)`-contiguous, and
//! prints the minimum and median of each over the repeats.
//!
//! `cargo run --release -p moeba-kernels --example scan_bench -- [l] [repeats] [fwd|bwd|all]`
//!
//! Environment knobs for profiling: `SCAN_D` (channels, default 1536; a small value keeps the
//! inputs in cache), `SCAN_PLAIN=1` (no D, z, bias or softplus: the recurrence alone),
//! `SCAN_CPU=1` (report process CPU time instead of wall time: with `RAYON_NUM_THREADS=1` it is
//! insensitive to other processes sharing the cores).

use std::time::Instant;

use moeba_kernels::ops::{self, SelectiveScanArgs};
use moeba_tensor::{DType, Device, Result, Tensor};

fn inputs(l: usize, d: usize, n: usize, channel_last: bool) -> Result<Vec<Tensor>> {
    let dev = Device::Cpu;
    let f = DType::F32;
    let bdl = |seed: u64, std: f64| -> Result<Tensor> {
        if channel_last {
            Tensor::randn(seed, (1, l, d), 0.0, std, f, &dev)?.transpose(1, 2)
        } else {
            Tensor::randn(seed, (1, d, l), 0.0, std, f, &dev)
        }
    };
    let a_log = Tensor::rand(3, (d, n), 0.0, 16f64.ln(), DType::F64, &dev)?;
    let a =
        Tensor::from_vec(a_log.to_vec::<f64>()?.iter().map(|v| -v.exp()).collect::<Vec<_>>(), (d, n), &dev)?;
    let dt = Tensor::rand(8, d, 1e-3f64.ln(), 0.1f64.ln(), DType::F64, &dev)?.to_vec::<f64>()?;
    let bias: Vec<f64> = dt.iter().map(|v| v.exp()).map(|dt| dt + (-(-dt).exp_m1()).ln()).collect();
    Ok(vec![
        bdl(1, 1.0)?,
        bdl(2, 0.5)?,
        a.to_dtype(f)?,
        Tensor::randn(4, (1, 1, n, l), 0.0, 1.0, f, &dev)?,
        Tensor::randn(5, (1, 1, n, l), 0.0, 1.0, f, &dev)?,
        Tensor::rand(6, d, 0.5, 1.5, f, &dev)?,
        bdl(7, 1.0)?,
        Tensor::from_vec(bias, d, &dev)?.to_dtype(f)?,
        bdl(9, 1.0)?,
    ])
}

fn args(t: &[Tensor]) -> SelectiveScanArgs<'_> {
    // SCAN_PLAIN=1: no D, no z, no softplus (the recurrence alone).
    if std::env::var("SCAN_PLAIN").is_ok_and(|v| v == "1") {
        return SelectiveScanArgs {
            u: &t[0],
            delta: &t[1],
            a: &t[2],
            b: &t[3],
            c: &t[4],
            d: None,
            z: None,
            delta_bias: None,
            delta_softplus: false,
            initial_state: None,
            seq_idx: None,
        };
    }
    SelectiveScanArgs {
        u: &t[0],
        delta: &t[1],
        a: &t[2],
        b: &t[3],
        c: &t[4],
        d: Some(&t[5]),
        z: Some(&t[6]),
        delta_bias: Some(&t[7]),
        delta_softplus: true,
        initial_state: None,
        seq_idx: None,
    }
}

/// Process CPU time in ms (SCAN_CPU=1: report it instead of wall time; with one rayon thread it
/// is insensitive to other processes taking the cores).
fn now_ms() -> f64 {
    if std::env::var("SCAN_CPU").is_ok_and(|v| v == "1") {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
    } else {
        START.with(|s| s.elapsed().as_secs_f64() * 1e3)
    }
}

thread_local! {
    static START: Instant = Instant::now();
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let l: usize = argv.get(1).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let reps: usize = argv.get(2).and_then(|s| s.parse().ok()).unwrap_or(11).max(1);
    let what = argv.get(3).map(String::as_str).unwrap_or("all");
    for cl in [true, false] {
        if !cl && what != "all" {
            continue;
        }
        let dim = std::env::var("SCAN_D").ok().and_then(|v| v.parse().ok()).unwrap_or(1536);
        let t = inputs(l, dim, 16, cl)?;
        let a = args(&t);
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            if what != "bwd" {
                let s = now_ms();
                let o = ops::selective_scan(&a)?;
                fwd.push(now_ms() - s);
                drop(o);
            }
            if what != "fwd" {
                let o = ops::selective_scan(&a)?;
                let s = now_ms();
                let g = ops::selective_scan_backward(&a, &o, &t[8], None)?;
                bwd.push(now_ms() - s);
                drop(g);
            }
        }
        let layout = if cl { "channel-last" } else { "(b,d,l)" };
        if !fwd.is_empty() {
            let (mn, md) = stats(fwd);
            println!("l={l} {layout:12} fwd: min {mn:7.2} ms  median {md:7.2} ms");
        }
        if !bwd.is_empty() {
            let (mn, md) = stats(bwd);
            println!("l={l} {layout:12} bwd: min {mn:7.2} ms  median {md:7.2} ms");
        }
    }
    Ok(())
}
