//! The reports behind `moeba inspect` and `moeba experts` on tiny models: parameter counts, cache
//! bytes and activation estimates checked by hand, the measured peaks of one training step (with a
//! counting allocator in this test binary), and the expert report on constructed models.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Mutex;

use moeba_nn::Recompute;
use moeba_tensor::Device;
use moeba_train::data::Dataset;
use moeba_train::experts::{
    expert_report, plot_report, purity, render, token_class, ReportBuilder, TEXT_CLASSES,
};
use moeba_train::inspect::{activation_estimate, inspect, measure_peaks, render as render_inspection};
use moeba_train::{build_model, LoadedRun, RunConfig, Tokenizer};

// A counting allocator, as in the `moeba` binary: current bytes and the peak since a reset.
struct Counting;
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static BASE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size() as isize, Relaxed) + layout.size() as isize;
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size() as isize, Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let delta = new_size as isize - layout.size() as isize;
            let now = CURRENT.fetch_add(delta, Relaxed) + delta;
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn reset_peak() {
    let now = CURRENT.load(Relaxed);
    BASE.store(now, Relaxed);
    PEAK.store(now, Relaxed);
}

fn peak_bytes() -> usize {
    (PEAK.load(Relaxed) - BASE.load(Relaxed)).max(0) as usize
}

/// Every test holds this, so the allocations of one do not land in another's measurement.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// d = 16, a Mamba layer with a dense MLP, then an attention layer (2 heads, 1 kv head, head_dim 8)
/// with an MoE of 4 experts (top-2, width 8).
const TINY: &str = r#"
[model]
vocab_size = 256
hidden_size = 16
num_layers = 2
max_seq_len = 64
layer_mixers = ["mamba", "attention"]
num_heads = 2
kv_heads = 1
d_state = 4
d_conv = 3
expand = 2
intermediate_size = 24
num_experts = 4
experts_per_tok = 2
moe_intermediate_size = 8
moe_layers = [1]
[trainer]
seq_len = 16
batch_size = 2
warmup_steps = 1
max_steps = 10
"#;

fn loaded(toml: &str, overrides: &[&str]) -> LoadedRun {
    let (mut config, _) = RunConfig::from_toml(toml).unwrap();
    for o in overrides {
        let (k, v) = o.split_once('=').unwrap();
        config.set(k, v).unwrap();
    }
    config.validate().unwrap();
    let hc = config.model.to_hybrid(&config.trainer).unwrap();
    let (store, model) = build_model(&hc, 7, &Device::Cpu).unwrap();
    LoadedRun {
        config,
        store,
        model,
        tokenizer: Tokenizer::Byte,
        step: 0,
        checkpoint: PathBuf::from("constructed"),
    }
}

#[test]
fn inspect_counts_and_cache_by_hand() {
    let _g = lock();
    let run = loaded(TINY, &[]);
    let (d, v, di, n, r, dc, f) = (16, 256, 32, 4, 1, 3, 24);
    let (h, kv, hd, e, k, fe) = (2, 1, 8, 4, 2, 8);
    let embedding = v * d; // tied with the LM head
    let mamba = 2 * di * d + (di * dc + di) + (r + 2 * n) * di + (di * r + di) + di * n + di + d * di;
    let mlp = 3 * f * d;
    let attention = h * hd * d + 2 * kv * hd * d + d * h * hd;
    let expert = 2 * fe * d + d * fe;
    let moe = e * d + e * expert;
    let norms = 2 * 2 * d + d;
    let total = embedding + mamba + mlp + attention + moe + norms;
    let active = total - (e - k) * expert;

    let ins = inspect(&run.config, &run.model, 10).unwrap();
    assert_eq!(ins.total_params, total);
    assert_eq!(ins.active_params, active);
    assert_eq!(ins.train_state_bytes, 4 * 4 * total, "weights, gradients, two AdamW moments in f32");
    // Mamba: conv state (di × d_conv) and scan state (di × n); attention: K and V for 10 tokens.
    assert_eq!(ins.cache_bytes, 4 * (di * dc + di * n) + 4 * 2 * kv * hd * 10);
    assert_eq!(ins.context, 10);
    assert_eq!(ins.layers.len(), 2);
    assert!(ins.layers[0].1.starts_with("mamba") && ins.layers[0].2.starts_with("mlp (swiglu 24)"));
    assert!(ins.layers[1].1.starts_with("attention (2 heads, 1 kv, head_dim 8"));
    assert!(ins.layers[1].2.starts_with("moe (4 × 8, top-2, topk"));

    // Activations without recompute, from the documented per-token formulas.
    let tokens = 2 * 16;
    let block0 = (8 * di + r + 2 * n + d) + (4 * f + d) + 5 * d;
    let block1 = ((h * hd + 2 * kv * hd) + (h * hd + kv * hd) + h * hd + h + d)
        + (2 * e + k * (3 * d + 4 * fe) + d)
        + 5 * d;
    let none = (d + d + v + block0 + block1) * tokens * 4;
    assert_eq!(ins.activation_bytes[0], (Recompute::None, none));
    let [(_, a), (_, b), (_, c)] = ins.activation_bytes[..] else { panic!("three levels") };
    assert!(a >= b && b >= c, "{:?}", ins.activation_bytes);

    let text = render_inspection(&ins);
    for want in ["layers:", "mamba", "parameters:", "none", "mixer", "block", "at 10 tokens"] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
}

