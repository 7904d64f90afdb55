//! The hybrid model: every mixer × feed-forward builds and trains, parameter names and counts,
//! tied and untied heads, prefill + step-by-step decoding against the full forward, the MoE aux
//! loss and routing reports, recompute levels against no recompute, a finite-difference check of
//! the whole model, and the errors.

use moeba_autograd::Var;
use moeba_nn::attention::AttentionConfig;
use moeba_nn::mamba::MambaConfig;
use moeba_nn::mamba2::Mamba2Config;
use moeba_nn::mla::MlaConfig;
use moeba_nn::moe::{MoeConfig, MoeContext, RoutingKind};
use moeba_nn::{
    BlockConfig, FfnConfig, ForwardOptions, HybridConfig, HybridModel, MixerConfig, ParamStore, Recompute,
    RopeConfig,
};
use moeba_tensor::{DType, Device, Result, Tensor};

const D: usize = 32;
const V: usize = 37;

fn mamba() -> MixerConfig {
    MixerConfig::Mamba(MambaConfig { d_state: 4, d_conv: 3, dt_rank: 3, ..MambaConfig::new(D) })
}

fn mamba2() -> MixerConfig {
    MixerConfig::Mamba2(Mamba2Config {
        d_state: 8,
        head_dim: 16,
        num_heads: 4,
        n_groups: 2,
        chunk_size: 4,
        ..Mamba2Config::new(D)
    })
}

fn attention() -> MixerConfig {
    MixerConfig::Attention(AttentionConfig { qk_norm: true, ..AttentionConfig::new(D, 4, 2, 8) })
}

fn mla() -> MixerConfig {
    MixerConfig::Mla(MlaConfig {
        d_model: D,
        num_heads: 2,
        q_latent_dim: Some(12),
        kv_latent_dim: 16,
        qk_nope_head_dim: 8,
        d_rope: 4,
        v_head_dim: 6,
        rope: RopeConfig::interleaved(10000.0),
        norm_eps: 1e-6,
        softmax_scale: None,
    })
}

fn mixers() -> Vec<(&'static str, MixerConfig)> {
    vec![("mamba", mamba()), ("mamba2", mamba2()), ("attention", attention()), ("mla", mla())]
}

fn mlp() -> FfnConfig {
    FfnConfig::Mlp { intermediate_size: 40 }
}

fn moe_cfg() -> MoeConfig {
    MoeConfig { z_loss_alpha: 0.001, ..MoeConfig::new(D, 24, 4, 2).with_shared_expert(16, true) }
}

fn moe() -> FfnConfig {
    FfnConfig::Moe(moe_cfg())
}

fn config(blocks: Vec<(MixerConfig, FfnConfig)>, tie: bool) -> HybridConfig {
    HybridConfig {
        vocab_size: V,
        hidden_size: D,
        blocks: blocks.into_iter().map(|(mixer, ffn)| BlockConfig { mixer, ffn }).collect(),
        tie_embeddings: tie,
        norm_eps: 1e-5,
    }
}

/// Mamba, Mamba-2, attention and MLA mixers; MoE (top-k, hash) and MLP feed-forwards.
fn mixed() -> HybridConfig {
    let hash = FfnConfig::Moe(MoeConfig::new(D, 24, 4, 2).with_strategy(RoutingKind::Hash { seed: 3 }));
    config(vec![(mamba(), moe()), (attention(), mlp()), (mamba2(), hash), (mla(), moe())], false)
}

fn build(cfg: &HybridConfig, dtype: DType, seed: u64) -> (ParamStore, HybridModel) {
    let store = ParamStore::new(dtype, Device::Cpu, seed);
    let model = HybridModel::new(&store.root(), cfg).unwrap();
    (store, model)
}

fn ids(seed: u64, b: usize, l: usize) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<u32> = (0..b * l)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % V as u64) as u32
        })
        .collect();
    Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn finite(t: &Tensor) -> bool {
    t.to_vec_f64().unwrap().iter().all(|x| x.is_finite())
}

