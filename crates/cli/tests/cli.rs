//! The `moeba` binary end to end: train a few steps, then generate from the checkpoint.

use std::process::Command;

#[test]
fn train_then_generate() {
    let dir = std::env::temp_dir().join(format!("moeba-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = env!("CARGO_BIN_EXE_moeba");
    let out = Command::new(bin)
        .args(["train", "--steps", "20", "--batch-size", "16", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("val") && stdout.contains("checkpoint"), "{stdout}");
    for f in ["model.safetensors", "metrics.jsonl", "config.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let out = Command::new(bin)
        .args(["generate", "--prompt", "KING:", "--max-new-tokens", "30", "--checkpoint"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("KING:") && text.len() >= 30, "{text}");
    // A directory without a run is a clear error.
    let out =
        Command::new(bin).args(["generate", "--checkpoint", "/nonexistent-moeba-run"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}
