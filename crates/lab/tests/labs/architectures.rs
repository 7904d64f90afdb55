//! The `architectures` lab in quick mode.

use std::path::PathBuf;

use moeba_lab::labs::architectures::{size_model, Arch, Settings};
use moeba_lab::{run_lab, LabError, LabOptions};
use serde_json::Value;

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("moeba-lab-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn quick(out: &std::path::Path, sets: &[(&str, &str)]) -> LabOptions {
    let mut opts = LabOptions::new(out);
    opts.quick = true;
    opts.overrides = sets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    opts
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

#[test]
fn quick_run_writes_consistent_results_plots_and_report() {
    let tmp = TempDir::new("arch");
    // A shorter budget than --quick's default: the figures are checked for consistency, not quality.
    let opts = quick(&tmp.0, &[("budget_s", "1.5")]);
    let run = run_lab("architectures", &opts).unwrap();

    // results.json on disk is what the run returned.
    let text = std::fs::read_to_string(tmp.0.join("results.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json, run.results);
    assert_eq!(json["lab"], "architectures");
    assert_eq!(json["quick"], true);
    assert!(json["machine"]["logical_cores"].as_u64().unwrap() >= 1);
    assert_eq!(json["config"]["budget_s"], 1.5);
    let target = json["config"]["target_params"].as_f64().unwrap();
    assert_eq!(json["results"]["target_params"].as_f64().unwrap(), target);

    let models = json["results"]["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["transformer", "mamba", "mamba2", "moe-transformer", "jamba"]);
    for m in models {
        let name = m["name"].as_str().unwrap();
        let total = num(m, "params_total");
        let active = num(m, "params_active");
        assert!((total / target - 1.0).abs() <= 0.03, "{name}: {total} params, target {target}");
        assert!((num(m, "params_rel_error") - (total / target - 1.0)).abs() < 1e-12, "{name}");
        assert!(active > 0.0 && active <= total, "{name}: active {active} > total {total}");
        if name.contains("moe") || name == "jamba" {
            assert!(active < total, "{name}: an MoE model must have fewer active than total parameters");
            assert_eq!(num(m, "num_experts"), 8.0, "{name}");
        } else {
            assert_eq!(active, total, "{name}: a dense model uses every parameter");
        }
        assert!(num(m, "steps") >= 1.0, "{name}");
        assert_eq!(
            num(m, "tokens"),
            num(m, "steps") * 4.0 * 64.0,
            "{name}: tokens = steps × batch × seq_len"
        );
        for key in ["final_val_loss", "best_val_loss", "final_val_bpb"] {
            let v = num(m, key);
            assert!(v.is_finite() && v > 0.0, "{name}: {key} = {v}");
        }
        assert!(num(m, "best_val_loss") <= num(m, "final_val_loss") + 1e-12, "{name}");
        // An untrained byte model starts near ln 256 = 5.55; a short run must not be far above it.
        assert!(num(m, "final_val_loss") < 8.0, "{name}");
        assert!(num(m, "train_tokens_per_s") > 0.0, "{name}");
        assert!(num(m, "train_seconds") > 0.0, "{name}");

        let curve = m["curve"].as_array().unwrap();
        assert!(!curve.is_empty(), "{name}: no validation points");
        let last = curve.last().unwrap();
        assert!((num(last, "val_loss") - num(m, "final_val_loss")).abs() < 1e-12, "{name}");
        for w in curve.windows(2) {
            assert!(num(&w[1], "tokens") > num(&w[0], "tokens"), "{name}: tokens must increase");
            assert!(num(&w[1], "elapsed_s") >= num(&w[0], "elapsed_s"), "{name}: time must increase");
        }
        for p in curve {
            assert!(num(p, "val_loss").is_finite(), "{name}");
        }

        let mem = &m["memory"];
        assert!(num(mem, "train_bytes") >= num(mem, "weights_grads_adam_bytes") * 0.75, "{name}");
        assert_eq!(
            num(mem, "weights_grads_adam_bytes"),
            16.0 * total,
            "{name}: f32 weights, grads, 2 moments"
        );
        assert!(num(mem, "activation_estimate_bytes") > 0.0, "{name}");
        if mem["measured"] == true {
            assert!(num(mem, "measured_step_peak_bytes") > 0.0, "{name}");
            assert!(num(mem, "measured_train_run_peak_bytes") > 0.0, "{name}");
        } else {
            assert!(mem["measured_step_peak_bytes"].is_null(), "{name}: unmeasured memory must be null");
        }

        let dec = &m["decode"];
        assert_eq!(num(dec, "short_context"), 16.0);
        assert_eq!(num(dec, "long_context"), 256.0);
        for key in ["short_tokens_per_s", "long_tokens_per_s", "long_over_short_speed"] {
            let v = num(dec, key);
            assert!(v.is_finite() && v > 0.0, "{name}: decode {key} = {v}");
        }
        let (short_cache, long_cache) = (num(dec, "short_cache_bytes"), num(dec, "long_cache_bytes"));
        if name.starts_with("mamba") {
            assert_eq!(short_cache, long_cache, "{name}: Mamba's decoding state does not grow");
        } else {
            assert!(long_cache > short_cache, "{name}: the KV cache grows with the context");
        }
    }
    // The KV cache of the all-attention models grows faster than the hybrid's (one attention layer).
    let cache = |n: &str| num(&models.iter().find(|m| m["name"] == n).unwrap()["decode"], "long_cache_bytes");
    assert!(cache("transformer") > cache("jamba"));

    // Plots (PNG + SVG) and the report with its table, figures and answer.
    for stem in ["loss_vs_time", "loss_vs_tokens"] {
        for ext in ["png", "svg"] {
            let p = tmp.0.join(format!("{stem}.{ext}"));
            assert!(std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false), "{} missing", p.display());
            assert!(run.files.contains(&p), "{} not listed", p.display());
        }
    }
    let report = std::fs::read_to_string(tmp.0.join("report.md")).unwrap();
    for needle in [
        "## Question",
        "## Setup",
        "## Results",
        "| model | layers | params total | active / token |",
        "![Validation loss against training wall time](loss_vs_time.png)",
        "![Validation loss against training tokens](loss_vs_tokens.png)",
        "## Answer",
        "Loss at equal wall time",
        "Generation at a long context",
    ] {
        assert!(report.contains(needle), "report.md lacks {needle:?}:\n{report}");
    }
    // Memory is labelled as measured only when the counting allocator measured it.
    let measured = models[0]["memory"]["measured"].as_bool().unwrap();
    let label = if measured { "(measured)" } else { "(estimate)" };
    assert!(models.iter().all(|m| m["memory"]["measured"] == measured));
    assert!(report.contains(label), "report.md lacks {label}");
    for name in names {
        assert!(report.contains(&format!("| `{name}` |")), "report.md has no row for {name}");
    }
    // The training runs were removed (keep_runs=false).
    assert!(!tmp.0.join("runs").exists());
}

#[test]
fn models_are_sized_to_the_target() {
    let tmp = TempDir::new("arch-size");
    for (target, hidden) in [("60000", "32"), ("150000", "48")] {
        let opts = quick(&tmp.0, &[("target_params", target), ("hidden_size", hidden), ("num_layers", "5")]);
        let s = Settings::from_options(&opts).unwrap();
        for arch in Arch::ALL {
            let m = size_model(&s, arch).unwrap();
            let err = m.counts.total as f64 / s.target_params as f64 - 1.0;
            assert!(err.abs() < 0.02, "{arch:?} at {target}: {} params", m.counts.total);
            assert!(m.counts.active <= m.counts.total);
            assert_eq!(m.config.num_layers, 5);
            assert_eq!(m.config.layers().unwrap().len(), 5);
        }
    }
}

#[test]
fn bad_settings_are_clear_errors() {
    let tmp = TempDir::new("arch-bad");
    let err = |sets: &[(&str, &str)]| -> String {
        match run_lab("architectures", &quick(&tmp.0, sets)) {
            Err(e @ LabError::Invalid(_)) => e.to_string(),
            Err(e) => panic!("{sets:?}: expected an Invalid error, got {e}"),
            Ok(_) => panic!("{sets:?}: expected an error"),
        }
    };
    let e = err(&[("budget", "3")]);
    assert!(e.contains("unknown setting `budget`") && e.contains("budget_s"), "{e}");
    let e = err(&[("budget_s", "fast")]);
    assert!(e.contains("budget_s") && e.contains("fast"), "{e}");
    let e = err(&[("budget_s", "0")]);
    assert!(e.contains("budget_s"), "{e}");
    let e = err(&[("target_params", "1000")]);
    assert!(e.contains("target_params") && e.contains("too small"), "{e}");
    let e = err(&[("models", "transformer,rwkv")]);
    assert!(e.contains("rwkv") && e.contains("mamba2"), "{e}");
    let e = err(&[("num_layers", "2")]);
    assert!(e.contains("num_layers") && e.contains("Jamba"), "{e}");
    let e = err(&[("decode_short", "512")]);
    assert!(e.contains("decode_short"), "{e}");
    let e = err(&[("hidden_size", "30")]);
    assert!(e.contains("hidden_size"), "{e}");
    // Nothing was trained or written for a refused run.
    assert!(!tmp.0.join("results.json").exists());
}