/// Loss = LM loss (+ aux loss), and every parameter's gradient, by name.
fn loss_and_grads(
    store: &ParamStore,
    model: &HybridModel,
    x: &Tensor,
    y: &Tensor,
    opts: &ForwardOptions,
) -> (f64, Vec<(String, Tensor)>) {
    let out = model.forward(x, opts).unwrap();
    let mut loss = HybridModel::lm_loss(&out.logits, y).unwrap();
    if let Some(a) = &out.aux_loss {
        loss = loss.add(a).unwrap();
    }
    let grads = loss.backward().unwrap();
    let named = store
        .params()
        .iter()
        .filter_map(|p| grads.get(&p.var()).map(|g| (p.name().to_string(), g.clone())))
        .collect();
    (loss.tensor().to_vec_f64().unwrap()[0], named)
}

#[test]
fn every_mixer_and_ffn_builds_and_trains() {
    for (name, mixer) in mixers() {
        for (fname, ffn) in [("mlp", mlp()), ("moe", moe())] {
            let cfg = config(vec![(mixer.clone(), ffn.clone()), (mixer.clone(), ffn)], true);
            let (store, model) = build(&cfg, DType::F32, 7);
            let (x, y) = (ids(1, 2, 9), ids(2, 2, 9));
            let out = model.forward(&x, &ForwardOptions::default()).unwrap();
            assert_eq!(out.logits.dims(), &[2, 9, V], "{name}/{fname}");
            assert!(finite(out.logits.tensor()), "{name}/{fname}");
            assert_eq!(out.aux_loss.is_some(), fname == "moe", "{name}/{fname}");
            assert_eq!(out.routing.len(), if fname == "moe" { 2 } else { 0 });
            let (loss, grads) = loss_and_grads(&store, &model, &x, &y, &ForwardOptions::default());
            assert!(loss.is_finite() && loss > 0.0, "{name}/{fname}: {loss}");
            // Every mixer and norm parameter and the embedding get a finite gradient.
            for p in store.params() {
                let routed = p.name().contains(".experts.");
                let g = grads.iter().find(|(n, _)| n == p.name());
                if !routed {
                    let g = g.unwrap_or_else(|| panic!("{name}/{fname}: no gradient for {}", p.name()));
                    assert!(finite(&g.1), "{}", p.name());
                }
            }
        }
    }
}

#[test]
fn lm_loss_is_mean_cross_entropy() {
    let (_, model) = build(&config(vec![(attention(), mlp())], true), DType::F64, 3);
    let (x, y) = (ids(5, 2, 6), ids(6, 2, 6));
    let out = model.forward(&x, &ForwardOptions::default()).unwrap();
    let loss = HybridModel::lm_loss(&out.logits, &y).unwrap().tensor().to_vec_f64().unwrap()[0];
    let logits = out.logits.tensor().to_vec_f64().unwrap();
    let targets = y.to_vec::<u32>().unwrap();
    let mut want = 0.0;
    for (row, &t) in logits.chunks(V).zip(&targets) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        want += lse - row[t as usize];
    }
    want /= targets.len() as f64;
    assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
    // I64 targets give the same.
    let y64 = Tensor::from_vec(targets.iter().map(|&t| t as i64).collect::<Vec<_>>(), (2, 6), &Device::Cpu)
        .unwrap();
    let l64 = HybridModel::lm_loss(&out.logits, &y64).unwrap().tensor().to_vec_f64().unwrap()[0];
    assert_eq!(l64, loss);
}

