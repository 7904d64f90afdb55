//! The results: one [`Row`] per (kernel, case, variant), the [`Machine`] they ran on, the table
//! and the JSON array.

use moeba_tensor::{DType, Device};
use serde_json::{json, Value};

use super::ceiling::Ceilings;
use super::harness::{Bound, Case, Comparison, Cost, Kernel, Variant};
use super::timing::Timing;

/// Where the numbers were taken.
#[derive(Debug, Clone)]
pub struct Machine {
    /// UTC date and time of the run.
    pub date: String,
    /// The CPU model (from /proc/cpuinfo).
    pub cpu_model: String,
    /// Rayon threads.
    pub threads: usize,
    /// The SIMD path moeba's CPU kernels run on (`moeba_kernels::cpu::simd::active_path`).
    pub simd_path: &'static str,
    /// The f32 GEMM moeba's matmul runs on this CPU.
    pub matmul_path: &'static str,
    /// The device the kernels ran on (`cpu`, `cuda:0`).
    pub device: String,
    /// The 1-minute load average when the run started (from /proc/loadavg; other work on the
    /// machine disturbs the measurements).
    pub load: Option<f64>,
    /// The CPU ceilings (CPU runs).
    pub ceilings: Option<Ceilings>,
    /// The device-to-device copy bandwidth, GB/s (CUDA runs).
    pub device_copy_gbps: Option<f64>,
}

impl Machine {
    /// Describes this machine and `device` (ceilings are filled in by the caller).
    pub fn describe(device: &Device) -> Machine {
        Machine {
            date: utc_now(),
            cpu_model: cpu_model(),
            threads: rayon::current_num_threads(),
            simd_path: moeba_kernels::cpu::simd::active_path(),
            matmul_path: moeba_kernels::cpu::matmul::f32_path(),
            device: device_label(device),
            load: load_average(),
            ceilings: None,
            device_copy_gbps: None,
        }
    }

    /// The header printed above the table.
    pub fn header(&self) -> String {
        let rayon_env = std::env::var("RAYON_NUM_THREADS").map(|v| format!(", RAYON_NUM_THREADS={v}"));
        let mut s = format!(
            "moeba kernel benchmarks, {}\ncpu: {} ({} rayon threads{}), SIMD path: {}, f32 matmul: {}\n",
            self.date,
            self.cpu_model,
            self.threads,
            rayon_env.unwrap_or_default(),
            self.simd_path,
            self.matmul_path,
        );
        s += &format!("device: {}", self.device);
        if let Some(l) = self.load {
            s += &format!(", load average {l:.2} at the start");
        }
        s.push('\n');
        if let Some(c) = &self.ceilings {
            s += &format!(
                "ceilings: FMA peak {:.1} GFLOP/s f32 ({} register-only loop, {} threads); \
                 copy {:.1} GB/s ({} MiB -> {} MiB, read + write bytes)\n",
                c.fma_gflops,
                c.fma_isa,
                c.threads,
                c.copy_gbps,
                c.copy_bytes >> 20,
                c.copy_bytes >> 20
            );
        }
        if let Some(g) = self.device_copy_gbps {
            s += &format!("ceilings: device copy {g:.1} GB/s (D2D memcpy, read + write bytes)\n");
        }
        s
    }

    fn peak_gflops(&self, dtype: DType) -> Option<f64> {
        let c = self.ceilings.as_ref()?;
        // f64 FMAs do half the lanes; bf16/f16 compute in f32 on the CPU.
        Some(if dtype == DType::F64 { c.fma_gflops / 2.0 } else { c.fma_gflops })
    }

    fn copy_gbps(&self) -> Option<f64> {
        self.device_copy_gbps.or(self.ceilings.as_ref().map(|c| c.copy_gbps))
    }
}

