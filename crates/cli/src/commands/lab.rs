//! `moeba lab NAME`: runs one of moeba's measured experiments and prints where its report went.

use std::path::PathBuf;

use anyhow::{Context, Result};
use moeba_lab::{LabDevice, LabOptions};

/// Reads a byte count: a plain number, or one with a binary suffix `K`, `M`, `G`, `T`
/// (optionally followed by `i`/`iB`/`B`), e.g. `8G`, `512MiB`, `1.5G`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let num_end = upper.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(upper.len());
    let (num, unit) = upper.split_at(num_end);
    let shift = match unit.trim_end_matches('B').trim_end_matches('I') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{s}`: expected a size such as 8G, 512M or 1000000 (bytes)")),
    };
    let v: f64 =
        num.parse().map_err(|_| format!("`{s}`: expected a size such as 8G, 512M or 1000000 (bytes)"))?;
    let bytes = v * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{s}`: the size is out of range"));
    }
    Ok(bytes as u64)
}

/// Splits `--set key=value` arguments.
fn overrides(set: &[String]) -> Result<Vec<(String, String)>> {
    set.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--set {kv}: expected KEY=VALUE"))
        })
        .collect()
}

/// Runs lab `name` (see `moeba lab --help`).
pub fn run(
    name: &str,
    out: Option<PathBuf>,
    quick: bool,
    device: &str,
    mem_budget: u64,
    set: &[String],
    no_progress: bool,
) -> Result<()> {
    let mut opts = LabOptions::new(out.unwrap_or_else(|| PathBuf::from(format!("runs/lab-{name}"))));
    opts.quick = quick;
    opts.device = match device {
        "cpu" => LabDevice::Cpu,
        "cuda" => LabDevice::Cuda,
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    };
    opts.mem_budget = mem_budget;
    opts.overrides = overrides(set)?;
    opts.progress = !no_progress;
    let t0 = std::time::Instant::now();
    let run = moeba_lab::run_lab(name, &opts).with_context(|| format!("lab `{name}` failed"))?;
    println!(
        "lab `{name}` finished in {:.1} s: report {}, results {}, {} files in {}",
        t0.elapsed().as_secs_f64(),
        run.dir.join("report.md").display(),
        run.dir.join("results.json").display(),
        run.files.len(),
        run.dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2TB"), Ok(2 << 40));
        assert!(parse_bytes("8X").is_err());
        assert!(parse_bytes("G").is_err());
        assert!(parse_bytes("-1G").is_err());
        assert!(overrides(&["a=1".into(), "b = x".into()]).is_ok());
        assert!(overrides(&["novalue".into()]).is_err());
    }
}
