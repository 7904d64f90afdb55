//! The `moeba` binary end to end, on tiny models (`--set` shrinks the embedded default): train →
//! checkpoint → generate → eval → inspect (config and checkpoint) → experts on an arithmetic MoE
//! run, and the errors a user can cause (exit status ≠ 0, a clear one-line message, no panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_moeba");

/// Overrides that shrink the default tiny-hybrid to a 2-layer, 32-wide Mamba + attention/MoE model.
const TINY: &[&str] = &[
    "model.num_layers=2",
    "model.layer_mixers=[\"mamba\", \"attention\"]",
    "model.moe_layers=[1]",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.moe_intermediate_size=32",
    "model.num_experts=4",
    "model.max_seq_len=64",
    "trainer.seq_len=32",
    "trainer.batch_size=4",
    "trainer.max_steps=20",
    "trainer.warmup_steps=5",
    "trainer.eval_every=10",
    "trainer.eval_steps=2",
    "trainer.log_every=5",
];

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moeba-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn moeba(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("cannot run the moeba binary")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs and requires success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = moeba(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "moeba {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout
}

/// Runs and requires a clean failure (exit status 1, an `error:` line, no panic); returns stderr.
fn fails(args: &[&str]) -> String {
    let out = moeba(args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "moeba {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    stderr
}

fn train_tiny(dir: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&str> = vec!["train", "--no-progress", "--out", dir.to_str().unwrap()];
    for s in TINY.iter().chain(extra) {
        args.push("--set");
        args.push(s);
    }
    ok(&args)
}

#[test]
fn train_generate_eval_inspect() {
    let dir = temp_dir("run");
    let stdout = train_tiny(&dir, &[]);
    // The plan, the eval lines and the summary.
    for want in ["tiny-hybrid", "layers:", "mamba", "attention", "moe (4 × 32, top-2", "parameters:", "val "]
    {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    for want in ["validation: loss", "bits/byte", "tokens/s", "run dir:", "checkpoint:"] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    assert!(stdout.lines().filter(|l| l.starts_with("step ")).count() >= 4, "{stdout}");
    for f in [
        "metrics.jsonl",
        "config.toml",
        "checkpoints/step-000020/model.safetensors",
        "checkpoints/best/state.json",
    ] {
        assert!(dir.join(f).exists(), "{f} missing in {}", dir.display());
    }
    let d = dir.to_str().unwrap();

    // generate: the prompt, then the new text, streamed.
    let out =
        ok(&["generate", "--checkpoint", d, "--prompt", "KING:", "--max-new-tokens", "30", "--seed", "3"]);
    assert!(out.starts_with("KING:"), "{out:?}");
    assert!(out.len() > "KING:".len() + 1, "nothing generated: {out:?}");
    let again =
        ok(&["generate", "--checkpoint", d, "--prompt", "KING:", "--max-new-tokens", "30", "--seed", "3"]);
    assert_eq!(out, again, "the same seed must give the same text");
    let greedy =
        ok(&["generate", "--checkpoint", d, "--max-new-tokens", "8", "--temperature", "0", "--top-k", "5"]);
    assert!(!greedy.is_empty());

    // eval: loss, ppl, bpb on the run's validation split.
    let out = ok(&["eval", "--checkpoint", d, "--steps", "2"]);
    let line = out.lines().find(|l| l.starts_with("loss ")).unwrap_or_else(|| panic!("{out}"));
    let nums: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 3, "{line}");
    let (loss, ppl, bpb) = (nums[0], nums[1], nums[2]);
    assert!(loss.is_finite() && loss > 0.0, "{line}");
    assert!((ppl.ln() - loss).abs() < 1e-2 * loss.max(1.0), "{line}");
    assert!((bpb - loss / std::f64::consts::LN_2).abs() < 1e-3 * bpb.max(1.0), "{line}");

    // inspect a checkpoint (and measure), and a config.
    let out = ok(&["inspect", d, "--context", "64", "--measure"]);
    for want in ["checkpoint", "layers:", "parameters:", "none", "mixer", "block", "measured", "at 64 tokens"]
    {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let out = ok(&["inspect", "jamba-like", "--context", "2048"]);
    assert!(out.contains("jamba-like") && out.contains("at 2048 tokens"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("attention (")).count(), 2, "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("moe (")).count(), 4, "{out}");

    // --resume continues from the last checkpoint up to the new max_steps.
    let mut args: Vec<&str> = vec!["train", "--no-progress", "--resume", "--out", d];
    for s in TINY.iter().chain(&["trainer.max_steps=25"]) {
        args.push("--set");
        args.push(s);
    }
    let out = ok(&args);
    assert!(out.contains("resuming") && out.contains("step-000025"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn experts_on_arithmetic() {
    let dir = temp_dir("experts");
    train_tiny(&dir, &["trainer.dataset=arithmetic"]);
    let plots = dir.join("plots");
    let out = ok(&["experts", dir.to_str().unwrap(), "--tokens", "600", "--out", plots.to_str().unwrap()]);
    for want in
        ["routed 600 tokens", "layer 1 (4 experts)", "usage", "digits", "task +", "task -", "top tokens"]
    {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // Purity of the operator positions is a percentage.
    for op in ["+", "-"] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("purity of `{op}`")))
            .unwrap_or_else(|| panic!("no purity of {op}:\n{out}"));
        let pct: f64 =
            line.split(':').nth(1).and_then(|s| s.trim().split('%').next()).unwrap().parse().unwrap();
        assert!((0.0..=100.0).contains(&pct), "{line}");
    }
    for f in
        ["experts_usage.png", "experts_usage.svg", "experts_classes_layer1.png", "experts_classes_layer1.svg"]
    {
        assert!(plots.join(f).exists(), "{f} missing");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn user_errors_are_clear() {
    // An unknown key, on the command line and in a file, is named.
    let e = fails(&["train", "--set", "model.hiden_size=3"]);
    assert!(e.contains("model.hiden_size") && e.contains("unknown"), "{e}");
    let dir = temp_dir("errors");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[model]\nhiden_size = 3\n").unwrap();
    let e = fails(&["train", bad.to_str().unwrap()]);
    assert!(e.contains("bad.toml") && e.contains("hiden_size"), "{e}");
    // An invalid combination names the key.
    let e = fails(&["inspect", "tiny-hybrid", "--set", "model.experts_per_tok=9"]);
    assert!(e.contains("model.experts_per_tok") && e.contains("num_experts"), "{e}");
    // A config that is neither a file nor a shipped name lists the shipped ones.
    let e = fails(&["train", "no-such-config"]);
    assert!(e.contains("no-such-config") && e.contains("tiny-hybrid"), "{e}");
    // A malformed override.
    let e = fails(&["train", "--set", "trainer.max_steps"]);
    assert!(e.contains("key=value"), "{e}");
    // Missing and empty checkpoint directories.
    let e = fails(&["generate", "--checkpoint", "/nonexistent-moeba-run"]);
    assert!(e.contains("/nonexistent-moeba-run"), "{e}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for cmd in
        [vec!["eval", "--checkpoint"], vec!["experts"], vec!["inspect"], vec!["generate", "--checkpoint"]]
    {
        let mut args = cmd.clone();
        args.push(empty.to_str().unwrap());
        let e = fails(&args);
        assert!(e.contains("empty") && e.contains("checkpoint"), "{args:?}: {e}");
    }
    // Bad arguments are clap's: status 2 with usage.
    let out = moeba(&["generate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--checkpoint"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_the_commands() {
    let out = ok(&["--help"]);
    for cmd in ["train", "generate", "eval", "inspect", "experts"] {
        assert!(out.contains(cmd), "{out}");
    }
    let out = ok(&["train", "--help"]);
    assert!(out.contains("--set") && out.contains("--resume") && out.contains("jamba-like"), "{out}");
}