#[test]
fn parameter_names_and_shapes() {
    let (store, _) = build(&mixed(), DType::F32, 1);
    let shape = |n: &str| store.get(n).unwrap_or_else(|| panic!("missing {n}")).tensor().dims().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), [V, D]);
    assert_eq!(shape("model.final_layernorm.weight"), [D]);
    assert_eq!(shape("lm_head.weight"), [V, D]);
    for i in 0..4 {
        assert_eq!(shape(&format!("model.layers.{i}.input_layernorm.weight")), [D]);
        assert_eq!(shape(&format!("model.layers.{i}.pre_ff_layernorm.weight")), [D]);
    }
    // Layer 0: Mamba + MoE (top-k, gated shared expert).
    assert_eq!(shape("model.layers.0.mixer.in_proj.weight"), [4 * D, D]);
    assert_eq!(shape("model.layers.0.mixer.conv1d.weight"), [2 * D, 1, 3]);
    assert_eq!(shape("model.layers.0.mixer.x_proj.weight"), [3 + 8, 2 * D]);
    assert_eq!(shape("model.layers.0.mixer.dt_proj.weight"), [2 * D, 3]);
    assert_eq!(shape("model.layers.0.mixer.A_log"), [2 * D, 4]);
    assert_eq!(shape("model.layers.0.mixer.out_proj.weight"), [D, 2 * D]);
    assert_eq!(shape("model.layers.0.feed_forward.gate.weight"), [4, D]);
    assert_eq!(shape("model.layers.0.feed_forward.experts.gate_up_proj"), [4, 48, D]);
    assert_eq!(shape("model.layers.0.feed_forward.experts.down_proj"), [4, D, 24]);
    assert_eq!(shape("model.layers.0.feed_forward.shared_expert.gate_proj.weight"), [16, D]);
    assert_eq!(shape("model.layers.0.feed_forward.shared_expert_gate.weight"), [1, D]);
    // Layer 1: attention + MLP.
    assert_eq!(shape("model.layers.1.self_attn.q_proj.weight"), [32, D]);
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [16, D]);
    assert_eq!(shape("model.layers.1.self_attn.q_norm.weight"), [8]);
    assert_eq!(shape("model.layers.1.feed_forward.gate_proj.weight"), [40, D]);
    assert_eq!(shape("model.layers.1.feed_forward.up_proj.weight"), [40, D]);
    assert_eq!(shape("model.layers.1.feed_forward.down_proj.weight"), [D, 40]);
    // Layer 2: Mamba-2 + hash MoE (no router).
    assert_eq!(shape("model.layers.2.mixer.in_proj.weight"), [2 * 64 + 2 * 2 * 8 + 4, D]);
    assert_eq!(shape("model.layers.2.mixer.dt_bias"), [4]);
    assert_eq!(shape("model.layers.2.mixer.norm.weight"), [64]);
    assert!(store.get("model.layers.2.feed_forward.gate.weight").is_none());
    // Layer 3: MLA.
    assert_eq!(shape("model.layers.3.self_attn.q_a_proj.weight"), [12, D]);
    assert_eq!(shape("model.layers.3.self_attn.kv_a_proj_with_mqa.weight"), [16 + 4, D]);
    assert_eq!(shape("model.layers.3.self_attn.kv_b_proj.weight"), [2 * (8 + 6), 16]);
    assert_eq!(shape("model.layers.3.self_attn.o_proj.weight"), [D, 12]);
    // Nothing outside these families.
    for p in store.params() {
        let n = p.name();
        assert!(
            n == "lm_head.weight"
                || n.starts_with("model.embed_tokens.")
                || n.starts_with("model.final_layernorm.")
                || (0..4).any(|i| {
                    let l = format!("model.layers.{i}.");
                    n.strip_prefix(&l).is_some_and(|r| {
                        ["input_layernorm.", "pre_ff_layernorm.", "mixer.", "self_attn.", "feed_forward."]
                            .iter()
                            .any(|s| r.starts_with(s))
                    })
                }),
            "unexpected parameter {n}"
        );
    }
    // Mamba layers put their mixer under `mixer`, attention layers under `self_attn`, never both.
    assert!(!store.params().iter().any(|p| p.name().starts_with("model.layers.0.self_attn")));
    assert!(!store.params().iter().any(|p| p.name().starts_with("model.layers.1.mixer")));
}

#[test]
fn tied_head_is_the_embedding() {
    let tied = config(vec![(mamba(), mlp()), (attention(), moe())], true);
    let untied = HybridConfig { tie_embeddings: false, ..tied.clone() };
    let (st, mt) = build(&tied, DType::F32, 9);
    let (su, mu) = build(&untied, DType::F32, 9);
    assert!(st.get("lm_head.weight").is_none());
    let head = su.get("lm_head.weight").unwrap();
    let x = ids(4, 2, 5);
    let before = mu.forward(&x, &ForwardOptions::default()).unwrap().logits;
    let lt = mt.forward(&x, &ForwardOptions::default()).unwrap().logits;
    assert!(max_diff(before.tensor(), lt.tensor()) > 1e-3, "an untied head differs");
    // Parameters are seeded by name: with lm_head = embed_tokens the two models agree exactly.
    head.set(su.get("model.embed_tokens.weight").unwrap().tensor()).unwrap();
    let lu = mu.forward(&x, &ForwardOptions::default()).unwrap().logits;
    assert_eq!(max_diff(lu.tensor(), lt.tensor()), 0.0);
    // The tied embedding gets the gradient of both uses.
    let y = ids(5, 2, 5);
    let (_, gt) = loss_and_grads(&st, &mt, &x, &y, &ForwardOptions::default());
    let (_, gu) = loss_and_grads(&su, &mu, &x, &y, &ForwardOptions::default());
    let get = |g: &[(String, Tensor)], n: &str| g.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let sum =
        moeba_kernels::ops::add(&get(&gu, "model.embed_tokens.weight"), &get(&gu, "lm_head.weight")).unwrap();
    assert!(max_diff(&get(&gt, "model.embed_tokens.weight"), &sum) < 1e-5);
    assert_eq!(mt.param_counts().total + V * D, mu.param_counts().total);
}