/// The outcome of validating one variant.
#[derive(Debug, Clone)]
pub enum Status {
    /// Matched the reference.
    Ok(Comparison),
    /// Differed from the reference beyond tolerance: not timed.
    Failed(Comparison),
    /// Errored (setup, reference, run or timing): not timed.
    Error(String),
    /// A ceiling measurement, not a kernel.
    Ceiling,
}

/// One line of the table / one object of the JSON array.
#[derive(Debug, Clone)]
pub struct Row {
    /// The op (`matmul`, …; `fma_peak` and `copy_bw` for the ceilings).
    pub op: String,
    /// The variant number.
    pub variant: usize,
    /// What the variant runs.
    pub variant_name: String,
    /// The case dims joined by `x`.
    pub shape: String,
    /// The dtype.
    pub dtype: String,
    /// The device.
    pub device: String,
    /// Validation outcome.
    pub status: Status,
    /// Per-call times (rows that passed).
    pub timing: Option<Timing>,
    /// Achieved GFLOP/s (median time).
    pub gflops: Option<f64>,
    /// Achieved GB/s (median time).
    pub gbps: Option<f64>,
    /// Which ceiling the fraction is of: `"FMA"` or `"copy"`.
    pub ceiling: Option<&'static str>,
    /// Achieved / ceiling.
    pub ceiling_fraction: Option<f64>,
}

impl Row {
    /// A row for `variant` of `kernel` on `case`, not yet timed.
    pub fn new(kernel: &dyn Kernel, variant: &Variant, case: &Case, device: &Device, status: Status) -> Row {
        Row {
            op: kernel.name().to_string(),
            variant: variant.id,
            variant_name: variant.name.to_string(),
            shape: case.label(),
            dtype: case.dtype.to_string(),
            device: device.to_string(),
            status,
            timing: None,
            gflops: None,
            gbps: None,
            ceiling: None,
            ceiling_fraction: None,
        }
    }

    /// Records the timing and derives throughput and the ceiling fraction.
    pub fn set_timing(&mut self, t: Timing, cost: Cost, bound: Bound, dtype: DType, machine: &Machine) {
        let per_s = |x: Option<f64>| x.filter(|_| t.median_s > 0.0).map(|x| x / t.median_s / 1e9);
        self.gflops = per_s(cost.flops);
        self.gbps = per_s(cost.bytes);
        let (achieved, ceiling, name) = match bound {
            Bound::Compute => (self.gflops, machine.peak_gflops(dtype), "FMA"),
            Bound::Memory => (self.gbps, machine.copy_gbps(), "copy"),
        };
        if let (Some(a), Some(c)) = (achieved, ceiling) {
            if c > 0.0 {
                self.ceiling = Some(name);
                self.ceiling_fraction = Some(a / c);
            }
        }
        self.timing = Some(t);
    }

    /// The two CPU ceiling rows.
    pub fn ceilings(c: &Ceilings) -> Vec<Row> {
        let base = |op: &str, name: String, shape: String| Row {
            op: op.to_string(),
            variant: 0,
            variant_name: name,
            shape,
            dtype: "f32".to_string(),
            device: "cpu".to_string(),
            status: Status::Ceiling,
            timing: None,
            gflops: None,
            gbps: None,
            ceiling: None,
            ceiling_fraction: Some(1.0),
        };
        let mut fma = base(
            "fma_peak",
            format!("register-only FMA loop ({})", c.fma_isa),
            format!("{} threads", c.threads),
        );
        fma.gflops = Some(c.fma_gflops);
        fma.ceiling = Some("FMA");
        let mut copy = base("copy_bw", "parallel copy".to_string(), format!("{}MiB", c.copy_bytes >> 20));
        copy.dtype = "-".to_string();
        copy.gbps = Some(c.copy_gbps);
        copy.ceiling = Some("copy");
        vec![fma, copy]
    }

