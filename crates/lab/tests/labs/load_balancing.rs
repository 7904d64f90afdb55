//! The `load-balancing` lab in quick mode.

use std::path::{Path, PathBuf};

use moeba_lab::labs::load_balancing::{collapse_firings, SETTING_NAMES};
use moeba_lab::{run_lab, LabOptions};
use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-lab-lb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn quick(out: &Path, sets: &[(&str, &str)]) -> LabOptions {
    let mut o = LabOptions::new(out);
    o.quick = true;
    o.overrides = sets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    o
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn quick_run_has_one_entry_per_setting() {
    let out = tmp("all");
    let run = run_lab("load-balancing", &quick(&out, &[])).unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["lab"], "load-balancing");
    let experts = json["config"]["experts"].as_u64().unwrap() as usize;
    let moe_layers: Vec<u64> =
        json["config"]["moe_layers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(!moe_layers.is_empty());
    let layers = moe_layers.len();
    let steps = json["config"]["steps"].as_u64().unwrap() as usize;
    let settings = json["results"]["settings"].as_array().unwrap();
    let names: Vec<&str> = settings.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, SETTING_NAMES);
    for s in settings {
        let name = s["name"].as_str().unwrap();
        assert_eq!(s["steps"].as_u64().unwrap() as usize, steps, "{name}");
        assert!(num(&s["final_val_loss"]).is_finite() && num(&s["final_val_loss"]) > 0.0, "{name}");
        assert!(num(&s["tokens_per_s"]) > 0.0, "{name}");
        assert!(s["collapsed"].is_boolean());
        assert_eq!(s["collapsed"].as_bool().unwrap(), !s["collapse_firings"].as_array().unwrap().is_empty());
        for f in s["collapse_firings"].as_array().unwrap() {
            let step = f["step"].as_u64().unwrap() as usize;
            assert!((20..=steps).contains(&step), "{name}: fired at {step} (patience 20)");
            assert!(moe_layers.contains(&f["layer"].as_u64().unwrap()), "{f}");
        }
        let usage = s["usage"].as_array().unwrap();
        assert_eq!(usage.len(), layers, "{name}");
        for u in usage {
            let st = u["steps"].as_array().unwrap();
            let shares = u["shares"].as_array().unwrap();
            assert_eq!(st.len(), steps, "{name}: one usage row per step (log_every 1 in quick)");
            assert_eq!(shares.len(), st.len());
            for row in shares {
                let v: Vec<f64> = row.as_array().unwrap().iter().map(num).collect();
                assert_eq!(v.len(), experts);
                let sum: f64 = v.iter().sum();
                assert!((sum - 1.0).abs() < 1e-4, "{name}: usage sums to {sum}");
            }
            let layer = u["layer"].as_u64().unwrap();
            for ext in ["png", "svg"] {
                let f = out.join(format!("usage_{name}_layer{layer}.{ext}"));
                assert!(std::fs::metadata(&f).unwrap().len() > 0, "{}", f.display());
            }
        }
        let vc = s["val_curve"].as_array().unwrap();
        assert!(!vc.is_empty());
        assert_eq!(vc.last().unwrap()[0].as_u64().unwrap() as usize, steps);
    }
    // The settings differ where they should.
    let by = |n: &str| settings.iter().find(|s| s["name"] == n).unwrap();
    assert_eq!(num(&by("top1-alpha-0")["load_balance_alpha"]), 0.0);
    assert_eq!(num(&by("top1-alpha-0.1")["load_balance_alpha"]), 0.1);
    assert!(num(&by("top1-variance")["usage_variance_alpha"]) > 0.0);
    assert_eq!(by("switch")["strategy"], "switch");
    assert!(num(&by("top1-bias")["bias_balancing_rate"]) > 0.0);
    assert_eq!(by("top2-default")["experts_per_tok"], 2);
    assert_eq!(by("top1-alpha-0")["unbalanced"], true);
    assert_eq!(by("top2-default")["unbalanced"], false);
    for f in ["val_loss.png", "val_loss.svg", "balance.png", "balance.svg"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in ["## Answer", "Collapsed", "top2-default", "tokens/s", "final val loss"] {
        assert!(md.contains(needle), "report.md lacks `{needle}`:\n{md}");
    }
    assert!(run.files.iter().all(|f| f.exists()));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn collapse_warnings_are_parsed() {
    let w = vec![
        "layer 1: MoE collapse at step 23: expert 2 share 0.0010 < 0.025 for 20 steps".to_string(),
        "plots were not written: x".to_string(),
        "layer 0: MoE collapse at step 7: expert 0 share 0.0000 < 0.025 for 20 steps".to_string(),
    ];
    assert_eq!(collapse_firings(&w), vec![(1, 23), (0, 7)]);
}

#[test]
fn bad_settings_are_refused() {
    let out = tmp("bad");
    let err = run_lab("load-balancing", &quick(&out, &[("alpha", "0.5")])).unwrap_err().to_string();
    assert!(err.contains("unknown setting `alpha`") && err.contains("variance_alpha"), "{err}");
    let err = run_lab("load-balancing", &quick(&out, &[("only", "top3")])).unwrap_err().to_string();
    assert!(err.contains("top3") && err.contains("top2-default"), "{err}");
    let err = run_lab("load-balancing", &quick(&out, &[("experts", "1")])).unwrap_err().to_string();
    assert!(err.contains("experts=1"), "{err}");
    let err = run_lab("load-balancing", &quick(&out, &[("variance_alpha", "-1")])).unwrap_err().to_string();
    assert!(err.contains("variance_alpha"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