#[test]
fn param_counts_by_hand() {
    // Block 0: Mamba + MLP; block 1: attention + MoE (4 experts of 24, top-2, gated shared 16).
    let cfg = config(vec![(mamba(), mlp()), (attention(), moe())], false);
    let (store, model) = build(&cfg, DType::F32, 0);
    let c = model.param_counts();
    let di = 2 * D;
    let mamba = D * 2 * di + di * 3 + di + di * (3 + 8) + di * 3 + di + di * 4 + di + D * di;
    let mlp = 3 * D * 40;
    let attn = D * 32 + 2 * D * 16 + 32 * D + 8 + 8;
    let router = 4 * D;
    let expert = 3 * 24 * D;
    let shared = 3 * 16 * D + D;
    let norms = 4 * D + D;
    let emb = 2 * V * D;
    let total = mamba + mlp + attn + router + 4 * expert + shared + norms + emb;
    assert_eq!(c.total, total);
    assert_eq!(c.total, store.num_elements());
    assert_eq!(c.active, total - 2 * expert);
    assert_eq!(c.embedding, emb);
    // Dense gating runs every expert.
    let dense = MoeConfig::new(D, 24, 4, 2).with_strategy(RoutingKind::DenseGated);
    let (_, m) = build(&config(vec![(attention(), FfnConfig::Moe(dense))], true), DType::F32, 0);
    assert_eq!(m.param_counts().active, m.param_counts().total);
    assert_eq!(m.param_counts().embedding, V * D);
}

#[test]
fn cache_bytes_by_hand() {
    let (_, model) = build(&mixed(), DType::F32, 0);
    let mamba = 2 * D * (3 + 4);
    let mamba2 = (64 + 2 * 2 * 8) * 4 + 4 * 16 * 8;
    let per_tok = 2 * 2 * 8 + (16 + 4);
    for ctx in [0, 1, 100] {
        assert_eq!(model.cache_bytes(ctx), 4 * (mamba + mamba2 + per_tok * ctx));
    }
    let (_, m64) = build(&mixed(), DType::F64, 0);
    assert_eq!(m64.cache_bytes(10), 2 * model.cache_bytes(10));
}

/// Logits of `forward` at every position, `(b, l, V)` as rows `[b][t]`.
fn full_logits(model: &HybridModel, x: &Tensor) -> Tensor {
    model.forward(x, &ForwardOptions::default()).unwrap().logits.tensor().clone()
}

fn at(t: &Tensor, pos: usize) -> Tensor {
    t.narrow(1, pos, 1).unwrap().squeeze(1).unwrap().contiguous().unwrap()
}

