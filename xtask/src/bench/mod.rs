//! `cargo xtask bench`: kernel microbenchmarks with a roofline column.
//!
//! For every selected kernel, case and variant: validate against the reference, then time
//! (warm-up, median of repeats), and report time, GFLOP/s, GB/s and the fraction of the
//! machine's ceiling measured in the same run ([`ceiling`]). A variant that does not match its
//! reference, or that errors, is reported (FAILED / ERROR) instead of timed, and makes the run
//! fail. The kernels are listed in [`kernels::all`]; the contract they meet is
//! [`harness::Kernel`].

pub mod ceiling;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod harness;
pub mod kernels;
pub mod report;
pub mod timing;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use moeba_tensor::Device;

use ceiling::Ceilings;
use harness::{compare_all, Bound, Case, Kernel, Size};
use report::{Machine, Report, Row, Status};
use timing::Plan;

/// Where the kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU (rayon threads).
    Cpu,
    /// CUDA device 0 (needs the `cuda` feature).
    Cuda,
}

impl DeviceKind {
    /// Parses `cpu` or `cuda`.
    pub fn parse(s: &str) -> Result<DeviceKind> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda),
            _ => bail!("--device: expected `cpu` or `cuda`, got `{s}`"),
        }
    }
}

/// What `cargo xtask bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kernel names to run (empty: all).
    pub kernels: Vec<String>,
    /// Only this variant.
    pub variant: Option<usize>,
    /// The device.
    pub device: DeviceKind,
    /// Write the rows as JSON here.
    pub json: Option<PathBuf>,
    /// Shape list and effort.
    pub size: Size,
    /// Override the number of timed samples.
    pub repeats: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kernels: Vec::new(),
            variant: None,
            device: DeviceKind::Cpu,
            json: None,
            size: Size::Full,
            repeats: None,
        }
    }
}

/// The timing plan for a size (`repeats` overrides the sample count).
pub fn plan(size: Size, repeats: Option<usize>) -> Plan {
    let p = match size {
        Size::Full => Plan { warmup_s: 0.1, warmup_calls: 2, samples: 11, sample_s: 0.02 },
        Size::Quick => Plan { warmup_s: 0.005, warmup_calls: 1, samples: 3, sample_s: 0.002 },
        Size::Tiny => Plan { warmup_s: 0.0, warmup_calls: 1, samples: 2, sample_s: 0.0 },
    };
    Plan { samples: repeats.unwrap_or(p.samples).max(1), ..p }
}

/// The kernels `opts` selects, checked against their variants.
fn select<'k>(opts: &Options, all: &'k [Box<dyn Kernel>]) -> Result<Vec<&'k dyn Kernel>> {
    let names = || all.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
    let mut chosen: Vec<&dyn Kernel> = Vec::new();
    if opts.kernels.is_empty() {
        chosen.extend(all.iter().map(|k| k.as_ref()));
    } else {
        for name in &opts.kernels {
            match all.iter().find(|k| k.name() == name) {
                Some(k) => chosen.push(k.as_ref()),
                None => bail!("unknown kernel `{name}`; the kernels are: {}", names()),
            }
        }
    }
    if let Some(v) = opts.variant {
        let has = |k: &dyn Kernel| k.variants().iter().any(|x| x.id == v);
        if !opts.kernels.is_empty() {
            if let Some(k) = chosen.iter().find(|k| !has(**k)) {
                let ids: Vec<String> = k.variants().iter().map(|x| x.id.to_string()).collect();
                bail!("kernel `{}` has no variant {v}; its variants are {}", k.name(), ids.join(", "));
            }
        }
        chosen.retain(|k| has(*k));
        if chosen.is_empty() {
            bail!("no kernel has a variant {v}");
        }
    }
    Ok(chosen)
}

/// The lines of `cargo xtask bench --list`: each kernel, its variants and its full cases.
pub fn list(all: &[Box<dyn Kernel>]) -> String {
    let mut s = String::new();
    for k in all {
        let cases: Vec<String> = k.cases(Size::Full).iter().map(Case::label).collect();
        let bound = match k.bound() {
            Bound::Compute => "FMA peak",
            Bound::Memory => "copy bandwidth",
        };
        s += &format!("{}  (judged against the {bound}; shapes {})\n", k.name(), cases.join(", "));
        for v in k.variants() {
            let dev = if v.cuda { "" } else { "  [cpu only]" };
            s += &format!("  {}: {}{dev}\n", v.id, v.name);
        }
    }
    s
}

