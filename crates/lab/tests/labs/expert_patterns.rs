//! The `expert-patterns` lab in quick mode.

use std::path::{Path, PathBuf};

use moeba_lab::labs::expert_patterns::TaskSeparation;
use moeba_lab::{run_lab, LabError, LabOptions};
use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-lab-ep-{name}-{}", std::process::id()));
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

fn assert_rows_are_distributions(rows: &Value, experts: usize) {
    for row in rows.as_array().unwrap() {
        let shares: Vec<f64> = row["shares"].as_array().unwrap().iter().map(num).collect();
        assert_eq!(shares.len(), experts, "{row}");
        assert!(shares.iter().all(|s| s.is_finite() && (0.0..=1.0).contains(s)), "{row}");
        if row["tokens"].as_u64().unwrap() > 0 {
            let sum: f64 = shares.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{row}: shares sum to {sum}");
        }
    }
}

/// Checks results.json, the plots and the report of a finished run; returns the results.
fn check_run(run: &moeba_lab::LabRun, layers: usize, experts: usize) -> Value {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(run.dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["lab"], "expert-patterns");
    assert_eq!(json["quick"], true);
    let r = &json["results"];
    assert!(r["tokens"].as_u64().unwrap() > 0);
    let ls = r["layers"].as_array().unwrap();
    assert_eq!(ls.len(), layers);
    for l in ls {
        assert_eq!(l["experts"].as_u64().unwrap() as usize, experts);
        let usage: Vec<f64> = l["usage"].as_array().unwrap().iter().map(num).collect();
        assert_eq!(usage.len(), experts);
        let sum: f64 = usage.iter().sum();
        assert!((sum - 1.0).abs() < 1e-9, "usage sums to {sum}");
        let h = num(&l["router_entropy"]);
        let uniform = num(&l["uniform_entropy"]);
        assert!(h.is_finite() && h >= 0.0 && h <= uniform + 1e-6, "router entropy {h} (uniform {uniform})");
        let hu = num(&l["usage_entropy"]);
        assert!(hu >= 0.0 && hu <= uniform + 1e-9);
        assert!(num(&l["mutual_information_bits"]) >= -1e-12);
        let classes = &l["classes"];
        let first = if r["dataset"] == "arithmetic" { "digits" } else { "letters" };
        assert!(classes.as_array().unwrap().iter().any(|c| c["name"] == first), "{classes}");
        // The text classes split the tokens.
        let split: u64 = classes
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| !c["name"].as_str().unwrap().contains("answer"))
            .map(|c| c["tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(split, r["tokens"].as_u64().unwrap());
        assert_rows_are_distributions(classes, experts);
        assert_rows_are_distributions(&l["frequent_tokens"], experts);
        assert_eq!(l["frequent_tokens"].as_array().unwrap().len(), 12);
        let spec = l["specialisation"].as_array().unwrap();
        assert_eq!(spec.len(), experts);
        for s in spec {
            let p = num(&s["purity"]);
            assert!((0.0..=1.0 + 1e-9).contains(&p), "{s}");
            assert!(s["specialised"].is_boolean());
        }
        assert_eq!(l["top_tokens"].as_array().unwrap().len(), experts);
    }
    for l in 0..layers {
        for ext in ["png", "svg"] {
            let f = run.dir.join(format!("classes_layer{l}.{ext}"));
            assert!(std::fs::metadata(&f).unwrap().len() > 0, "{}", f.display());
        }
    }
    assert!(run.dir.join("usage.png").exists() && run.dir.join("usage.svg").exists());
    let md = std::fs::read_to_string(run.dir.join("report.md")).unwrap();
    for needle in ["## Question", "## Answer", "purity", "router entropy", "usage.png", "classes_layer0.png"]
    {
        assert!(md.contains(needle), "report.md lacks `{needle}`:\n{md}");
    }
    json
}

#[test]
fn quick_run_on_shakespeare_then_again_from_its_checkpoint() {
    let out = tmp("shakespeare");
    let run = run_lab("expert-patterns", &quick(&out, &[])).unwrap();
    let json = check_run(&run, 2, 4);
    let training = &json["results"]["training"];
    assert!(num(&training["final_val_loss"]).is_finite());
    assert!(num(&training["tokens_per_s"]) > 0.0);
    assert!(json["results"]["layers"][0]["answer_positions"].is_null(), "no tasks in plain text");

    // The same model from its checkpoint, without training.
    let again = tmp("from-checkpoint");
    let ckpt = out.join("train");
    let run2 = run_lab(
        "expert-patterns",
        &quick(&again, &[("checkpoint", ckpt.to_str().unwrap()), ("tokens", "1000")]),
    )
    .unwrap();
    let json2 = check_run(&run2, 2, 4);
    assert!(json2["results"]["training"].is_null());
    assert_eq!(json2["results"]["tokens"], 1000);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&again);
}