fn decode_matches_forward(dtype: DType, tol: f64) {
    let (_, model) = build(&mixed(), dtype, 11);
    let (b, l) = (2, 11);
    let x = ids(3, b, l);
    let want = full_logits(&model, &x);
    let col = |t: usize| x.narrow(1, t, 1).unwrap().squeeze(1).unwrap().contiguous().unwrap();

    // Step by step from an empty cache.
    let mut cache = model.new_cache(b, l).unwrap();
    for t in 0..l {
        let got = model.forward_step(&col(t), &mut cache).unwrap();
        assert_eq!(got.dims(), &[b, V]);
        let e = max_diff(&got, &at(&want, t));
        assert!(e < tol, "{dtype} step {t}: {e}");
    }
    assert_eq!(cache.pos, l);

    // Prefill 4, prefill 3 more (a cache that is no longer fresh), then steps.
    let mut cache = model.new_cache(b, l).unwrap();
    let got = model.prefill(&x.narrow(1, 0, 4).unwrap().contiguous().unwrap(), &mut cache).unwrap();
    assert!(max_diff(&got, &at(&want, 3)) < tol, "{dtype} prefill");
    let got = model.prefill(&x.narrow(1, 4, 3).unwrap().contiguous().unwrap(), &mut cache).unwrap();
    assert!(max_diff(&got, &at(&want, 6)) < tol, "{dtype} second prefill");
    for t in 7..l {
        let got = model.forward_step(&col(t), &mut cache).unwrap();
        let e = max_diff(&got, &at(&want, t));
        assert!(e < tol, "{dtype} step {t} after prefill: {e}");
    }
    // The cache is full now: one more token is refused and leaves the cache as it was.
    let e = model.forward_step(&col(0), &mut cache).unwrap_err().to_string();
    assert!(e.contains("capacity"), "{e}");
    assert_eq!(cache.pos, l);
}

#[test]
fn prefill_and_steps_equal_forward_f32() {
    decode_matches_forward(DType::F32, 1e-4);
}

#[test]
fn prefill_and_steps_equal_forward_f64() {
    decode_matches_forward(DType::F64, 1e-10);
}

#[test]
fn moe_aux_loss_and_routing_reports() {
    let (_, model) = build(&mixed(), DType::F64, 5);
    let x = ids(8, 3, 7);
    let out = model.forward(&x, &ForwardOptions::default()).unwrap();
    // Blocks 0, 2 (hash: no aux loss) and 3 are MoE.
    let blocks: Vec<usize> = out.routing.iter().map(|(i, _)| *i).collect();
    assert_eq!(blocks, [0, 2, 3]);
    assert_eq!(model.moe_layers().iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2, 3]);
    for (_, s) in &out.routing {
        assert_eq!(s.tokens, 21);
        assert_eq!(s.assignments(), 42.0);
    }
    let assign: Vec<usize> = out.assignments.iter().map(|(i, _)| *i).collect();
    assert_eq!(assign, [0, 2, 3]);
    for (_, a) in &out.assignments {
        assert_eq!(a.dims(), &[21]);
        assert_eq!(a.dtype(), DType::U32);
        assert!(a.to_vec::<u32>().unwrap().iter().all(|&e| e < 4));
    }
    let aux = out.aux_loss.as_ref().unwrap().tensor().to_vec_f64().unwrap()[0];
    assert!(aux > 0.0 && aux.is_finite());
    // Hash routing follows the token ids: equal ids go to equal experts.
    let a2 = out.assignments[1].1.to_vec::<u32>().unwrap();
    let xs = x.to_vec::<u32>().unwrap();
    for i in 0..xs.len() {
        for j in 0..xs.len() {
            if xs[i] == xs[j] {
                assert_eq!(a2[i], a2[j]);
            }
        }
    }
    // Without alphas the aux loss is absent.
    let mut cfg = mixed();
    for b in &mut cfg.blocks {
        if let FfnConfig::Moe(m) = &mut b.ffn {
            m.lb_loss_alpha = 0.0;
            m.z_loss_alpha = 0.0;
        }
    }
    let (_, m0) = build(&cfg, DType::F64, 5);
    assert!(m0.forward(&x, &ForwardOptions::default()).unwrap().aux_loss.is_none());
}

