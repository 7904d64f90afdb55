//! `cargo xtask`: moeba's developer commands.
//!
//! - `cargo xtask bench [KERNEL[,KERNEL…]] [--variant N] [--device cpu|cuda] [--json FILE]
//!   [--quick] [--repeats N] [--list]`: kernel microbenchmarks. Every variant is first validated
//!   against a reference on the same inputs, then timed (warm-up, median of repeats); the table
//!   gives time, GFLOP/s, GB/s and the fraction of the FMA peak or copy bandwidth measured in the
//!   same run. Exits non-zero when a variant FAILED validation or errored. See [`bench`].
//! - `cargo xtask gpu-bundle [DIR]`: builds the test and bench binaries with `--features cuda`
//!   and copies them with a run script into DIR (default `gpu-run`). See [`gpu_bundle`].
//!
//! Sits on top of the workspace: depends on moeba-tensor and moeba-kernels, nothing depends on it.

mod bench;
mod gpu_bundle;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use bench::harness::Size;
use bench::{DeviceKind, Options};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  bench [KERNEL[,KERNEL...]] [options]
        kernel microbenchmarks: validate every variant against its reference, then time it
        --variant N            only variant N
        --device cpu|cuda      where to run (default cpu; cuda needs `--features cuda`)
        --json FILE            also write the rows as a JSON array
        --quick                small shapes and few repeats (a smoke test, seconds)
        --tiny                 tiny shapes (checks the harness and the kernels' validation)
        --repeats N            timed samples per row (default 11, --quick 3)
        --list                 list the kernels, their variants and shapes, and exit
  gpu-bundle [DIR]
        build test and bench binaries with `--features cuda` into DIR (default gpu-run)
        with a run script, for a GPU machine without a Rust toolchain
  help  this text
";

/// Parses the arguments after `bench`.
fn parse_bench(args: &[String]) -> Result<(Options, bool)> {
    let mut opts = Options::default();
    let mut list = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--variant" => {
                let v = value("--variant")?;
                opts.variant = Some(v.parse().with_context(|| format!("--variant: `{v}` is not a number"))?);
            }
            "--device" => opts.device = DeviceKind::parse(&value("--device")?)?,
            "--json" => opts.json = Some(PathBuf::from(value("--json")?)),
            "--repeats" => {
                let v = value("--repeats")?;
                opts.repeats = Some(v.parse().with_context(|| format!("--repeats: `{v}` is not a number"))?);
            }
            "--quick" => opts.size = Size::Quick,
            "--tiny" => opts.size = Size::Tiny,
            "--list" => list = true,
            s if s.starts_with('-') => bail!("bench: unknown option `{s}`\n\n{USAGE}"),
            s => opts.kernels.extend(s.split(',').filter(|k| !k.is_empty()).map(String::from)),
        }
    }
    Ok((opts, list))
}

fn run_bench(args: &[String]) -> Result<ExitCode> {
    let (opts, list) = parse_bench(args)?;
    let all = bench::kernels::all();
    if list {
        print!("{}", bench::list(&all));
        return Ok(ExitCode::SUCCESS);
    }
    let report = bench::run(&opts, &all)?;
    println!("{}", report.table());
    if let Some(path) = &opts.json {
        std::fs::write(path, report.json_text()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} rows to {}", report.rows.len(), path.display());
    }
    let failures = report.failures();
    if failures > 0 {
        eprintln!("{failures} row(s) FAILED validation or errored");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => run_bench(&args[1..]),
        Some("gpu-bundle") => {
            let dir = args.get(1).map_or_else(|| gpu_bundle::workspace_root().join("gpu-run"), PathBuf::from);
            gpu_bundle::gpu_bundle(&dir).map(|()| ExitCode::SUCCESS)
        }
        Some("help" | "--help" | "-h") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_bench_arguments() -> Result<()> {
        let (o, list) = parse_bench(&args("matmul,add --variant 1 --json out.json --quick --repeats 5"))?;
        assert_eq!(o.kernels, ["matmul", "add"]);
        assert_eq!((o.variant, o.repeats, o.size, list), (Some(1), Some(5), Size::Quick, false));
        assert_eq!(o.json, Some(PathBuf::from("out.json")));
        assert_eq!(o.device, DeviceKind::Cpu);
        assert_eq!(parse_bench(&args("--device cuda --list"))?.0.device, DeviceKind::Cuda);
        assert!(parse_bench(&args("--device tpu")).is_err());
        assert!(parse_bench(&args("--variant x")).is_err());
        assert!(parse_bench(&args("--json")).is_err());
        assert!(parse_bench(&args("--frobnicate")).is_err());
        Ok(())
    }
}
