//! The `context-length` lab in quick mode.

use moeba_lab::labs::context_length::{loglog_slope, KEYS};
use moeba_lab::{run_lab, LabOptions};
use serde_json::Value;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-lab-cl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn quick(out: &std::path::Path) -> LabOptions {
    let mut o = LabOptions::new(out);
    o.quick = true;
    o
}

/// Every number in `v` is finite (serde_json writes a non-finite one as null, which is allowed
/// only where a field is optional: they are checked by name below).
fn all_finite(v: &Value, path: &str) {
    match v {
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite), "{path}: {n}"),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| all_finite(x, &format!("{path}[{i}]"))),
        Value::Object(o) => o.iter().for_each(|(k, x)| all_finite(x, &format!("{path}.{k}"))),
        _ => {}
    }
}

fn mixer<'a>(res: &'a Value, key: &str) -> &'a Value {
    res["results"]["mixers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == key)
        .unwrap_or_else(|| panic!("{key}"))
}

fn column(m: &Value, field: &str) -> Vec<f64> {
    m["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_f64().unwrap_or_else(|| panic!("{field}: {p}")))
        .collect()
}

#[test]
fn quick_run_measures_plots_and_reports() {
    let dir = tmp("quick");
    let run = run_lab("context-length", &quick(&dir)).unwrap();
    assert_eq!(run.dir, dir);

    // results.json on disk equals the returned results and holds every mixer.
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let res: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(res, run.results);
    assert_eq!(res["lab"], "context-length");
    assert_eq!(res["quick"], true);
    assert_eq!(res["results"]["memory_measured"], true, "the test binary registers the counting allocator");
    all_finite(&res, "results");
    let lengths: Vec<u64> =
        res["results"]["lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(lengths.len() >= 3, "{lengths:?}");
    assert!(lengths.windows(2).all(|w| w[1] == 2 * w[0]), "{lengths:?}");
    for key in ["attention_materialised", "attention", "mamba1", "mamba2", "hybrid"] {
        let m = mixer(&res, key);
        let pts = m["points"].as_array().unwrap();
        assert_eq!(pts.len(), lengths.len(), "{key}: every quick length runs within the default budget");
        assert_eq!(m["longest_context"].as_u64(), lengths.last().copied());
        assert_eq!(m["fits_budget_up_to"]["len"], m["longest_context"], "{key}");
        assert_eq!(m["fits_budget_up_to"]["measured"], true, "{key}");
        assert!(m["params"].as_u64().unwrap() > 0);
        for f in ["forward_s", "forward_backward_s", "forward_peak_bytes", "forward_backward_peak_bytes"] {
            assert!(column(m, f).iter().all(|v| *v > 0.0), "{key}.{f}: {:?}", column(m, f));
        }
        // Training needs at least what the forward needs.
        let (f, fb) = (column(m, "forward_peak_bytes"), column(m, "forward_backward_peak_bytes"));
        assert!(f.iter().zip(&fb).all(|(a, b)| b >= a), "{key}: {f:?} {fb:?}");
        if key != "attention_materialised" {
            assert!(column(m, "decode_step_s").iter().all(|v| *v > 0.0), "{key}");
            assert!(column(m, "cache_bytes").iter().all(|v| *v > 0.0), "{key}");
        } else {
            assert!(pts.iter().all(|p| p["decode_step_s"].is_null() && p["cache_bytes"].is_null()));
        }
        for e in ["forward_time", "forward_backward_time", "forward_backward_memory"] {
            assert!(m["exponents"][e].as_f64().is_some(), "{key}: exponent {e}");
        }
    }

    // Attention's memory grows faster than Mamba's; the memory-efficient kernel's does not grow
    // quadratically.
    let k = |key: &str, e: &str| mixer(&res, key)["exponents"][e].as_f64().unwrap();
    let (k_att, k_m1, k_m2) = (
        k("attention_materialised", "forward_backward_memory"),
        k("mamba1", "forward_backward_memory"),
        k("mamba2", "forward_backward_memory"),
    );
    assert!(k_att > k_m1 + 0.3 && k_att > k_m2 + 0.3, "attention {k_att}, mamba1 {k_m1}, mamba2 {k_m2}");
    assert!(k_att > 1.5, "materialised attention memory exponent {k_att}");
    assert!(k("attention", "forward_backward_memory") < 1.5);
    let peak = |key: &str| *column(mixer(&res, key), "forward_backward_peak_bytes").last().unwrap();
    assert!(peak("attention_materialised") > peak("attention"));

    // Cache: constant for Mamba-1 and Mamba-2, proportional to the context for attention, and the
    // hybrid's grows but by less than attention's.
    for key in ["mamba1", "mamba2"] {
        let c = column(mixer(&res, key), "cache_bytes");
        assert!(c.iter().all(|v| *v == c[0]), "{key}: {c:?}");
        let per = column(mixer(&res, key), "cache_bytes_per_token");
        assert!(per.windows(2).all(|w| w[1] < w[0]), "{key}: per token {per:?}");
    }
    let att = column(mixer(&res, "attention"), "cache_bytes");
    let per = column(mixer(&res, "attention"), "cache_bytes_per_token");
    assert!(att.windows(2).all(|w| w[1] == 2.0 * w[0]), "{att:?}");
    assert!(per.iter().all(|v| *v == per[0] && *v > 0.0), "{per:?}");
    let hyb = column(mixer(&res, "hybrid"), "cache_bytes");
    assert!(hyb.windows(2).all(|w| w[1] > w[0]), "{hyb:?}");
    assert!(hyb.iter().zip(&att).all(|(h, a)| h > a), "the hybrid block also holds three Mamba states");

    // Plots, PNG and SVG.
    for stem in [
        "time_forward",
        "time_forward_backward",
        "memory_forward_backward",
        "memory_forward",
        "decode_time",
        "cache_bytes",
    ] {
        for ext in ["png", "svg"] {
            let p = dir.join(format!("{stem}.{ext}"));
            assert!(p.is_file() && std::fs::metadata(&p).unwrap().len() > 1000, "{}", p.display());
            assert!(run.files.contains(&p), "{}", p.display());
        }
    }
    let svg = std::fs::read_to_string(dir.join("time_forward_backward.svg")).unwrap();
    assert!(svg.contains("Mamba-1") && svg.contains("attention (materialised)"));

    // report.md: the question, the tables, the pictures and the answer with the exponents.
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for text in [
        "## Question",
        "## Results",
        "| mixer | params | longest context |",
        "| attention (materialised) |",
        "## Pictures",
        "](time_forward_backward.png)",
        "## Answer",
        "longest context",
        "fits the budget up to",
        "Within the memory budget it fits 1K (measured)",
        "length^",
    ] {
        assert!(md.contains(text), "report.md lacks {text:?}");
    }
    assert!(md.contains(&format!("{k_att:.2}")), "the answer quotes the measured exponent");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tmp("bad");
    let err = run_lab("context-lenght", &quick(&dir)).unwrap_err().to_string();
    assert!(err.contains("unknown lab `context-lenght`") && err.contains("context-length"), "{err}");

    let mut o = quick(&dir);
    o.mem_budget = 1000;
    let err = run_lab("context-length", &o).unwrap_err().to_string();
    assert!(err.contains("--mem-budget") && err.contains("too small") && err.contains("128"), "{err}");

    // A budget above the input's size but below what any mixer needs: stopped before it runs.
    let mut o = quick(&dir);
    o.mem_budget = 40_000;
    o.overrides = vec![("max_len".into(), "256".into())];
    let err = run_lab("context-length", &o).unwrap_err().to_string();
    assert!(err.contains("smallest context length 128") && err.contains("memory"), "{err}");

    let mut o = quick(&dir);
    o.overrides = vec![("context".into(), "5".into())];
    let err = run_lab("context-length", &o).unwrap_err().to_string();
    assert!(err.contains("unknown setting `context`") && err.contains("max_len"), "{err}");

    for (k, v, want) in [
        ("mixers", "mamba3", "unknown mixer `mamba3`"),
        ("min_len", "2", "min_len"),
        ("heads", "3", "multiple of heads"),
        ("max_seconds", "abc", "max_seconds=abc"),
    ] {
        let mut o = quick(&dir);
        o.overrides = vec![(k.into(), v.into())];
        let err = run_lab("context-length", &o).unwrap_err().to_string();
        assert!(err.contains(want), "{k}={v}: {err}");
    }
    assert!(KEYS.contains(&"max_len") && KEYS.contains(&"mixers"));
    assert!(!dir.join("results.json").exists(), "a failed run writes no results");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn time_limit_stops_a_mixer_cleanly() {
    // A tiny time limit: after the calibration the next length is predicted over it, so every
    // selected mixer stops, and the run says why rather than hanging or writing fake numbers.
    let dir = tmp("time");
    let mut o = quick(&dir);
    o.overrides = vec![("mixers".into(), "mamba1,attention".into()), ("max_seconds".into(), "1e-9".into())];
    let err = run_lab("context-length", &o).unwrap_err().to_string();
    assert!(err.contains("time") && err.contains("max_seconds"), "{err}");

    // A longer limit with one mixer and few lengths runs and records the stop (none here).
    let mut o = quick(&dir);
    o.overrides = vec![("mixers".into(), "mamba2".into()), ("max_len".into(), "256".into())];
    let run = run_lab("context-length", &o).unwrap();
    let ms = run.results["results"]["mixers"].as_array().unwrap();
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0]["key"], "mamba2");
    assert!(ms[0]["stopped"].is_null());
    assert_eq!(ms[0]["longest_context"], 256);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loglog_slope_fits_power_laws() {
    let quad: Vec<(f64, f64)> =
        (1..8).map(|i| (i as f64 * 100.0, 3.0 * (i as f64 * 100.0).powi(2))).collect();
    assert!((loglog_slope(&quad).unwrap() - 2.0).abs() < 1e-12);
    let flat = [(10.0, 5.0), (20.0, 5.0), (40.0, 5.0)];
    assert!(loglog_slope(&flat).unwrap().abs() < 1e-12);
    assert_eq!(loglog_slope(&[(1.0, 1.0)]), None);
    assert_eq!(loglog_slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    // Non-positive and non-finite points are skipped.
    assert!(
        (loglog_slope(&[(0.0, 1.0), (2.0, 2.0), (4.0, 4.0), (8.0, f64::NAN)]).unwrap() - 1.0).abs() < 1e-12
    );
}