/// Opens the device of `kind`, with a clear error when this build cannot.
fn open_device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => cuda::open(),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => bail!(
            "--device cuda: this xtask was built without CUDA support. HINT: build it with the `cuda` \
             feature: `cargo run -p xtask --release --features cuda -- bench --device cuda` (needs nvcc; \
             or run `cargo xtask gpu-bundle` and copy the bundle to a GPU machine)"
        ),
    }
}

/// Waits for queued work on `device` (nothing to wait for on the CPU).
fn sync(device: &Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::sync(device),
    }
}

/// Runs the benchmarks `opts` selects from `all` and returns the report (it does not print or
/// write anything but progress lines on stderr).
pub fn run(opts: &Options, all: &[Box<dyn Kernel>]) -> Result<Report> {
    let chosen = select(opts, all)?;
    let device = open_device(opts.device)?;
    let mut machine = Machine::describe(&device);
    if let Some(load) = machine.load.filter(|&l| l >= 1.0) {
        eprintln!("warning: load average {load:.2}: other work is running, the timings will be disturbed");
    }
    let mut rows = Vec::new();
    match &device {
        Device::Cpu => {
            eprintln!("measuring the ceilings on {} threads...", rayon::current_num_threads());
            let c = Ceilings::measure(opts.size);
            rows.extend(Row::ceilings(&c));
            machine.ceilings = Some(c);
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let bytes = if opts.size == Size::Full { 1 << 30 } else { 64 << 20 };
            let gbps = cuda::copy_bandwidth(&device, bytes)?;
            rows.push(Row::device_copy(&device, bytes, gbps));
            machine.device_copy_gbps = Some(gbps);
        }
    }
    let plan = plan(opts.size, opts.repeats);
    for kernel in chosen {
        for case in kernel.cases(opts.size) {
            bench_case(kernel, &case, opts, &device, &machine, &plan, &mut rows)?;
        }
    }
    Ok(Report { machine, rows })
}

