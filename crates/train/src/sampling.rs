//! Sampling from a [`HybridModel`]: prefill the prompt into the per-layer caches, then decode one
//! token at a time with temperature, top-k and top-p (nucleus) filtering, streaming each token.

use moeba_autograd::no_grad;
use moeba_nn::HybridModel;
use moeba_tensor::{DType, Device, Rng, Tensor};

use crate::tokenizer::Tokenizer;
use crate::trainer::TrainError;

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy (argmax, lowest id on ties).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`None` or ≥ 1: all).
    pub top_p: Option<f64>,
    /// Sampling seed.
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions { max_new_tokens: 200, temperature: 0.8, top_k: None, top_p: None, seed: 0 }
    }
}

/// Picks the next token from `logits (V)` as `opts` says (see [`SampleOptions`]).
///
/// NaN logits are never picked (they count as −∞); an empty slice gives 0.
pub fn sample_token(logits: &[f32], opts: &SampleOptions, rng: &mut Rng) -> u32 {
    let greedy = !(opts.temperature > 0.0 && opts.temperature.is_finite());
    if greedy || opts.top_k == Some(1) {
        return argmax(logits);
    }
    let probs = filtered_probs(logits, opts);
    if probs.is_empty() {
        return argmax(logits);
    }
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    let mut u = rng.uniform() * total;
    for &(id, p) in &probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs.last().map_or(0, |&(id, _)| id)
}

/// The argmax of `logits`, lowest id on ties, NaN never chosen (0 when all are NaN or empty).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// The distribution [`sample_token`] draws from: `(id, probability)` of the tokens that survive
/// temperature, top-k and top-p, most likely first (ties: lowest id first), probabilities
/// renormalised to sum to 1. Empty when every logit is NaN or −∞.
pub fn filtered_probs(logits: &[f32], opts: &SampleOptions) -> Vec<(u32, f64)> {
    let temp = if opts.temperature > 0.0 && opts.temperature.is_finite() { opts.temperature } else { 1.0 };
    let mut order: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan() && **v != f32::NEG_INFINITY)
        .map(|(i, &v)| (i as u32, v as f64 / temp))
        .collect();
    // Stable sort: equal logits keep ascending ids.
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = opts.top_k.filter(|&k| k > 0) {
        order.truncate(k);
    }
    let Some(&(_, max)) = order.first() else { return Vec::new() };
    if max == f64::INFINITY {
        // +∞ logits take all the mass, shared evenly.
        order.retain(|&(_, v)| v == f64::INFINITY);
        let p = 1.0 / order.len() as f64;
        return order.into_iter().map(|(i, _)| (i, p)).collect();
    }
    let mut probs: Vec<(u32, f64)> = order.into_iter().map(|(i, v)| (i, (v - max).exp())).collect();
    let z: f64 = probs.iter().map(|&(_, p)| p).sum();
    for (_, p) in probs.iter_mut() {
        *p /= z;
    }
    if let Some(top_p) = opts.top_p.filter(|&p| p < 1.0) {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, &(_, p)) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        let z: f64 = probs.iter().map(|&(_, p)| p).sum();
        for (_, p) in probs.iter_mut() {
            *p /= z;
        }
    }
    probs
}

fn bad(key: &str, msg: impl Into<String>) -> TrainError {
    TrainError::Invalid { key: key.to_string(), msg: msg.into() }
}

fn check_options(opts: &SampleOptions) -> Result<(), TrainError> {
    if opts.temperature.is_nan() || opts.temperature < 0.0 || opts.temperature.is_infinite() {
        return Err(bad("temperature", format!("must be ≥ 0 (0 = greedy), got {}", opts.temperature)));
    }
    if let Some(p) = opts.top_p {
        if p.is_nan() || p <= 0.0 {
            return Err(bad("top_p", format!("must be in (0, 1] (1 = off), got {p}")));
        }
    }
    Ok(())
}