#[test]
fn aux_loss_is_the_sum_of_the_layers_weighted_totals() {
    let mut cfg = config(vec![(mamba(), moe()), (mla(), moe())], true);
    for b in &mut cfg.blocks {
        if let FfnConfig::Moe(m) = &mut b.ffn {
            m.lb_loss_alpha = 0.5;
            m.z_loss_alpha = 0.25;
        }
    }
    let (_, model) = build(&cfg, DType::F64, 2);
    let x = ids(1, 2, 6);
    let with = model.forward(&x, &ForwardOptions::default()).unwrap().aux_loss.unwrap();
    let mut half = cfg.clone();
    for b in &mut half.blocks {
        if let FfnConfig::Moe(m) = &mut b.ffn {
            m.lb_loss_alpha = 0.25;
            m.z_loss_alpha = 0.125;
        }
    }
    // Same seed, same names: the same parameters, the alphas halved.
    let (_, mh) = build(&half, DType::F64, 2);
    let h = mh.forward(&x, &ForwardOptions::default()).unwrap().aux_loss.unwrap();
    let (a, b) = (with.tensor().to_vec_f64().unwrap()[0], h.tensor().to_vec_f64().unwrap()[0]);
    assert!((a - 2.0 * b).abs() < 1e-12, "{a} vs 2 × {b}");
    // Only the first layer weighted: less than both.
    let mut first = cfg.clone();
    if let FfnConfig::Moe(m) = &mut first.blocks[1].ffn {
        m.lb_loss_alpha = 0.0;
        m.z_loss_alpha = 0.0;
    }
    let mut second = cfg.clone();
    if let FfnConfig::Moe(m) = &mut second.blocks[0].ffn {
        m.lb_loss_alpha = 0.0;
        m.z_loss_alpha = 0.0;
    }
    let aux_of = |c: &HybridConfig| {
        let (_, m) = build(c, DType::F64, 2);
        m.forward(&x, &ForwardOptions::default()).unwrap().aux_loss.unwrap().tensor().to_vec_f64().unwrap()[0]
    };
    let (f, s) = (aux_of(&first), aux_of(&second));
    assert!(f > 0.0 && s > 0.0 && (a - (f + s)).abs() < 1e-12, "{a} vs {f} + {s}");
}

fn recompute_case(dtype: DType, tol: f64) {
    let mut cfg = mixed();
    for b in &mut cfg.blocks {
        if let FfnConfig::Moe(m) = &mut b.ffn {
            m.jitter_noise = 0.1; // seeded per step and layer: recomputed the same
        }
    }
    let (x, y) = (ids(21, 2, 8), ids(22, 2, 8));
    let mut base: Option<(f64, Vec<(String, Tensor)>)> = None;
    for level in [Recompute::None, Recompute::Mixer, Recompute::Block] {
        let (store, model) = build(&cfg, dtype, 4);
        let opts = ForwardOptions { recompute: level, moe: MoeContext::training(3, 99) };
        let (loss, grads) = loss_and_grads(&store, &model, &x, &y, &opts);
        match &base {
            None => base = Some((loss, grads)),
            Some((l0, g0)) => {
                assert!((loss - l0).abs() <= tol, "{level:?}: loss {loss} vs {l0}");
                assert_eq!(grads.len(), g0.len(), "{level:?}: gradients for other parameters");
                for ((n, g), (n0, g0)) in grads.iter().zip(g0) {
                    assert_eq!(n, n0);
                    let e = max_diff(g, g0);
                    assert!(e <= tol, "{level:?}: {n} differs by {e}");
                }
            }
        }
    }
}

#[test]
fn recompute_levels_give_the_same_loss_and_gradients() {
    recompute_case(DType::F64, 1e-12);
    recompute_case(DType::F32, 1e-6);
}

#[test]
fn recompute_levels_agree_in_eval_mode() {
    let (_, model) = build(&mixed(), DType::F32, 4);
    let x = ids(2, 2, 6);
    let _g = moeba_autograd::no_grad();
    let base = full_logits(&model, &x);
    for level in [Recompute::Mixer, Recompute::Block] {
        let out = model.forward(&x, &ForwardOptions { recompute: level, ..Default::default() }).unwrap();
        assert_eq!(max_diff(out.logits.tensor(), &base), 0.0);
    }
}