    /// The device-copy ceiling row of a CUDA run.
    #[cfg(feature = "cuda")]
    pub fn device_copy(device: &Device, bytes: usize, gbps: f64) -> Row {
        Row {
            op: "copy_bw".to_string(),
            variant: 0,
            variant_name: "device-to-device memcpy".to_string(),
            shape: format!("{}MiB", bytes >> 20),
            dtype: "u8".to_string(),
            device: device.to_string(),
            status: Status::Ceiling,
            timing: None,
            gflops: None,
            gbps: Some(gbps),
            ceiling: Some("copy"),
            ceiling_fraction: Some(1.0),
        }
    }

    /// Whether the row makes the run fail.
    pub fn is_failure(&self) -> bool {
        matches!(self.status, Status::Failed(_) | Status::Error(_))
    }

    /// The check column: `ok`, `FAILED`, `ERROR` or `ceiling`.
    fn check(&self) -> &'static str {
        match self.status {
            Status::Ok(_) => "ok",
            Status::Failed(_) => "FAILED",
            Status::Error(_) => "ERROR",
            Status::Ceiling => "ceiling",
        }
    }

    /// Why a row failed, in words (empty for passing rows).
    pub fn detail(&self) -> String {
        match &self.status {
            Status::Failed(c) => format!(
                "differs from the reference: element {} off by {:.3e}, {:.1}x the tolerance \
                 (max |err| {:.3e} over {} checked elements)",
                c.worst_index, c.max_abs_err, c.worst_ratio, c.max_abs_err, c.checked
            ),
            Status::Error(e) => e.clone(),
            Status::Ok(_) | Status::Ceiling => String::new(),
        }
    }

    /// One line for progress output.
    pub fn summary(&self) -> String {
        match (&self.status, &self.timing) {
            (Status::Ok(c), Some(t)) => {
                let mut s = format!("ok (err {:.2} of tol), median {}", c.worst_ratio, fmt_time(t.median_s));
                if let Some(g) = self.gflops {
                    s += &format!(", {g:.1} GFLOP/s");
                }
                if let Some(b) = self.gbps {
                    s += &format!(", {b:.1} GB/s");
                }
                if let (Some(f), Some(c)) = (self.ceiling_fraction, self.ceiling) {
                    s += &format!(", {:.1}% of {c}", f * 100.0);
                }
                s
            }
            _ => format!("{}: {}", self.check(), self.detail()),
        }
    }

    /// The row's fields in the documented order.
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let t = self.timing.as_ref();
        let err = match &self.status {
            Status::Ok(c) | Status::Failed(c) => json!(c.max_abs_err),
            _ => Value::Null,
        };
        vec![
            ("op", json!(self.op)),
            ("variant", json!(self.variant)),
            ("shape", json!(self.shape)),
            ("dtype", json!(self.dtype)),
            ("device", json!(self.device)),
            ("median_s", json!(t.map(|t| t.median_s))),
            ("min_s", json!(t.map(|t| t.min_s))),
            ("max_s", json!(t.map(|t| t.max_s))),
            ("gflops", json!(self.gflops)),
            ("gbps", json!(self.gbps)),
            ("ceiling_fraction", json!(self.ceiling_fraction)),
            ("ceiling", json!(self.ceiling)),
            ("variant_name", json!(self.variant_name)),
            ("status", json!(self.check().to_lowercase())),
            ("max_abs_err", err),
            ("error", if self.is_failure() { Value::from(self.detail()) } else { Value::Null }),
        ]
    }
}

/// Everything one run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The machine and its ceilings.
    pub machine: Machine,
    /// The rows, ceilings first.
    pub rows: Vec<Row>,
}