#[test]
fn quick_run_on_arithmetic_measures_task_separation() {
    let out = tmp("arith");
    let run = run_lab("expert-patterns", &quick(&out, &[("dataset", "arithmetic")])).unwrap();
    let json = check_run(&run, 2, 4);
    for l in json["results"]["layers"].as_array().unwrap() {
        for key in ["operator_tokens", "answer_positions", "task_lines"] {
            let t = &l[key];
            let purity = num(&t["task_purity"]);
            let baseline = num(&t["baseline"]);
            assert!((0.0..=1.0 + 1e-9).contains(&purity) && purity >= baseline - 1e-9, "{key}: {t}");
            assert_eq!(t["favourites"].as_array().unwrap().len(), 2, "{t}");
        }
        let names: Vec<&str> =
            l["classes"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"task + answer") && names.contains(&"task - answer"), "{names:?}");
    }
    let md = std::fs::read_to_string(run.dir.join("report.md")).unwrap();
    assert!(md.contains("answer task purity"), "{md}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn task_separation_figures() {
    // Task 0 all on e0, task 1 split 3:1 over e1 and e0.
    let t = TaskSeparation::from_counts(&[vec![10, 0, 0], vec![1, 3, 0]]).unwrap();
    assert_eq!(t.positions, vec![10, 4]);
    assert!((t.purity - 13.0 / 14.0).abs() < 1e-12);
    assert!((t.baseline - 10.0 / 14.0).abs() < 1e-12);
    assert_eq!(t.favourites[0], (0, 1.0));
    assert_eq!(t.favourites[1], (1, 0.75));
    assert!(t.separated());
    let same = TaskSeparation::from_counts(&[vec![5, 5], vec![6, 4]]).unwrap();
    assert!(!same.separated());
    assert!((same.purity - 11.0 / 20.0).abs() < 1e-12);
    assert!(TaskSeparation::from_counts(&[vec![3, 1], vec![0, 0]]).is_none());
}

#[test]
fn a_checkpoint_without_moe_layers_is_refused() {
    let dir = tmp("dense");
    let cfg_text = "[model]\nhidden_size = 16\nnum_layers = 1\nnum_heads = 2\nkv_heads = 2\nintermediate_size = 32\n\
                    max_seq_len = 16\nnum_experts = 0\n[trainer]\nseq_len = 16\nbatch_size = 2\nmax_steps = 1\n\
                    eval_every = 1\neval_steps = 1\nwarmup_steps = 1\n";
    let (cfg, _) = moeba_train::RunConfig::from_toml(cfg_text).unwrap();
    let train_out = dir.join("dense-run");
    let opts = moeba_train::TrainOptions { out: train_out.clone(), resume: false, progress: false };
    moeba_train::train(&cfg, &opts, |_| {}).unwrap();
    let err =
        run_lab("expert-patterns", &quick(&dir.join("lab"), &[("checkpoint", train_out.to_str().unwrap())]))
            .unwrap_err();
    assert!(matches!(err, LabError::Invalid(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("no MoE layers") && msg.contains("checkpoint"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_settings_are_refused() {
    let out = tmp("bad");
    let err = run_lab("expert-patterns", &quick(&out, &[("colour", "blue")])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("unknown setting `colour`") && msg.contains("checkpoint"), "{msg}");
    let err = run_lab("expert-patterns", &quick(&out, &[("steps", "many")])).unwrap_err();
    assert!(err.to_string().contains("steps=many"), "{err}");
    let err =
        run_lab("expert-patterns", &quick(&out, &[("checkpoint", "/nonexistent/moeba-run")])).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/moeba-run"), "{err}");
    let err = run_lab("expert-patterns", &quick(&out, &[("dataset", "/nonexistent/text.txt")])).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/text.txt"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