#[test]
fn recompute_saves_memory_in_deeper_models() {
    let _g = lock();
    let run = loaded(
        TINY,
        &[
            "model.num_layers=6",
            "model.layer_mixers=[\"mamba\",\"attention\",\"mamba\",\"mamba\",\"attention\",\"mamba\"]",
            "model.moe_layers=[1,3,5]",
        ],
    );
    let est = activation_estimate(run.model.config(), 4, 32);
    assert!(est[0].1 > est[1].1 && est[1].1 > est[2].1, "{est:?}");
    // Twice the tokens, twice the bytes.
    let est2 = activation_estimate(run.model.config(), 8, 32);
    for (a, b) in est.iter().zip(&est2) {
        assert_eq!(2 * a.1, b.1);
    }
}

#[test]
fn measured_peaks_follow_the_recompute_levels() {
    let _g = lock();
    let run = loaded(
        TINY,
        &[
            "model.num_layers=4",
            "model.layer_mixers=[\"mamba\",\"attention\",\"mamba\",\"attention\"]",
            "model.moe_layers=[1,3]",
            "trainer.seq_len=64",
            "trainer.batch_size=4",
        ],
    );
    let peaks = measure_peaks(&run.config, &run.model, &reset_peak, &peak_bytes).unwrap();
    let levels: Vec<Recompute> = peaks.iter().map(|p| p.0).collect();
    assert_eq!(levels, vec![Recompute::None, Recompute::Mixer, Recompute::Block]);
    let grads = 4 * run.model.param_counts().total;
    for (r, p) in &peaks {
        assert!(*p >= grads, "{r:?}: peak {p} below the gradients' {grads} bytes");
    }
    assert!(peaks[2].1 < peaks[0].1, "recomputing blocks must keep less than keeping everything: {peaks:?}");
    // The estimate is of the right size (activations + gradients against the measured peak).
    let est = activation_estimate(run.model.config(), 4, 64);
    let (e, m) = (est[0].1 + grads, peaks[0].1);
    assert!(m * 3 >= e && m <= 3 * e, "estimate {e} vs measured {m}");
}

