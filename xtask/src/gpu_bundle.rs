//! `cargo xtask gpu-bundle [DIR]`: builds the test and benchmark binaries with `--features cuda`
//! and copies them, with a run script, into DIR (default `gpu-run/`, git-ignored), so that they
//! can run on a GPU machine that has no Rust toolchain.
//!
//! The binaries link no CUDA library (cudarc loads libcuda and cuBLAS at run time), so the bundle
//! only needs a driver on the GPU machine. Building needs nvcc (see the kernels' build script).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// One executable cargo built: where it is and the name it gets in the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Path of the built executable.
    pub path: PathBuf,
    /// `<package>-<target>` (the target's kind for library unit tests).
    pub name: String,
}

/// The package name in a cargo `package_id`, old (`name 0.1.0 (path+file://…)`) or new
/// (`path+file:///…/dir#name@0.1.0`) format.
fn package_name(id: &str) -> String {
    match id.rsplit_once('#') {
        Some((url, rest)) => {
            let name = rest.split('@').next().unwrap_or(rest);
            // `…/crates/tensor#0.1.0` (directory name = package name) has no name before `@`.
            if name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                url.rsplit('/').next().unwrap_or(name).to_string()
            } else {
                name.to_string()
            }
        }
        None => id.split(' ').next().unwrap_or(id).to_string(),
    }
}

/// The executables in cargo's `--message-format=json` output; with `kind`, only targets of that
/// kind (`test` selects test harnesses of any target, `bench` bench targets, `bin` binaries).
pub fn executables(messages: &str, kind: &str) -> Vec<Artifact> {
    let mut out: Vec<Artifact> = Vec::new();
    for line in messages.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else { continue };
        let package = package_name(v["package_id"].as_str().unwrap_or("unknown"));
        let target = v["target"]["name"].as_str().unwrap_or("bin");
        let target_kind = v["target"]["kind"][0].as_str().unwrap_or("");
        let is_test = v["profile"]["test"] == true;
        let wanted = match kind {
            "test" => is_test,
            "bench" => is_test && target_kind == "bench",
            _ => !is_test && target_kind == kind,
        };
        if !wanted {
            continue;
        }
        let kind = target_kind;
        let name = if kind == "lib" || target.replace('-', "_") == package.replace('-', "_") {
            format!("{package}-{kind}")
        } else {
            format!("{package}-{target}")
        };
        if !out.iter().any(|a| a.path == Path::new(exe)) {
            out.push(Artifact { path: PathBuf::from(exe), name });
        }
    }
    out
}

/// Runs `cargo args…` in the workspace root and returns its JSON messages.
fn cargo_json(args: &[&str]) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("running: cargo {}", args.join(" "));
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{cargo}`"))?;
    if !out.status.success() {
        bail!("`cargo {}` failed ({}); see the messages above", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const RUN_SH: &str = r#"#!/bin/sh
# moeba GPU bundle: runs the CUDA-enabled tests and the kernel benchmarks on this machine.
# Needs an NVIDIA driver (libcuda; cuBLAS for matmul); no Rust toolchain.
#   ./run.sh            tests, then `xtask bench --device cuda` (rows in bench-cuda.json)
#   ./run.sh tests      tests only
#   ./run.sh bench [ARGS]  `xtask bench --device cuda ARGS` only
#   ./run.sh criterion  the criterion benches (CPU)
set -u
cd "$(dirname "$0")"
what="${1:-all}"
[ $# -gt 0 ] && shift
fail=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    for t in tests/*; do
        echo "=== $t"
        "$t" || { echo "FAILED: $t"; fail=1; }
    done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "=== xtask bench --device cuda $*"
    ./bin/xtask bench --device cuda --json bench-cuda.json "$@" || fail=1
fi
if [ "$what" = criterion ]; then
    for b in benches/*; do
        echo "=== $b"
        "$b" --bench || fail=1
    done
fi
exit $fail
"#;

/// Builds everything and fills `dir` (created if needed): `tests/`, `benches/`, `bin/xtask`,
/// `run.sh`.
pub fn gpu_bundle(dir: &Path) -> Result<()> {
    let tests = executables(
        &cargo_json(&["test", "--workspace", "--features", "cuda", "--no-run", "--message-format=json"])?,
        "test",
    );
    let benches = executables(
        &cargo_json(&[
            "bench",
            "-p",
            "moeba-benches",
            "--features",
            "cuda",
            "--no-run",
            "--message-format=json",
        ])?,
        "bench",
    );
    let xtask = executables(
        &cargo_json(&["build", "-p", "xtask", "--release", "--features", "cuda", "--message-format=json"])?,
        "bin",
    );
    let Some(xtask) = xtask.into_iter().find(|a| a.path.file_stem().is_some_and(|s| s == "xtask")) else {
        bail!("cargo built no xtask executable");
    };
    for sub in ["tests", "benches", "bin"] {
        let d = dir.join(sub);
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("clearing {}", d.display()))?;
        }
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let copy = |a: &Artifact, to: PathBuf| -> Result<()> {
        std::fs::copy(&a.path, &to)
            .with_context(|| format!("copying {} to {}", a.path.display(), to.display()))?;
        eprintln!("  {}", to.display());
        Ok(())
    };
    // Bench targets also appear (built as tests) in `cargo test --no-run`; keep them apart.
    for a in &tests {
        let bench = benches.iter().any(|b| b.name == a.name);
        let sub = if bench { "benches" } else { "tests" };
        copy(a, dir.join(sub).join(&a.name))?;
    }
    for a in benches.iter().filter(|b| !tests.iter().any(|t| t.name == b.name)) {
        copy(a, dir.join("benches").join(&a.name))?;
    }
    copy(&xtask, dir.join("bin").join("xtask"))?;
    let script = dir.join("run.sh");
    std::fs::write(&script, RUN_SH).with_context(|| format!("writing {}", script.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    eprintln!(
        "bundle ready in {}: {} test binaries, {} bench binaries; copy the folder to a GPU machine and run ./run.sh",
        dir.display(),
        tests.len(),
        benches.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables_in_cargo_messages() {
        let msgs = [
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/kernels#moeba-kernels@0.1.0","target":{"name":"cpu_matmul","kind":["test"]},"profile":{"test":true},"executable":"/t/debug/deps/cpu_matmul-abc"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/tensor#0.1.0","target":{"name":"moeba_tensor","kind":["lib"]},"profile":{"test":true},"executable":"/t/debug/deps/moeba_tensor-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"moeba-nn 0.1.0 (path+file:///w/crates/nn)","target":{"name":"moeba_nn","kind":["lib"]},"profile":{"test":true},"executable":null}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/kernels#moeba-kernels@0.1.0","target":{"name":"matmul_peak","kind":["example"]},"profile":{"test":false},"executable":"/t/debug/examples/matmul_peak"}"#,
            r#"{"reason":"build-finished","success":true}"#,
            "not json",
        ]
        .join("\n");
        assert_eq!(executables(&msgs, "example").len(), 1);
        assert!(executables(&msgs, "bench").is_empty());
        let a = executables(&msgs, "test");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].name, "moeba-kernels-cpu_matmul");
        assert_eq!(a[1].name, "tensor-lib");
        assert_eq!(package_name("moeba-nn 0.1.0 (path+file:///w/crates/nn)"), "moeba-nn");
    }
}