/// Validates and times every selected variant of `kernel` on `case`, appending one row each.
fn bench_case(
    kernel: &dyn Kernel,
    case: &Case,
    opts: &Options,
    device: &Device,
    machine: &Machine,
    plan: &Plan,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let variants: Vec<_> = kernel
        .variants()
        .into_iter()
        .filter(|v| opts.variant.is_none_or(|id| id == v.id))
        .filter(|v| device.is_cpu() || v.cuda)
        .collect();
    if variants.is_empty() {
        return Ok(());
    }
    let label = format!("{} {} {}", kernel.name(), case.label(), case.dtype);
    let inputs = match kernel.setup(case, device) {
        Ok(x) => x,
        Err(e) => {
            for v in &variants {
                rows.push(Row::new(kernel, v, case, device, Status::Error(format!("setup: {e:#}"))));
            }
            return Ok(());
        }
    };
    let host = kernels::on_device(&inputs, &Device::Cpu).context("copying inputs to the host")?;
    let mut references: HashMap<usize, Result<Vec<harness::Expected>, String>> = HashMap::new();
    for v in &variants {
        eprint!("{label} variant {}: ", v.id);
        let key = kernel.reference_key(v.id);
        let expected = references
            .entry(key)
            .or_insert_with(|| kernel.reference(v.id, case, &host).map_err(|e| format!("reference: {e:#}")));
        let status = match expected {
            Err(e) => Status::Error(e.clone()),
            Ok(expected) => match kernel.run(v.id, &inputs).and_then(|out| compare_all(&out, expected)) {
                Err(e) => Status::Error(format!("{e:#}")),
                Ok(c) if c.passed() => Status::Ok(c),
                Ok(c) => Status::Failed(c),
            },
        };
        let mut row = Row::new(kernel, v, case, device, status);
        if let Status::Ok(_) = row.status {
            let t = timing::time(plan, || kernel.run(v.id, &inputs).map(drop), &|| sync(device));
            match t {
                Ok(t) => row.set_timing(t, kernel.cost(v.id, case), kernel.bound(), case.dtype, machine),
                Err(e) => row.status = Status::Error(format!("while timing: {e:#}")),
            }
        }
        eprintln!("{}", row.summary());
        rows.push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::harness::{Cost, Expected, Variant};
    use super::*;
    use moeba_tensor::Tensor;

    /// A kernel whose variant 1 is wrong by one element and variant 2 errors, to check that the
    /// harness reports FAILED / ERROR and does not time them.
    struct Broken;

    impl Kernel for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn variants(&self) -> Vec<Variant> {
            vec![Variant::any(0, "right"), Variant::any(1, "off by one element"), Variant::any(2, "errors")]
        }
        fn cases(&self, _size: Size) -> Vec<Case> {
            vec![Case::f32(&[4])]
        }
        fn bound(&self) -> Bound {
            Bound::Memory
        }
        fn cost(&self, _variant: usize, _case: &Case) -> Cost {
            Cost { flops: None, bytes: Some(32.0) }
        }
        fn setup(&self, _case: &Case, device: &Device) -> Result<Vec<Tensor>> {
            Ok(vec![Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], 4, device)?])
        }
        fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
            let mut v = inputs[0].to_vec::<f32>()?;
            match variant {
                0 => {}
                1 => v[2] += 0.5,
                _ => bail!("this variant always errors"),
            }
            Ok(vec![Tensor::from_vec(v, 4, &Device::Cpu)?])
        }
        fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
            Ok(vec![Expected::all(&case.dims, inputs[0].to_vec_f64()?, 1e-6, 0.0)])
        }
    }

    #[test]
    fn wrong_and_erroring_variants_are_reported_not_timed() -> Result<()> {
        let all: Vec<Box<dyn Kernel>> = vec![Box::new(Broken)];
        let opts = Options { size: Size::Tiny, ..Options::default() };
        let report = run(&opts, &all)?;
        let kernel_rows: Vec<&Row> = report.rows.iter().filter(|r| r.op == "broken").collect();
        assert_eq!(kernel_rows.len(), 3);
        assert!(matches!(kernel_rows[0].status, Status::Ok(_)) && kernel_rows[0].timing.is_some());
        assert!(matches!(kernel_rows[1].status, Status::Failed(_)) && kernel_rows[1].timing.is_none());
        assert!(matches!(kernel_rows[2].status, Status::Error(_)) && kernel_rows[2].timing.is_none());
        assert_eq!(report.failures(), 2);
        let table = report.table();
        assert!(table.contains("FAILED") && table.contains("ERROR"), "{table}");
        Ok(())
    }

    #[test]
    fn selection_checks_names_and_variants() {
        let all = kernels::all();
        let pick = |k: &[&str], v: Option<usize>| {
            let opts = Options {
                kernels: k.iter().map(|s| s.to_string()).collect(),
                variant: v,
                ..Options::default()
            };
            select(&opts, &all).map(|ks| ks.iter().map(|k| k.name()).collect::<Vec<_>>())
        };
        assert_eq!(pick(&["matmul"], None).ok(), Some(vec!["matmul"]));
        assert!(pick(&["nope"], None).unwrap_err().to_string().contains("matmul"));
        assert!(pick(&["softmax"], Some(7)).is_err());
        // Without a kernel name, --variant keeps the kernels that have it.
        let with2 = pick(&[], Some(2)).unwrap_or_default();
        assert!(with2.contains(&"matmul") && with2.contains(&"sum") && !with2.contains(&"softmax"));
    }

    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        if cfg!(feature = "cuda") {
            return;
        }
        let opts = Options { device: DeviceKind::Cuda, size: Size::Tiny, ..Options::default() };
        let err = run(&opts, &kernels::all()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("--features cuda"), "{err}");
    }

    /// `--quick`-like run of every real kernel on tiny shapes: every variant must validate.
    #[test]
    fn every_kernel_validates_on_tiny_shapes() -> Result<()> {
        let opts = Options { size: Size::Tiny, ..Options::default() };
        let report = run(&opts, &kernels::all())?;
        let bad: Vec<String> = report
            .rows
            .iter()
            .filter(|r| r.is_failure())
            .map(|r| format!("{} v{}: {}", r.op, r.variant, r.summary()))
            .collect();
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        let json: serde_json::Value = serde_json::from_str(&report.json_text())?;
        let rows = json.as_array().map(|a| a.len()).unwrap_or(0);
        assert_eq!(rows, report.rows.len());
        for key in [
            "op",
            "variant",
            "shape",
            "dtype",
            "device",
            "median_s",
            "min_s",
            "max_s",
            "gflops",
            "gbps",
            "ceiling_fraction",
        ] {
            assert!(json[0].get(key).is_some(), "missing {key}");
        }
        Ok(())
    }
}