/// Generates from `prompt_ids` (at least one id), calling `on_token` with each new id as it is
/// made; returns the new ids. Stops early at `max_seq_len` of the model when it has attention
/// layers with a fixed capacity. Errors name the bad argument.
///
/// The decoding caches are sized for the prompt plus `max_new_tokens`, so this never stops early;
/// [`generate_ids_capped`] stops at an explicit total length (a run's `model.max_seq_len`).
pub fn generate_ids(
    model: &HybridModel,
    prompt_ids: &[u32],
    opts: &SampleOptions,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>, TrainError> {
    generate_ids_capped(model, prompt_ids, opts, None, on_token)
}

/// [`generate_ids`] that stops once prompt + generated tokens reach `max_len` (a prompt longer
/// than `max_len` is an error naming `prompt`).
pub fn generate_ids_capped(
    model: &HybridModel,
    prompt_ids: &[u32],
    opts: &SampleOptions,
    max_len: Option<usize>,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>, TrainError> {
    generate_ids_until(model, prompt_ids, opts, max_len, &[], on_token)
}

/// [`generate_ids_capped`] that also stops after the first generated token found in `stop` (an
/// end-of-sequence id; it is returned, as transformers' `generate` does). The one decoding loop
/// every `generate*` function runs.
pub fn generate_ids_until(
    model: &HybridModel,
    prompt_ids: &[u32],
    opts: &SampleOptions,
    max_len: Option<usize>,
    stop: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, TrainError> {
    check_options(opts)?;
    if prompt_ids.is_empty() {
        return Err(bad("prompt", "is empty: give at least one token"));
    }
    let vocab = model.config().vocab_size;
    if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(bad("prompt", format!("token id {id} is out of the model's vocabulary of {vocab}")));
    }
    let mut budget = opts.max_new_tokens;
    if let Some(max) = max_len {
        if prompt_ids.len() > max {
            return Err(bad(
                "prompt",
                format!("{} tokens are more than the model's max_seq_len = {max}", prompt_ids.len()),
            ));
        }
        budget = budget.min(max - prompt_ids.len());
    }
    if budget == 0 {
        return Ok(Vec::new());
    }
    let _guard = no_grad();
    let device = Device::Cpu;
    let mut cache = model.new_cache(1, prompt_ids.len() + budget)?;
    let ids = Tensor::from_vec(prompt_ids.to_vec(), (1, prompt_ids.len()), &device)?;
    let mut logits = model.prefill(&ids, &mut cache)?;
    let mut rng = Rng::new(opts.seed);
    let mut out = Vec::with_capacity(budget);
    loop {
        let row = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec::<f32>()?;
        let next = sample_token(&row, opts, &mut rng);
        out.push(next);
        on_token(next);
        if out.len() == budget || stop.contains(&next) {
            break;
        }
        logits = model.forward_step(&Tensor::from_vec(vec![next], 1, &device)?, &mut cache)?;
    }
    Ok(out)
}

/// Text in, text out: encodes `prompt` (an empty prompt starts from a newline), generates, and
/// calls `on_text` with each piece of text as soon as it decodes (streaming). Returns the
/// generated text (without the prompt).
pub fn generate(
    model: &HybridModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &SampleOptions,
    on_text: impl FnMut(&str),
) -> Result<String, TrainError> {
    generate_capped(model, tokenizer, prompt, opts, None, on_text)
}

/// [`generate`] that stops once prompt + generated tokens reach `max_len` tokens.
pub fn generate_capped(
    model: &HybridModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &SampleOptions,
    max_len: Option<usize>,
    mut on_text: impl FnMut(&str),
) -> Result<String, TrainError> {
    let prompt = if prompt.is_empty() { "\n" } else { prompt };
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        return Err(bad("prompt", format!("{prompt:?} encodes to no tokens with {}", tokenizer.name())));
    }
    let mut decoder = tokenizer.stream_decoder();
    let mut text = String::new();
    let mut err = None;
    generate_ids_capped(model, &ids, opts, max_len, |id| {
        if err.is_some() {
            return;
        }
        match decoder.push(id) {
            Ok(piece) if !piece.is_empty() => {
                on_text(&piece);
                text.push_str(&piece);
            }
            Ok(_) => {}
            Err(e) => err = Some(e),
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    let rest = decoder.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(text)
}