/// Central differences on a few entries of a few parameters of a tiny f64 model, against the
/// analytic gradient of LM loss + aux loss.
#[test]
fn gradient_check_whole_model() -> Result<()> {
    let cfg = HybridConfig {
        vocab_size: 11,
        hidden_size: 16,
        blocks: vec![
            BlockConfig {
                mixer: MixerConfig::Mamba(MambaConfig { d_state: 4, d_conv: 3, ..MambaConfig::new(16) }),
                ffn: FfnConfig::Moe(MoeConfig { z_loss_alpha: 0.01, ..MoeConfig::new(16, 8, 3, 2) }),
            },
            BlockConfig {
                mixer: MixerConfig::Attention(AttentionConfig::new(16, 2, 1, 8)),
                ffn: FfnConfig::Mlp { intermediate_size: 12 },
            },
        ],
        tie_embeddings: true,
        norm_eps: 1e-5,
    };
    let store = ParamStore::new(DType::F64, Device::Cpu, 17);
    let model = HybridModel::new(&store.root(), &cfg)?;
    let x = Tensor::from_vec(vec![1u32, 4, 7, 2, 9, 0, 3, 3, 10, 5], (2, 5), &Device::Cpu)?;
    let y = Tensor::from_vec(vec![4u32, 7, 2, 9, 0, 3, 3, 10, 5, 1], (2, 5), &Device::Cpu)?;
    let loss_of = || -> Result<Var> {
        let out = model.forward(&x, &ForwardOptions::default())?;
        let l = HybridModel::lm_loss(&out.logits, &y)?;
        match out.aux_loss {
            Some(a) => l.add(&a),
            None => Ok(l),
        }
    };
    let loss = loss_of()?;
    let grads = loss.backward()?;
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mixer.in_proj.weight",
        "model.layers.0.mixer.A_log",
        "model.layers.0.mixer.dt_proj.bias",
        "model.layers.0.feed_forward.gate.weight",
        "model.layers.0.feed_forward.experts.down_proj",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.feed_forward.up_proj.weight",
        "model.final_layernorm.weight",
    ];
    let eps = 1e-6;
    for name in names {
        let p = store.get(name).unwrap();
        let g = grads.get(&p.var()).unwrap_or_else(|| panic!("no gradient for {name}")).to_vec_f64()?;
        let v0 = p.tensor();
        let base = v0.to_vec_f64()?;
        let n = base.len();
        for k in [0, n / 3, n - 1] {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[k] += delta;
                p.set(Tensor::from_vec(v, v0.shape().clone(), &Device::Cpu)?)?;
                let l = moeba_autograd::with_no_grad(loss_of)?;
                Ok(l.tensor().to_vec_f64()?[0])
            };
            let num = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            p.set(v0.clone())?;
            let err = (num - g[k]).abs();
            assert!(err <= 1e-6 + 1e-4 * num.abs(), "{name}[{k}]: analytic {} vs numeric {num}", g[k]);
        }
    }
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (_, model) = build(&mixed(), DType::F32, 0);
    let opts = ForwardOptions::default();
    let err = |r: Result<moeba_nn::HybridOutput>| r.unwrap_err().to_string();
    // An id past the vocabulary, u32 and i64.
    let mut v = vec![1u32; 6];
    v[4] = V as u32;
    let bad = Tensor::from_vec(v, (2, 3), &Device::Cpu).unwrap();
    let e = err(model.forward(&bad, &opts));
    assert!(e.contains("HybridModel::forward") && e.contains("37") && e.contains("row 1, position 1"), "{e}");
    let neg = Tensor::from_vec(vec![0i64, -1], (1, 2), &Device::Cpu).unwrap();
    assert!(err(model.forward(&neg, &opts)).contains("-1"));
    // Wrong rank, float ids, no tokens.
    let e = err(model.forward(&Tensor::from_vec(vec![1u32, 2], 2, &Device::Cpu).unwrap(), &opts));
    assert!(e.contains("(batch, length)"), "{e}");
    let e = err(model.forward(&Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap(), &opts));
    assert!(e.contains("u32 or i64"), "{e}");
    let e = err(model.forward(&Tensor::zeros((2, 0), DType::U32, &Device::Cpu).unwrap(), &opts));
    assert!(e.contains("no token"), "{e}");
    // Targets that do not match the logits.
    let out = model.forward(&ids(1, 2, 3), &opts).unwrap();
    let e = HybridModel::lm_loss(&out.logits, &ids(1, 3, 2)).unwrap_err().to_string();
    assert!(e.contains("targets") && e.contains("(2, 3)"), "{e}");
    let e =
        HybridModel::lm_loss(&out.logits.reshape((6, V)).unwrap(), &ids(1, 2, 3)).unwrap_err().to_string();
    assert!(e.contains("(batch, length, vocab)"), "{e}");
    // A step with ids of another rank, a cache of another model, an id past the vocabulary.
    let mut cache = model.new_cache(2, 8).unwrap();
    let e = model.forward_step(&ids(1, 2, 2), &mut cache).unwrap_err().to_string();
    assert!(e.contains("forward_step") && e.contains("ids"), "{e}");
    let (_, other) = build(&config(vec![(attention(), mlp())], true), DType::F32, 0);
    let e = other.forward_step(&ids(1, 2, 1).squeeze(1).unwrap(), &mut cache).unwrap_err().to_string();
    assert!(e.contains("cache") && e.contains("4 layers"), "{e}");
    let swapped =
        config(vec![(attention(), moe()), (mamba(), mlp()), (mamba2(), mlp()), (mla(), moe())], false);
    let (_, sw) = build(&swapped, DType::F32, 0);
    let e = sw.forward_step(&ids(1, 2, 1).squeeze(1).unwrap(), &mut cache).unwrap_err().to_string();
    assert!(e.contains("layer 0 has a attention mixer but its cache is for mamba"), "{e}");
    let e = model.forward_step(&Tensor::from_vec(vec![0u32, 99], 2, &Device::Cpu).unwrap(), &mut cache);
    assert!(e.unwrap_err().to_string().contains("vocabulary"));
    assert_eq!(cache.pos, 0, "failed calls leave the cache alone");
}

