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

/// `../shared/fixtures/hf/{family}`: transformers-made model directories with expected outputs.
fn hf_fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/hf").join(family)
}

fn read_safetensors(path: &Path) -> std::collections::HashMap<String, moeba_tensor::Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    moeba_nn::safetensors_io::deserialize(&bytes, &moeba_tensor::Device::Cpu).unwrap()
}

/// The rows of an integer tensor `(b, l)` as `1,2,3;4,5,6`.
fn id_rows(t: &moeba_tensor::Tensor) -> String {
    let l = t.dims()[1];
    let v: Vec<u32> = t.to_dtype(moeba_tensor::DType::U32).unwrap().to_vec().unwrap();
    v.chunks(l)
        .map(|r| r.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(";")
}

#[test]
fn hf_logits_and_greedy_generation_match_transformers() {
    let dir = temp_dir("hf-logits");
    std::fs::create_dir_all(&dir).unwrap();
    for family in ["mamba", "mamba2", "mixtral", "qwen2_moe", "jamba", "deepseek_v2"] {
        let fx = hf_fixture(family);
        let want = read_safetensors(&fx.join("expected.safetensors"));
        let out = dir.join(format!("{family}.safetensors"));
        let f = fx.to_str().unwrap();
        ok(&["logits", "--hf", f, "--ids", &id_rows(&want["input_ids"]), "--out", out.to_str().unwrap()]);
        let got = &read_safetensors(&out)["logits"];
        let (g, w) = (got.to_vec_f64().unwrap(), want["logits"].to_vec_f64().unwrap());
        assert_eq!(got.dims(), want["logits"].dims(), "{family}");
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
        let err = g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err <= 1e-4, "{family}: logits relative error {err:.3e}");

        // Greedy generation with caches: prompt + new ids on one line, as transformers' generate_out.
        let prompt = id_rows(&want["generate_prompt"]);
        let expect = id_rows(&want["generate_out"]);
        let n = (want["generate_out"].dims()[1] - want["generate_prompt"].dims()[1]).to_string();
        let args =
            ["generate", "--hf", f, "--prompt-ids", &prompt, "--max-new-tokens", &n, "--temperature", "0"];
        let out = ok(&[&args[..], &["--ignore-eos"]].concat());
        assert_eq!(out.trim(), expect, "{family}: greedy generation differs from transformers'");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A character-level tokenizer.json (newline and printable ASCII → ids 3..=98).
fn char_tokenizer_json() -> String {
    let mut vocab = vec![r#""<unk>": 0"#.to_string(), r#""<s>": 1"#.into(), r#""</s>": 2"#.into()];
    let chars = std::iter::once('\n').chain((32u8..127).map(char::from));
    for (i, c) in chars.enumerate() {
        let key = match c {
            '\n' => "\\n".to_string(),
            '"' => "\\\"".to_string(),
            '\\' => "\\\\".to_string(),
            c => c.to_string(),
        };
        vocab.push(format!("\"{key}\": {}", i + 3));
    }
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
  "pre_tokenizer": {{"type": "Split", "pattern": {{"Regex": "[\\s\\S]"}}, "behavior": "Isolated", "invert": false}},
  "post_processor": null, "decoder": {{"type": "Fuse"}},
  "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "<unk>"}}}}"#,
        vocab.join(", ")
    )
}

#[test]
fn hf_inspect_eval_fine_tune_and_errors() {
    let dir = temp_dir("hf-dir");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(hf_fixture("qwen2_moe").join(f), model.join(f)).unwrap();
    }
    let m = model.to_str().unwrap();

    // Without tokenizer.json: a text prompt, eval and fine-tuning say what is missing.
    let e = fails(&["generate", "--hf", m, "--prompt", "hello"]);
    assert!(e.contains("tokenizer.json") && e.contains("--prompt-ids"), "{e}");
    let e = fails(&["train", "--hf", m, "--set", "trainer.max_steps=2"]);
    assert!(e.contains("tokenizer.json"), "{e}");
    // Bad ids.
    let out = dir.join("l.safetensors");
    let o = out.to_str().unwrap();
    let e = fails(&["logits", "--hf", m, "--ids", "1,2,3;4,5", "--out", o]);
    assert!(e.contains("row 1") && e.contains("row 0"), "{e}");
    let e = fails(&["logits", "--hf", m, "--ids", "1,2,192", "--out", o]);
    assert!(e.contains("192") && e.contains("vocab"), "{e}");
    let e = fails(&["logits", "--hf", m, "--ids", "1,x", "--out", o]);
    assert!(e.contains("`x`"), "{e}");
    // A broken directory names the file.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(model.join("config.json"), broken.join("config.json")).unwrap();
    std::fs::write(broken.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{").unwrap();
    let e = fails(&["logits", "--hf", broken.to_str().unwrap(), "--ids", "1,2", "--out", o]);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");

    // The commands and options are documented.
    assert!(ok(&["--help"]).contains("logits"));
    let help = ok(&["generate", "--help"]);
    assert!(
        help.contains("--prompt-ids") && help.contains("--hf") && help.contains("--ignore-eos"),
        "{help}"
    );

    // inspect DIR: the family, the mapping, the layers, the counts, the tensors read.
    let out = ok(&["inspect", m]);
    for want in [
        "family qwen2_moe",
        "Qwen2MoeForCausalLM",
        "num_experts_per_tok = ",
        "layers:",
        "moe (",
        "parameters:",
        "active per token",
        "tensors read:",
        "model.layers.0.mlp.shared_expert_gate.weight",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    // With a tokenizer: a text prompt, eval on a file, fine-tuning, and the checkpoint reused.
    std::fs::write(model.join("tokenizer.json"), char_tokenizer_json()).unwrap();
    let out = ok(&["generate", "--hf", m, "--prompt", "To be", "--max-new-tokens", "5", "--seed", "1"]);
    assert!(out.starts_with("To be"), "{out}");
    let data = dir.join("data.txt");
    let text: String =
        (0..100).map(|i| format!("{i}: to be, or not to be, that is the question\n")).collect();
    std::fs::write(&data, text).unwrap();
    let d = data.to_str().unwrap();
    let out = ok(&["eval", "--hf", m, "--data", d, "--seq-len", "16", "--batch-size", "2", "--steps", "2"]);
    let line = out.lines().find(|l| l.starts_with("loss ")).unwrap_or_else(|| panic!("{out}"));
    let loss: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{out}");

    let run = dir.join("run");
    let r = run.to_str().unwrap();
    let dataset = format!("trainer.dataset=\"{d}\"");
    let mut args = vec!["train", "--hf", m, "--no-progress", "--out", r];
    for s in [
        "trainer.max_steps=3",
        "trainer.warmup_steps=1",
        "trainer.batch_size=2",
        "trainer.seq_len=16",
        "trainer.eval_every=3",
        "trainer.eval_steps=1",
        dataset.as_str(),
    ] {
        args.extend(["--set", s]);
    }
    let out = ok(&args);
    assert!(out.contains("qwen2_moe") && out.contains("validation: loss"), "{out}");
    // Resuming: the same command with --resume and more steps.
    let more = [&args[..], &["--resume", "--set", "trainer.max_steps=4"]].concat();
    let out = ok(&more);
    assert!(out.contains("resuming") && out.contains("step-000004"), "{out}");
    let e = fails(&["train", "--hf", m, "--set", "model.hidden_size=8"]);
    assert!(e.contains("model.hidden_size") && e.contains("config.json"), "{e}");
    let out = ok(&["generate", "--checkpoint", r, "--prompt", "To", "--max-new-tokens", "4"]);
    assert!(out.starts_with("To"), "{out}");
    let out = ok(&[
        "generate",
        "--checkpoint",
        r,
        "--prompt-ids",
        "5,6",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert_eq!(out.trim().split(',').count(), 5, "{out}");
    let out = ok(&["eval", "--checkpoint", r, "--data", d, "--steps", "1"]);
    assert!(out.contains("loss "), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lab_runs_and_refuses_bad_input() {
    let dir = temp_dir("lab");
    let d = dir.to_str().unwrap();
    let out = ok(&[
        "lab",
        "context-length",
        "--quick",
        "--no-progress",
        "--out",
        d,
        "--set",
        "mixers=attention_materialised,mamba1",
        "--set",
        "max_len=512",
    ]);
    assert!(out.contains("report.md") && out.contains(d), "{out}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    // The binary registers the counting allocator: memory is measured.
    assert_eq!(results["results"]["memory_measured"], true, "{results}");
    assert_eq!(results["results"]["mixers"].as_array().unwrap().len(), 2);
    assert!(dir.join("report.md").is_file() && dir.join("time_forward_backward.svg").is_file());
    let err = fails(&["lab", "context-lenght", "--quick", "--out", d]);
    assert!(err.contains("unknown lab `context-lenght`") && err.contains("context-length"), "{err}");
    let err = fails(&["lab", "context-length", "--quick", "--mem-budget", "1K", "--out", d]);
    assert!(err.contains("--mem-budget") && err.contains("too small"), "{err}");
    let err = fails(&["lab", "context-length", "--quick", "--set", "contxt=4", "--out", d]);
    assert!(err.contains("unknown setting `contxt`"), "{err}");
    // A size that does not parse is a usage error (status 2).
    let out = moeba(&["lab", "context-length", "--mem-budget", "8Q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("8Q"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reader that has gone (`moeba inspect … | head -0`) ends the command without a panic
/// message: SIGPIPE keeps its default action.
#[cfg(unix)]
#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::process::Stdio;
    let mut child = Command::new(BIN)
        .args(["inspect", "tiny-hybrid", "--context", "64"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the moeba binary");
    // Close the read end before the command prints its first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "moeba panicked on a closed pipe: {stderr}");
    assert_ne!(out.status.code(), Some(101), "exit status 101 (a panic); stderr: {stderr}");
}