fn check_report_consistency(report: &moeba_train::experts::ExpertReport, tokens: usize) {
    assert_eq!(report.tokens, tokens);
    for l in &report.layers {
        let experts = l.usage.len();
        assert!((l.usage.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{:?}", l.usage);
        let text_classes: Vec<_> =
            l.classes.iter().filter(|c| TEXT_CLASSES.contains(&c.0.as_str())).collect();
        assert_eq!(text_classes.iter().map(|c| c.1).sum::<usize>(), tokens, "text classes split the tokens");
        for (name, count, shares) in &l.classes {
            assert_eq!(shares.len(), experts, "{name}");
            assert!(*count > 0, "{name}");
            assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{name}: {shares:?}");
        }
        // Per expert, the text classes add up to its usage.
        for ex in 0..experts {
            let from_classes: f64 = text_classes.iter().map(|c| c.2[ex] * c.1 as f64).sum();
            assert!((from_classes - l.usage[ex] * tokens as f64).abs() < 1e-6, "expert {ex}");
        }
        for class in ["+", "-"] {
            let (ex, p) = purity(l, class).unwrap_or_else(|| panic!("no {class} class"));
            assert!(ex < experts && (1.0 / experts as f64 - 1e-12..=1.0).contains(&p), "{class}: {ex} {p}");
        }
        assert_eq!(l.top_tokens.len(), experts);
        let listed: usize = l.top_tokens.iter().flatten().map(|t| t.1).sum();
        assert!(listed <= tokens);
    }
}

#[test]
fn expert_report_on_arithmetic() {
    let _g = lock();
    let run = loaded(TINY, &[]);
    let data = Dataset::load("arithmetic", &Tokenizer::Byte, 0.1, 3).unwrap();
    // 300 tokens: 18 rows of 16 and a row of 12.
    let report = expert_report(&run, &data, 300).unwrap();
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.layers[0].layer, 1);
    check_report_consistency(&report, 300);
    let l = &report.layers[0];
    let h = l.entropy.expect("top-k has a router");
    assert!((0.0..=(4f64).ln() + 1e-9).contains(&h), "{h}");
    let tasks: Vec<_> = l.classes.iter().filter(|c| c.0.starts_with("task ")).collect();
    assert_eq!(tasks.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), vec!["task +", "task -"]);
    assert_eq!(tasks.iter().map(|c| c.1).sum::<usize>(), 300);
    let text = render(&report);
    assert!(text.contains("purity of `+`") && text.contains("task -") && text.contains("layer 1"), "{text}");

    let dir = std::env::temp_dir().join(format!("moeba-reports-{}", std::process::id()));
    let maps = plot_report(&report, &dir).unwrap();
    assert_eq!(maps.len(), 2);
    assert_eq!(maps[0].values.len(), 1);
    assert_eq!(maps[1].rows.len(), l.classes.len());
    for f in
        ["experts_usage.png", "experts_usage.svg", "experts_classes_layer1.png", "experts_classes_layer1.svg"]
    {
        assert!(dir.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hash_routing_is_pure_per_token() {
    let _g = lock();
    // Hash routing sends each token id to a fixed expert: every single-token class is pure.
    let run = loaded(TINY, &["model.routing.strategy=\"hash\""]);
    let data = Dataset::load("arithmetic", &Tokenizer::Byte, 0.1, 5).unwrap();
    let report = expert_report(&run, &data, 200).unwrap();
    check_report_consistency(&report, 200);
    let l = &report.layers[0];
    for class in ["+", "-", "="] {
        assert_eq!(purity(l, class).map(|p| p.1), Some(1.0), "{class}");
    }
    assert_eq!(l.entropy, None, "hash routing has no router");
    // Each token is listed under exactly one expert.
    let mut seen = std::collections::HashSet::new();
    for toks in &l.top_tokens {
        for (t, _) in toks {
            assert!(seen.insert(t.clone()), "{t:?} under two experts");
        }
    }
}

#[test]
fn report_builder_by_hand() {
    let _g = lock();
    let text = |id: u32| moeba_train::data::ByteTokenizer::decode(&[id]);
    let ids: Vec<u32> = "1+2=3\n5-9=-4".bytes().map(u32::from).collect();
    // '+' and '-' (operator) to expert 1, the sign to expert 0, digits to 2, '=' and '\n' to 3.
    let first: Vec<u32> = "1+2=3\n5-9=-4"
        .chars()
        .enumerate()
        .map(|(i, c)| match c {
            '+' => 1,
            '-' if i == 7 => 1,
            '-' => 0,
            '=' | '\n' => 3,
            _ => 2,
        })
        .collect();
    let tasks: Vec<u32> = (0..ids.len() as u32).map(|i| u32::from(i >= 6)).collect();
    let mut b = ReportBuilder::new("arithmetic");
    b.add_tokens(ids.len());
    b.add_stats(2, &[1.0, 2.0, 6.0, 3.0], Some(0.5), ids.len());
    b.add_assignments(2, 4, &first, &ids, Some(&tasks), &text).unwrap();
    let r = b.finish(&text);
    check_report_consistency(&r, 12);
    let l = &r.layers[0];
    assert_eq!(l.layer, 2);
    assert_eq!(l.usage, vec![1.0 / 12.0, 2.0 / 12.0, 6.0 / 12.0, 3.0 / 12.0]);
    assert_eq!(l.entropy, Some(0.5));
    let class = |n: &str| l.classes.iter().find(|c| c.0 == n).cloned().unwrap();
    assert_eq!(class("digits"), ("digits".into(), 6, vec![0.0, 0.0, 1.0, 0.0]));
    assert_eq!(class("- (sign)"), ("- (sign)".into(), 1, vec![1.0, 0.0, 0.0, 0.0]));
    assert_eq!(class("task +").1, 6);
    assert_eq!(class("task -").2, vec![1.0 / 6.0, 1.0 / 6.0, 3.0 / 6.0, 1.0 / 6.0]);
    assert_eq!(purity(l, "+"), Some((1, 1.0)));
    assert_eq!(purity(l, "-"), Some((1, 1.0)));
    assert_eq!(purity(l, "letters"), None);
    assert_eq!(l.top_tokens[3], vec![("=".to_string(), 2), ("\n".to_string(), 1)]);
    assert_eq!(l.top_tokens[1], vec![("+".to_string(), 1), ("-".to_string(), 1)]);
    // Mismatched lengths and out-of-range experts are errors.
    assert!(b.add_assignments(2, 4, &first[1..], &ids, None, &text).is_err());
    assert!(b.add_assignments(2, 4, &[4], &ids[..1], None, &text).is_err());
}

#[test]
fn token_classes() {
    for (t, c) in [
        ("a", "letters"),
        ("Zé", "letters"),
        ("7", "digits"),
        (" ", "whitespace"),
        ("\n", "whitespace"),
        (",", "punctuation"),
        ("+", "+"),
        ("-", "-"),
        ("=", "="),
        ("a1", "other"),
        ("\u{fffd}", "other"),
    ] {
        assert_eq!(token_class(t), c, "{t:?}");
    }
}

#[test]
fn errors_name_the_problem() {
    let _g = lock();
    let dense = loaded(TINY, &["model.num_experts=0", "model.moe_layers=[]"]);
    let data = Dataset::load("arithmetic", &Tokenizer::Byte, 0.1, 3).unwrap();
    let e = expert_report(&dense, &data, 100).err().unwrap().to_string();
    assert!(e.contains("no MoE layers"), "{e}");
    let run = loaded(TINY, &[]);
    let e = expert_report(&run, &data, 0).err().unwrap().to_string();
    assert!(e.contains("no validation tokens"), "{e}");
}