#[test]
fn bad_configs_name_the_block_and_field() {
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let err = |cfg: &HybridConfig| {
        assert!(cfg.validate().is_err());
        HybridModel::new(&store.root(), cfg).unwrap_err().to_string()
    };
    // A mixer of another width.
    let mut cfg = config(vec![(mamba(), mlp()), (mamba(), mlp())], true);
    cfg.blocks[1].mixer = MixerConfig::Mamba(MambaConfig::new(48));
    let e = err(&cfg);
    assert!(e.contains("block 1") && e.contains("d_model = 48") && e.contains("hidden_size = 32"), "{e}");
    // A bad sub-config.
    let mut cfg = config(vec![(attention(), mlp())], true);
    cfg.blocks[0].mixer = MixerConfig::Attention(AttentionConfig::new(D, 3, 2, 8));
    let e = err(&cfg);
    assert!(e.contains("block 0 (attention)") && e.contains("num_heads"), "{e}");
    // An MoE layer of another width, and a bad MoE config.
    let cfg = config(vec![(mamba(), FfnConfig::Moe(MoeConfig::new(16, 8, 4, 2)))], true);
    assert!(err(&cfg).contains("block 0 (moe): d_model = 16"));
    let cfg = config(vec![(mamba(), FfnConfig::Moe(MoeConfig::new(D, 8, 2, 3)))], true);
    assert!(err(&cfg).contains("experts_per_tok"));
    // Non-causal routings in a causal model.
    for kind in [RoutingKind::Soft { slots_per_expert: 1 }, RoutingKind::ExpertChoice] {
        let cfg =
            config(vec![(attention(), FfnConfig::Moe(MoeConfig::new(D, 8, 4, 2).with_strategy(kind)))], true);
        let e = err(&cfg);
        assert!(e.contains("block 0 (moe)") && e.contains("causal") && e.contains(kind.name()), "{e}");
    }
    // Zero sizes.
    let cfg = config(vec![(mamba(), FfnConfig::Mlp { intermediate_size: 0 })], true);
    assert!(err(&cfg).contains("intermediate_size"));
    let cfg = HybridConfig { vocab_size: 0, ..config(vec![], true) };
    assert!(err(&cfg).contains("vocab_size"));
    let cfg = HybridConfig { norm_eps: 0.0, ..config(vec![], true) };
    assert!(err(&cfg).contains("norm_eps"));
}

#[test]
fn block_recompute_returns_aux_loss_and_routing_through_the_checkpoint() {
    let (_, model) = build(&config(vec![(attention(), moe())], true), DType::F32, 6);
    let x = ids(3, 2, 5);
    for level in [Recompute::None, Recompute::Mixer, Recompute::Block] {
        let out = model.forward(&x, &ForwardOptions { recompute: level, ..Default::default() }).unwrap();
        let aux = out.aux_loss.unwrap();
        assert!(aux.requires_grad());
        assert_eq!(aux.op_name() == Some("checkpoint"), level == Recompute::Block, "{level:?}");
        assert_eq!(out.routing.len(), 1);
        assert_eq!(out.assignments.len(), 1);
    }
}
