//! Sampling: greedy determinism and agreement with a full forward, top-k = 1 equals greedy,
//! top-p filtering on hand-made logits, temperature, seed reproducibility, streaming text.

mod common;

use common::{config, TINY_HYBRID};
use moeba_nn::{ForwardOptions, HybridModel};
use moeba_tensor::{Device, Rng, Tensor};
use moeba_train::sampling::{argmax, filtered_probs};
use moeba_train::{
    build_model, generate, generate_ids, generate_ids_capped, sample_token, SampleOptions, Tokenizer,
};

fn model() -> HybridModel {
    let cfg = config(TINY_HYBRID, &[]);
    let h = cfg.model.to_hybrid(&cfg.trainer).unwrap();
    build_model(&h, 3, &Device::Cpu).unwrap().1
}

fn greedy(n: usize) -> SampleOptions {
    SampleOptions { max_new_tokens: n, temperature: 0.0, top_k: None, top_p: None, seed: 0 }
}

#[test]
fn greedy_is_deterministic_and_matches_full_forwards() {
    let m = model();
    let prompt = Tokenizer::Byte.encode("First Citizen:").unwrap();
    let mut streamed = Vec::new();
    let a = generate_ids(&m, &prompt, &greedy(12), |id| streamed.push(id)).unwrap();
    assert_eq!(a.len(), 12);
    assert_eq!(a, streamed);
    assert_eq!(a, generate_ids(&m, &prompt, &greedy(12), |_| {}).unwrap());
    // Each greedy token is the argmax of a full forward over everything before it.
    let mut seq = prompt.clone();
    for &next in &a {
        let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let out = m.forward(&ids, &ForwardOptions::default()).unwrap();
        let logits = out.logits.tensor().narrow(1, seq.len() - 1, 1).unwrap().flatten_all().unwrap();
        let row = logits.to_vec::<f32>().unwrap();
        let want = argmax(&row);
        let (best, got) = (row[want as usize], row[next as usize]);
        assert!(next == want || (best - got).abs() < 1e-4, "at {}: {next} vs argmax {want}", seq.len());
        seq.push(next);
    }
}

#[test]
fn top_k_one_is_greedy_and_seeds_reproduce() {
    let m = model();
    let prompt = Tokenizer::Byte.encode("KING").unwrap();
    let g = generate_ids(&m, &prompt, &greedy(10), |_| {}).unwrap();
    for seed in [1, 2] {
        let k1 = SampleOptions { max_new_tokens: 10, temperature: 1.3, top_k: Some(1), top_p: None, seed };
        assert_eq!(generate_ids(&m, &prompt, &k1, |_| {}).unwrap(), g);
    }
    // A hot temperature: the untrained tied model mostly repeats its input token otherwise.
    let hot = SampleOptions { max_new_tokens: 20, temperature: 20.0, top_k: None, top_p: None, seed: 42 };
    let a = generate_ids(&m, &prompt, &hot, |_| {}).unwrap();
    assert_eq!(a, generate_ids(&m, &prompt, &hot, |_| {}).unwrap(), "same seed, same text");
    let b = generate_ids(&m, &prompt, &SampleOptions { seed: 43, ..hot }, |_| {}).unwrap();
    assert_ne!(a, b, "another seed, another text");
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    // Probabilities 0.5, 0.25, 0.125, 0.125 (logits are their logs), shuffled ids.
    let logits =
        [(0.125f64).ln() as f32, (0.5f64).ln() as f32, (0.125f64).ln() as f32, (0.25f64).ln() as f32];
    let opts = |p: f64| SampleOptions { temperature: 1.0, top_p: Some(p), ..SampleOptions::default() };
    let ids = |p: f64| filtered_probs(&logits, &opts(p)).iter().map(|&(i, _)| i).collect::<Vec<_>>();
    assert_eq!(ids(0.4), vec![1]);
    assert_eq!(ids(0.5), vec![1]);
    assert_eq!(ids(0.6), vec![1, 3]);
    assert_eq!(ids(0.8), vec![1, 3, 0], "ties keep the lower id first");
    assert_eq!(ids(1.0), vec![1, 3, 0, 2]);
    let probs = filtered_probs(&logits, &opts(0.6));
    assert!((probs[0].1 - 2.0 / 3.0).abs() < 1e-9 && (probs[1].1 - 1.0 / 3.0).abs() < 1e-9, "{probs:?}");
    // top-k then top-p; NaN and −∞ are never kept.
    let k2 = SampleOptions { top_k: Some(2), top_p: None, temperature: 1.0, ..SampleOptions::default() };
    assert_eq!(filtered_probs(&logits, &k2).iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![1, 3]);
    let odd = [f32::NAN, 1.0, f32::NEG_INFINITY, 1.0];
    let all = SampleOptions { temperature: 1.0, ..SampleOptions::default() };
    assert_eq!(filtered_probs(&odd, &all), vec![(1, 0.5), (3, 0.5)]);
    assert_eq!(argmax(&odd), 1);
    // Sampling only ever returns nucleus ids, with about the right frequencies.
    let mut rng = Rng::new(9);
    let mut counts = [0usize; 4];
    for _ in 0..4000 {
        counts[sample_token(&logits, &opts(0.6), &mut rng) as usize] += 1;
    }
    assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
    let share = counts[1] as f64 / 4000.0;
    assert!((share - 2.0 / 3.0).abs() < 0.05, "{counts:?}");
}

