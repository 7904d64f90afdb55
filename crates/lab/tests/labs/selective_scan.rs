//! The `selective-scan` lab in quick mode, its data generator and the LTI ablation.

use moeba_autograd::Var;
use moeba_lab::labs::selective_scan::{
    CopyModel, CopyModelConfig, SelectiveCopy, Settings, Variant, FIRST_COLOUR, KEYS, MARKER, NOISE,
};
use moeba_lab::{run_lab, LabOptions};
use moeba_tensor::{Device, Rng, Tensor};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("moeba-lab-ss-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn generator_places_colours_markers_and_targets() {
    for (seq_len, n_copy, colours) in [(16, 4, 8), (5, 5, 1), (1, 1, 3), (40, 7, 16)] {
        let task = SelectiveCopy::new(seq_len, n_copy, colours).unwrap();
        assert_eq!(task.total_len(), seq_len + n_copy);
        assert_eq!(task.vocab_size(), colours + 2);
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            let ex = task.sample(&mut rng);
            assert_eq!(ex.tokens.len(), seq_len + n_copy);
            assert_eq!(ex.positions.len(), n_copy);
            assert!(ex.positions.windows(2).all(|w| w[0] < w[1]), "{:?}", ex.positions);
            assert!(ex.positions.iter().all(|&p| p < seq_len));
            for (i, &t) in ex.tokens[..seq_len].iter().enumerate() {
                match ex.positions.iter().position(|&p| p == i) {
                    Some(j) => assert_eq!(t, ex.targets[j]),
                    None => assert_eq!(t, NOISE),
                }
            }
            assert!(ex.tokens[seq_len..].iter().all(|&t| t == MARKER));
            assert!(ex.targets.iter().all(|&t| t >= FIRST_COLOUR && t < FIRST_COLOUR + colours as u32));
        }
    }
    // Seeded: the same seed gives the same stream, another seed another one.
    let task = SelectiveCopy::new(32, 4, 8).unwrap();
    let a: Vec<_> = (0..5)
        .map({
            let mut r = Rng::new(1);
            move |_| task.sample(&mut r)
        })
        .collect();
    let b: Vec<_> = (0..5)
        .map({
            let mut r = Rng::new(1);
            move |_| task.sample(&mut r)
        })
        .collect();
    let c: Vec<_> = (0..5)
        .map({
            let mut r = Rng::new(2);
            move |_| task.sample(&mut r)
        })
        .collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Positions cover the whole region over many draws.
    let mut rng = Rng::new(3);
    let mut seen = [false; 32];
    for _ in 0..200 {
        for p in task.sample(&mut rng).positions {
            seen[p] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
    // The batch tensors hold the same examples.
    let (toks, tgts, ex) = task.batch(&mut Rng::new(4), 3).unwrap();
    assert_eq!(toks.dims(), &[3, 36]);
    assert_eq!(tgts.dims(), &[3, 4]);
    let tv = toks.to_vec::<u32>().unwrap();
    let gv = tgts.to_vec::<u32>().unwrap();
    for (i, e) in ex.iter().enumerate() {
        assert_eq!(&tv[i * 36..(i + 1) * 36], &e.tokens[..]);
        assert_eq!(&gv[i * 4..(i + 1) * 4], &e.targets[..]);
    }
    assert!(SelectiveCopy::new(3, 4, 8).is_err());
    assert!(SelectiveCopy::new(3, 0, 8).is_err());
    assert!(SelectiveCopy::new(3, 1, 0).is_err());
}

fn model(variant: Variant) -> (CopyModel, SelectiveCopy) {
    let task = SelectiveCopy::new(13, 3, 5).unwrap();
    let cfg = CopyModelConfig { vocab: task.vocab_size(), d_model: 12, layers: 2, d_state: 4, lti_group: 1 };
    (CopyModel::new(cfg, variant, 11).unwrap(), task)
}

#[test]
fn forwards_have_the_right_shapes_and_selective_matches_mamba_block() {
    for variant in [Variant::Selective, Variant::Lti] {
        let (m, task) = model(variant);
        let (toks, _, _) = task.batch(&mut Rng::new(5), 3).unwrap();
        let h = m.hidden(&toks).unwrap();
        assert_eq!(h.dims(), &[3, 16, 12]);
        let logits = m.output_logits(&toks, 3).unwrap();
        assert_eq!(logits.dims(), &[3, 3, task.vocab_size()]);
        assert!(logits.tensor().to_vec_f64().unwrap().iter().all(|v| v.is_finite()));
        assert!(m.output_logits(&toks, 17).is_err());
        // Size-1 batch and length 1.
        let one = Tensor::from_vec(vec![MARKER], (1, 1), &Device::Cpu).unwrap();
        assert_eq!(m.output_logits(&one, 1).unwrap().dims(), &[1, 1, task.vocab_size()]);
        let layer = &m.layers[0];
        let x = layer.norm.forward(&m.embed.forward(&toks).unwrap()).unwrap();
        let mine = layer.mixer(&x).unwrap().tensor().to_vec_f64().unwrap();
        assert!(mine.iter().all(|v| v.is_finite()));
        if variant == Variant::Selective {
            // The lab's selective path is exactly nn's MambaBlock.
            let theirs = layer.mamba.forward(&x, None).unwrap().tensor().to_vec_f64().unwrap();
            assert!(max_abs_diff(&mine, &theirs) < 1e-5, "{}", max_abs_diff(&mine, &theirs));
        }
    }
}

#[test]
fn lti_delta_b_c_do_not_depend_on_the_input() {
    let (lti, task) = model(Variant::Lti);
    let (sel, _) = model(Variant::Selective);
    let (t1, _, _) = task.batch(&mut Rng::new(1), 2).unwrap();
    let (t2, _, _) = task.batch(&mut Rng::new(2), 2).unwrap();
    let parts = |m: &CopyModel, t: &Tensor| {
        let x = m.layers[1].norm.forward(&m.embed.forward(t).unwrap()).unwrap();
        m.layers[1].scan_parts(&x).unwrap()
    };
    let flat = |v: &Var| v.tensor().to_vec_f64().unwrap();
    let (p1, p2) = (parts(&lti, &t1), parts(&lti, &t2));
    let (dt1, dt2) = (p1.dt().unwrap(), p2.dt().unwrap());
    assert_eq!(dt1.dims(), &[2, 24, 16]);
    assert_eq!(p1.b.dims(), &[2, 24, 4, 16]);
    assert_eq!(p1.c.dims(), &[2, 24, 4, 16]);
    // The same for two different inputs ...
    assert_eq!(dt1.to_vec_f64().unwrap(), dt2.to_vec_f64().unwrap());
    assert_eq!(flat(&p1.b), flat(&p2.b));
    assert_eq!(flat(&p1.c), flat(&p2.c));
    // ... and the same at every position and for every row: one value per channel (and state).
    let dt = dt1.to_vec_f64().unwrap();
    for row in 0..2 {
        for c in 0..24 {
            let at = |t: usize| dt[(row * 24 + c) * 16 + t];
            assert!((0..16).all(|t| at(t) == dt[c * 16]), "Δ varies along channel {c}");
            assert!(at(0) > 0.0);
        }
    }
    let b = flat(&p1.b);
    for i in 0..(2 * 24 * 4) {
        let first = b[(i % (24 * 4)) * 16];
        assert!(b[i * 16..(i + 1) * 16].iter().all(|&v| v == first));
    }
    // While the inputs themselves do differ, and selective Δ and B do follow them.
    assert_ne!(flat(&p1.u), flat(&p2.u));
    let (s1, s2) = (parts(&sel, &t1), parts(&sel, &t2));
    assert_ne!(s1.dt().unwrap().to_vec_f64().unwrap(), s2.dt().unwrap().to_vec_f64().unwrap());
    assert_ne!(flat(&s1.b), flat(&s2.b));
    // Only the parameters the variant uses are trained; LTI's B and C get gradients.
    let names: Vec<String> = lti.trained_params().iter().map(|p| p.name().to_string()).collect();
    assert!(names.iter().any(|n| n.ends_with("B_lti")) && names.iter().any(|n| n.ends_with("C_lti")));
    assert!(!names.iter().any(|n| n.contains("x_proj") || n.ends_with("dt_proj.weight")));
    assert!(names.iter().any(|n| n.ends_with("dt_proj.bias")));
    assert!(sel.trained_params().iter().any(|p| p.name().contains("x_proj")));
    assert!(lti.num_params() < sel.num_params());
    let (_, tg, _) = task.batch(&mut Rng::new(1), 2).unwrap();
    let logits = lti.output_logits(&t1, 3).unwrap();
    let loss =
        logits.reshape((6, task.vocab_size())).unwrap().cross_entropy(&tg.reshape(6).unwrap(), None).unwrap();
    let grads = loss.backward().unwrap();
    for p in lti.trained_params() {
        let g = grads.get(&p.var()).unwrap_or_else(|| panic!("no gradient for {}", p.name()));
        assert!(g.to_vec_f64().unwrap().iter().all(|v| v.is_finite()), "{}", p.name());
    }
}

#[test]
fn trace_recurrence_matches_the_fused_scan() {
    for variant in [Variant::Selective, Variant::Lti] {
        let (m, task) = model(variant);
        let ex = task.sample(&mut Rng::new(9));
        let toks = Tensor::from_vec(ex.tokens.clone(), (1, 16), &Device::Cpu).unwrap();
        let tr = m.trace(&toks).unwrap();
        assert_eq!(tr.len(), 2);
        for t in &tr {
            assert_eq!((t.d_inner, t.len), (24, 16));
            assert_eq!(t.dt.len(), 24 * 16);
            assert_eq!(t.state_norm.len(), 24 * 16);
            assert!(t.state_norm.iter().all(|v| v.is_finite() && *v >= 0.0));
            let d = max_abs_diff(&t.last_state, &t.fused_last_state);
            assert!(d < 1e-4, "{variant:?}: recurrence vs fused last state differ by {d}");
            assert_eq!(t.channel_mean(&t.dt).len(), 16);
        }
        assert!(m.trace(&Tensor::from_vec(ex.tokens.repeat(2), (2, 16), &Device::Cpu).unwrap()).is_err());
    }
}

#[test]
fn settings_keys_and_errors() {
    let mut o = LabOptions::new(tmp("keys"));
    o.quick = true;
    let s = Settings::from_options(&o).unwrap();
    assert!(s.steps > 0 && s.n_copy <= s.seq_len);
    o.overrides = vec![("seq_len".into(), "9".into()), ("lr".into(), "0.01".into())];
    let s = Settings::from_options(&o).unwrap();
    assert_eq!((s.seq_len, s.lr), (9, 0.01));
    assert_eq!(KEYS.len(), 12);
    o.overrides = vec![("colours".into(), "3".into())];
    let e = run_lab("selective-scan", &o).unwrap_err().to_string();
    assert!(e.contains("colours") && e.contains("n_copy"), "{e}");
    o.overrides = vec![("n_copy".into(), "50".into())];
    let e = run_lab("selective-scan", &o).unwrap_err().to_string();
    assert!(e.contains("n_copy"), "{e}");
    o.overrides = vec![("steps".into(), "many".into())];
    assert!(run_lab("selective-scan", &o).unwrap_err().to_string().contains("steps"));
}

#[test]
fn quick_run_writes_results_plots_and_report() {
    let dir = tmp("quick");
    let mut o = LabOptions::new(&dir);
    o.quick = true;
    let run = run_lab("selective-scan", &o).unwrap();
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["lab"], "selective-scan");
    assert_eq!(r["quick"], true);
    let s = &r["config"]["settings"];
    let steps = s["steps"].as_u64().unwrap() as usize;
    for v in ["selective", "lti"] {
        let x = &r["results"]["variants"][v];
        for key in ["token_accuracy", "sequence_accuracy"] {
            let a = x[key].as_f64().unwrap_or_else(|| panic!("{v}.{key} missing"));
            assert!((0.0..=1.0).contains(&a), "{v}.{key} = {a}");
        }
        assert!(x["eval_loss"].as_f64().unwrap().is_finite());
        assert!(x["train_seconds"].as_f64().unwrap() > 0.0);
        assert!(x["params"].as_u64().unwrap() > 0);
        let curve = x["loss_curve"].as_array().unwrap();
        assert_eq!(curve.len(), steps);
        assert!(curve.iter().all(|p| p[1].as_f64().is_some_and(|l| l.is_finite() && l > 0.0)));
        assert!(!x["eval_curve"].as_array().unwrap().is_empty());
        let c = x["delta_on_colour_vs_noise"].as_array().unwrap();
        assert_eq!(c.len(), s["layers"].as_u64().unwrap() as usize);
        assert!(c.iter().all(|l| l["layer_mean_delta_colour"].as_f64().is_some_and(|v| v > 0.0)));
    }
    // LTI's Δ is the same on colours and noise (up to rounding of the channel mean).
    for l in r["results"]["variants"]["lti"]["delta_on_colour_vs_noise"].as_array().unwrap() {
        let (a, b) =
            (l["layer_mean_delta_colour"].as_f64().unwrap(), l["layer_mean_delta_noise"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    assert!(r["machine"]["cpu_model"].is_string());
    for f in ["loss", "accuracy", "delta_selective", "state_selective", "delta_lti", "state_lti"] {
        for ext in ["png", "svg"] {
            let p = dir.join(format!("{f}.{ext}"));
            assert!(std::fs::metadata(&p).is_ok_and(|m| m.len() > 100), "{} missing", p.display());
            assert!(run.files.contains(&p), "{} not listed", p.display());
        }
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for needle in
        ["## Question", "## Setup", "## Results", "## Answer", "selective", "lti", "delta_selective.png"]
    {
        assert!(md.contains(needle), "report.md lacks {needle}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