impl Report {
    /// Rows that FAILED or hit an ERROR.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.is_failure()).count()
    }

    /// The header, the table, and one line per failing row.
    pub fn table(&self) -> String {
        let head = [
            "op",
            "v",
            "variant",
            "shape",
            "dtype",
            "device",
            "median",
            "min",
            "max",
            "GFLOP/s",
            "GB/s",
            "of ceiling",
            "check",
        ];
        let right = [false, true, false, false, false, false, true, true, true, true, true, true, false];
        let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let t = r.timing.as_ref();
                let ft = |f: fn(&Timing) -> f64| t.map_or("-".to_string(), |t| fmt_time(f(t)));
                vec![
                    r.op.clone(),
                    r.variant.to_string(),
                    r.variant_name.clone(),
                    r.shape.clone(),
                    r.dtype.clone(),
                    r.device.clone(),
                    ft(|t| t.median_s),
                    ft(|t| t.min_s),
                    ft(|t| t.max_s),
                    opt(r.gflops),
                    opt(r.gbps),
                    match (r.ceiling_fraction, r.ceiling) {
                        (Some(f), Some(c)) => format!("{:.1}% {c}", f * 100.0),
                        _ => "-".to_string(),
                    },
                    r.check().to_string(),
                ]
            })
            .collect();
        let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: &[String]| {
            let parts: Vec<String> = row
                .iter()
                .zip(&width)
                .zip(&right)
                .map(|((c, &w), &r)| {
                    let pad = " ".repeat(w - c.chars().count());
                    if r {
                        format!("{pad}{c}")
                    } else {
                        format!("{c}{pad}")
                    }
                })
                .collect();
            format!("| {} |", parts.join(" | "))
        };
        let mut s = self.machine.header();
        s.push('\n');
        s += &line(&head.map(String::from));
        s.push('\n');
        // A markdown separator: `---:` marks right-aligned columns.
        let rule: Vec<String> = width
            .iter()
            .zip(&right)
            .map(|(&w, &r)| if r { format!("{}:", "-".repeat(w + 1)) } else { "-".repeat(w + 2) })
            .collect();
        s += &format!("|{}|\n", rule.join("|"));
        for row in &cells {
            s += &line(row);
            s.push('\n');
        }
        for r in self.rows.iter().filter(|r| r.is_failure()) {
            s += &format!(
                "{} {} variant {} ({}): {}: {}\n",
                r.op,
                r.shape,
                r.variant,
                r.variant_name,
                r.check(),
                r.detail()
            );
        }
        s
    }

    /// The rows as a JSON array of objects, one per line, with the keys op, variant, shape, dtype,
    /// device, median_s, min_s, max_s, gflops, gbps, ceiling_fraction, then ceiling,
    /// variant_name, status, max_abs_err and error, in that order (`null` where a value does not
    /// apply).
    pub fn json_text(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let kv: Vec<String> = r.fields().iter().map(|(k, v)| format!("{}: {v}", json!(k))).collect();
                format!("  {{{}}}", kv.join(", "))
            })
            .collect();
        format!("[\n{}\n]\n", rows.join(",\n"))
    }
}

/// `cpu`, or `cuda:0 (GPU name (sm_XY))`.
fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu => device.to_string(),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => format!("{device} ({})", super::cuda::describe(device)),
    }
}

/// A time with a readable unit.
pub fn fmt_time(s: f64) -> String {
    if s < 1e-6 {
        format!("{:.1} ns", s * 1e9)
    } else if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

/// The CPU model from /proc/cpuinfo (`model name` on x86, implementer/part on ARM), or the
/// architecture when it cannot be read.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    if let Some(m) = field("model name") {
        return m;
    }
    match (field("CPU implementer"), field("CPU part")) {
        (Some(i), Some(p)) => format!("{} CPU implementer {i} part {p}", std::env::consts::ARCH),
        _ => std::env::consts::ARCH.to_string(),
    }
}

/// The 1-minute load average, where /proc/loadavg exists.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_format() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_722), (2023, 12, 31));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(fmt_time(2.5e-3), "2.50 ms");
        assert_eq!(fmt_time(1.5e-7), "150.0 ns");
        assert_eq!(fmt_time(12.0), "12.000 s");
    }
}