#[test]
fn temperature_sharpens_and_flattens() {
    let logits = [2.0f32, 1.0, 0.0];
    let p =
        |t: f64| filtered_probs(&logits, &SampleOptions { temperature: t, ..SampleOptions::default() })[0].1;
    assert!(p(0.5) > p(1.0) && p(1.0) > p(2.0));
    let want = 1.0 / (1.0 + (-1.0f64).exp() + (-2.0f64).exp());
    assert!((p(1.0) - want).abs() < 1e-9);
    // Temperature 0 is greedy, whatever the RNG.
    let mut rng = Rng::new(0);
    assert!((0..50).all(|_| sample_token(&[0.0, 3.0, 3.0], &greedy(1), &mut rng) == 1));
}

#[test]
fn text_generation_streams_and_bad_arguments_are_named() {
    let m = model();
    let tok = Tokenizer::Byte;
    let opts =
        SampleOptions { max_new_tokens: 16, temperature: 0.9, top_k: Some(20), top_p: Some(0.95), seed: 5 };
    let mut pieces = Vec::new();
    let text = generate(&m, &tok, "", &opts, |s| pieces.push(s.to_string())).unwrap();
    assert_eq!(pieces.concat(), text);
    let ids = generate_ids(&m, &tok.encode("\n").unwrap(), &opts, |_| {}).unwrap();
    assert_eq!(text, tok.decode(&ids).unwrap(), "an empty prompt starts from a newline");

    let capped = generate_ids_capped(&m, &[65, 66, 67], &opts, Some(8), |_| {}).unwrap();
    assert_eq!(capped.len(), 5, "prompt 3 + 5 new = max_len 8");
    assert!(generate_ids(&m, &[65], &SampleOptions { max_new_tokens: 0, ..opts }, |_| {})
        .unwrap()
        .is_empty());

    let err = |r: Result<Vec<u32>, moeba_train::TrainError>| r.unwrap_err().to_string();
    assert!(err(generate_ids(&m, &[], &opts, |_| {})).contains("prompt"));
    assert!(err(generate_ids(&m, &[300], &opts, |_| {})).contains("300"));
    assert!(err(generate_ids(&m, &[1], &SampleOptions { temperature: -1.0, ..opts }, |_| {}))
        .contains("temperature"));
    assert!(
        err(generate_ids(&m, &[1], &SampleOptions { top_p: Some(0.0), ..opts }, |_| {})).contains("top_p")
    );
    assert!(err(generate_ids_capped(&m, &[1; 9], &opts, Some(8), |_| {})).contains("max_seq_len"));
}
