//! `ModelConfig::to_hybrid`: the shipped-style configs (inline) map to the layer plan and sizes
//! they describe and build a model that runs; each TOML key reaches its nn field; errors name
//! the key.

use moeba_kernels::ops::RopeStyle;
use moeba_nn::moe::{MoeScoreFn, RoutingKind};
use moeba_nn::{FfnConfig, ForwardOptions, HybridConfig, HybridModel, MixerConfig};
use moeba_tensor::{Device, Tensor};
use moeba_train::{build_model, RunConfig};

fn parse(text: &str) -> RunConfig {
    RunConfig::from_toml(text).unwrap_or_else(|e| panic!("{e}\n{text}")).0
}

fn hybrid(text: &str) -> HybridConfig {
    let cfg = parse(text);
    cfg.model.to_hybrid(&cfg.trainer).unwrap()
}

fn err(text: &str) -> String {
    let cfg: RunConfig = toml::from_str(text).unwrap();
    cfg.model.to_hybrid(&cfg.trainer).unwrap_err().to_string()
}

/// The layer map as short strings: "mamba/mlp", "attention/moe", ...
fn plan(h: &HybridConfig) -> Vec<String> {
    h.blocks
        .iter()
        .map(|b| {
            let m = match b.mixer {
                MixerConfig::Mamba(_) => "mamba",
                MixerConfig::Mamba2(_) => "mamba2",
                MixerConfig::Attention(_) => "attention",
                MixerConfig::Mla(_) => "mla",
            };
            let f = match b.ffn {
                FfnConfig::Mlp { .. } => "mlp",
                FfnConfig::Moe(_) => "moe",
                FfnConfig::None => "none",
            };
            format!("{m}/{f}")
        })
        .collect()
}

/// Builds the model and runs a tiny forward: the mapped config is one the nn layers accept.
fn runs(h: &HybridConfig) -> HybridModel {
    let (store, model) = build_model(h, 1, &Device::Cpu).unwrap();
    assert_eq!(model.param_counts().total, store.num_elements());
    let ids =
        Tensor::from_vec((0..10u32).map(|i| i * 7 % 256).collect::<Vec<_>>(), (2, 5), &Device::Cpu).unwrap();
    let out = model.forward(&ids, &ForwardOptions::default()).unwrap();
    assert_eq!(out.logits.dims(), &[2, 5, h.vocab_size]);
    model
}

const TINY_HYBRID: &str = r#"
[model]
vocab_size = 256
hidden_size = 128
num_layers = 4
tie_embeddings = true
layer_mixers = ["mamba", "mamba", "attention", "mamba"]
num_heads = 4
kv_heads = 4
d_state = 16
d_conv = 4
expand = 2
intermediate_size = 384
num_experts = 8
experts_per_tok = 2
moe_intermediate_size = 192
moe_layers = [1, 3]
[model.routing]
strategy = "topk"
score = "softmax"
normalize = true
[trainer]
load_balance_alpha = 0.01
router_z_loss_alpha = 0.001
"#;

#[test]
fn tiny_hybrid() {
    let h = hybrid(TINY_HYBRID);
    assert_eq!(plan(&h), ["mamba/mlp", "mamba/moe", "attention/mlp", "mamba/moe"]);
    assert!(h.tie_embeddings);
    assert_eq!((h.vocab_size, h.hidden_size, h.norm_eps), (256, 128, 1e-5));
    let MixerConfig::Mamba(m) = &h.blocks[0].mixer else { unreachable!() };
    assert_eq!((m.d_model, m.d_state, m.d_conv, m.expand, m.dt_rank), (128, 16, 4, 2, 8));
    let MixerConfig::Attention(a) = &h.blocks[2].mixer else { unreachable!() };
    assert_eq!((a.num_heads, a.kv_heads, a.head_dim), (4, 4, 32));
    let rope = a.rope.unwrap();
    assert_eq!((rope.theta, rope.style), (10000.0, RopeStyle::RotateHalf));
    assert_eq!((a.qk_norm, a.window), (false, None));
    assert_eq!(h.blocks[0].ffn, FfnConfig::Mlp { intermediate_size: 384 });
    let FfnConfig::Moe(e) = &h.blocks[1].ffn else { unreachable!() };
    assert_eq!((e.d_model, e.d_ff, e.num_experts, e.experts_per_tok), (128, 192, 8, 2));
    assert_eq!((e.lb_loss_alpha, e.z_loss_alpha), (0.01, 0.001));
    assert_eq!((e.strategy, e.score, e.normalize_topk), (RoutingKind::TopK, MoeScoreFn::Softmax, true));
    assert!(!e.shared_expert_enabled && e.capacity_factor.is_none() && e.bias_balancing.is_none());
    let model = runs(&h);
    let c = model.param_counts();
    // Two MoE layers each run 2 of 8 experts of 3 · 192 · 128 parameters.
    assert_eq!(c.total - c.active, 2 * 6 * 3 * 192 * 128);
    assert_eq!(c.embedding, 256 * 128);
}

/// `intermediate_size = 0`: dense layers have no feed-forward (HF Mamba / Mamba-2 blocks), no
/// `pre_ff_layernorm`; MoE layers then need their own `moe_intermediate_size`.
#[test]
fn intermediate_size_zero_means_no_feed_forward() {
    let text = "[model]\nhidden_size = 32\nnum_layers = 2\nmixer = \"mamba2\"\nmamba2_head_dim = 16\n\
                mamba2_d_state = 8\nchunk_size = 8\nintermediate_size = 0";
    let h = hybrid(text);
    assert_eq!(plan(&h), ["mamba2/none"; 2]);
    let model = runs(&h);
    let names: Vec<String> = {
        let (store, _) = build_model(&h, 1, &Device::Cpu).unwrap();
        store.params().iter().map(|p| p.name().to_string()).collect()
    };
    assert!(
        names.iter().all(|n| !n.contains("pre_ff_layernorm") && !n.contains("feed_forward")),
        "{names:?}"
    );
    assert_eq!(names.iter().filter(|n| n.ends_with("input_layernorm.weight")).count(), 2);
    assert!(model.param_counts().total > 0);

    // With MoE layers: those keep their experts, the dense ones have none.
    let h = hybrid(&format!(
        "{text}\nnum_experts = 4\nexperts_per_tok = 2\nmoe_layers = [1]\nmoe_intermediate_size = 24"
    ));
    assert_eq!(plan(&h), ["mamba2/none", "mamba2/moe"]);
    runs(&h);
    // ... but not without their own width.
    let e = err(&format!("{text}\nnum_experts = 4\nexperts_per_tok = 2\nmoe_layers = [1]"));
    assert!(e.contains("moe_intermediate_size"), "{e}");
}

#[test]
fn mamba_only_and_transformer_only() {
    let h = hybrid(
        "[model]\nhidden_size = 64\nnum_layers = 3\nmixer = \"mamba\"\nd_state = 8\nd_conv = 3\nexpand = 3\n\
         dt_rank = 5\nintermediate_size = 96\ntie_embeddings = false",
    );
    assert_eq!(plan(&h), ["mamba/mlp"; 3]);
    assert!(!h.tie_embeddings);
    let MixerConfig::Mamba(m) = &h.blocks[2].mixer else { unreachable!() };
    assert_eq!((m.d_model, m.d_state, m.d_conv, m.expand, m.dt_rank), (64, 8, 3, 3, 5));
    runs(&h);

    let h = hybrid(
        "[model]\nhidden_size = 64\nnum_layers = 2\nmixer = \"attention\"\nnum_heads = 4\nkv_heads = 2\n\
         rope_theta = 500000.0\nqk_norm = true\nsliding_window = 16\nhead_dim = 8\nnorm_eps = 1e-6\nintermediate_size = 96",
    );
    assert_eq!(plan(&h), ["attention/mlp"; 2]);
    let MixerConfig::Attention(a) = &h.blocks[1].mixer else { unreachable!() };
    assert_eq!((a.d_model, a.num_heads, a.kv_heads, a.head_dim), (64, 4, 2, 8));
    assert_eq!(a.rope.unwrap().theta, 500000.0);
    assert_eq!((a.qk_norm, a.norm_eps, a.window), (true, 1e-6, Some(16)));
    assert_eq!(h.norm_eps, 1e-6);
    runs(&h);
}

#[test]
fn moe_transformer() {
    let h = hybrid(
        "[model]\nhidden_size = 64\nnum_layers = 2\nmixer = \"attention\"\nnum_heads = 4\nkv_heads = 4\n\
         intermediate_size = 128\nnum_experts = 8\nexperts_per_tok = 2\n\
         [model.routing]\nstrategy = \"topk\"\njitter_noise = 0.01\ncapacity_factor = 1.25\n\
         [trainer]\nload_balance_alpha = 0.02\nrouter_z_loss_alpha = 0.003",
    );
    assert_eq!(plan(&h), ["attention/moe"; 2]);
    let FfnConfig::Moe(e) = &h.blocks[0].ffn else { unreachable!() };
    assert_eq!(e.d_ff, 128, "moe_intermediate_size defaults to intermediate_size");
    assert_eq!((e.jitter_noise, e.capacity_factor), (0.01, Some(1.25)));
    assert_eq!((e.lb_loss_alpha, e.z_loss_alpha), (0.02, 0.003));
    runs(&h);
}

#[test]
fn jamba_like() {
    let h = hybrid(
        "[model]\nhidden_size = 64\nnum_layers = 8\nattn_layer_period = 4\nattn_layer_offset = 2\n\
         mamba_kind = \"mamba\"\nattention_kind = \"attention\"\nrope = false\nnum_heads = 4\nkv_heads = 2\n\
         intermediate_size = 96\nnum_experts = 4\nexperts_per_tok = 2\nmoe_intermediate_size = 48\nmoe_every = 2\nmoe_offset = 1",
    );
    assert_eq!(
        plan(&h),
        [
            "mamba/mlp",
            "mamba/moe",
            "attention/mlp",
            "mamba/moe",
            "mamba/mlp",
            "mamba/moe",
            "attention/mlp",
            "mamba/moe"
        ]
    );
    let MixerConfig::Attention(a) = &h.blocks[2].mixer else { unreachable!() };
    assert!(a.rope.is_none(), "rope = false: no positional encoding (Jamba)");
    assert_eq!((a.kv_heads, a.head_dim), (2, 16));
    runs(&h);
}

#[test]
fn mla_moe() {
    let h = hybrid(
        "[model]\nhidden_size = 64\nnum_layers = 3\nmixer = \"mla\"\nnum_heads = 4\nkv_latent_dim = 32\n\
         q_latent_dim = 48\nd_rope = 8\nqk_nope_head_dim = 12\nv_head_dim = 10\nrope_theta = 20000.0\n\
         intermediate_size = 96\nnum_experts = 8\nexperts_per_tok = 2\nmoe_intermediate_size = 24\nmoe_layers = [1, 2]\n\
         shared_expert_enabled = true\nshared_expert_intermediate_size = 40\nshared_expert_gate = true\n\
         [model.routing]\nstrategy = \"topk\"\nscore = \"sigmoid\"\nnormalize = false\nrouted_scaling = 2.5\n\
         bias_balancing_rate = 0.001\n[trainer]\nload_balance_alpha = 0.0\nrouter_z_loss_alpha = 0.0",
    );
    assert_eq!(plan(&h), ["mla/mlp", "mla/moe", "mla/moe"]);
    let MixerConfig::Mla(m) = &h.blocks[0].mixer else { unreachable!() };
    assert_eq!((m.d_model, m.num_heads, m.q_latent_dim, m.kv_latent_dim), (64, 4, Some(48), 32));
    assert_eq!((m.d_rope, m.qk_nope_head_dim, m.v_head_dim), (8, 12, 10));
    assert_eq!((m.rope.theta, m.rope.style), (20000.0, RopeStyle::Interleaved));
    let FfnConfig::Moe(e) = &h.blocks[2].ffn else { unreachable!() };
    assert_eq!(
        (e.d_ff, e.shared_expert_enabled, e.shared_expert_d_ff, e.shared_expert_gate),
        (24, true, 40, true)
    );
    assert_eq!((e.score, e.normalize_topk, e.routed_scaling), (MoeScoreFn::Sigmoid, false, 2.5));
    assert_eq!(e.bias_balancing, Some(0.001));
    assert_eq!((e.lb_loss_alpha, e.z_loss_alpha), (0.0, 0.0));
    let model = runs(&h);
    assert_eq!(model.moe_layers().len(), 2);
    assert!(model.moe_layers().iter().all(|(_, l)| l.balancing_bias().is_some()));
    // The MLA defaults: nope and value widths of head_dim.
    let h = hybrid("[model]\nhidden_size = 64\nnum_layers = 1\nmixer = \"mla\"\nnum_heads = 4\nkv_latent_dim = 16\nd_rope = 4");
    let MixerConfig::Mla(m) = &h.blocks[0].mixer else { unreachable!() };
    assert_eq!((m.q_latent_dim, m.qk_nope_head_dim, m.v_head_dim), (None, 16, 16));
}

#[test]
fn mamba2_hybrid() {
    let h = hybrid(
        "[model]\nhidden_size = 64\nnum_layers = 4\nmamba_layers = [0, 1, 3]\nmamba_kind = \"mamba2\"\n\
         attention_kind = \"attention\"\nnum_heads = 4\nkv_heads = 2\nexpand = 2\nd_conv = 3\nmamba2_head_dim = 16\n\
         mamba2_d_state = 24\nn_groups = 2\nchunk_size = 8\nintermediate_size = 96",
    );
    assert_eq!(plan(&h), ["mamba2/mlp", "mamba2/mlp", "attention/mlp", "mamba2/mlp"]);
    let MixerConfig::Mamba2(m) = &h.blocks[3].mixer else { unreachable!() };
    assert_eq!((m.d_model, m.expand, m.d_conv, m.head_dim, m.num_heads), (64, 2, 3, 16, 8));
    assert_eq!((m.d_state, m.n_groups, m.chunk_size, m.norm_eps), (24, 2, 8, 1e-5));
    runs(&h);
}

#[test]
fn other_routings_map() {
    let base =
        "[model]\nhidden_size = 32\nnum_layers = 3\nmixer = \"attention\"\nnum_heads = 2\nkv_heads = 2\n\
                intermediate_size = 48\nnum_experts = 4\n";
    let h = hybrid(&format!("{base}experts_per_tok = 2\n[model.routing]\nstrategy = \"hash\""));
    let seeds: Vec<RoutingKind> = h
        .blocks
        .iter()
        .map(|b| match &b.ffn {
            FfnConfig::Moe(e) => e.strategy,
            FfnConfig::Mlp { .. } | FfnConfig::None => unreachable!(),
        })
        .collect();
    assert_eq!(seeds, [0, 1, 2].map(|seed| RoutingKind::Hash { seed }), "a salt per layer");
    runs(&h);
    for (strategy, extra, want) in [
        ("switch", "experts_per_tok = 1\n", RoutingKind::Switch),
        ("dense", "experts_per_tok = 2\n", RoutingKind::DenseGated),
        ("hierarchical", "experts_per_tok = 1\n", RoutingKind::Hierarchical { num_groups: 2 }),
    ] {
        let h = hybrid(&format!("{base}{extra}[model.routing]\nstrategy = \"{strategy}\"\nnum_groups = 2"));
        let FfnConfig::Moe(e) = &h.blocks[0].ffn else { unreachable!() };
        assert_eq!(e.strategy, want);
        runs(&h);
    }
}

#[test]
fn errors_name_the_key() {
    let base =
        "[model]\nhidden_size = 32\nnum_layers = 2\nmixer = \"attention\"\nnum_heads = 2\nkv_heads = 2\n\
                intermediate_size = 48\nnum_experts = 4\nexperts_per_tok = 2\n";
    // What the nn MoE config refuses and the TOML validation does not.
    let e = err(&format!("{base}shared_expert_gate = true"));
    assert!(e.contains("`model.shared_expert_gate`") && e.contains("layer 0"), "{e}");
    let e = err(&format!("{base}[trainer]\nload_balance_alpha = -1.0"));
    assert!(e.contains("`trainer.load_balance_alpha`"), "{e}");
    let e = err(&format!("{base}[model.routing]\nrouted_scaling = 0.0"));
    assert!(e.contains("`model.routing.routed_scaling`"), "{e}");
    // Non-causal routing.
    for s in ["soft", "expert_choice"] {
        let e = err(&format!("{base}[model.routing]\nstrategy = \"{s}\""));
        assert!(e.contains("`model.routing.strategy`") && e.contains("causal"), "{e}");
    }
    // Mixer sizes.
    let e = err("[model]\nhidden_size = 64\nnum_layers = 1\nmixer = \"mamba2\"\nmamba2_head_dim = 24");
    assert!(e.contains("`model.mamba2_head_dim`"), "{e}");
    let e = err("[model]\nhidden_size = 64\nnum_layers = 1\nmixer = \"mla\"\nd_rope = 5");
    assert!(e.contains("`model.d_rope`"), "{e}");
    let e = err("[model]\nhidden_size = 64\nnum_layers = 1\nmixer = \"mamba\"\ndt_rank = 0");
    assert!(e.contains("`model.dt_rank`"), "{e}");
    let e = err("[model]\nhidden_size = 64\nnum_layers = 2\nmamba_layers = [2]");
    assert!(e.contains("`model.mamba_layers`"), "{e}");
    let e = err("[model]\nhidden_size = 64\nnum_layers = 1\nmixer = \"mla\"\nnum_heads = 4\nv_head_dim = 0");
    assert!(e.contains("`model.v_head_dim`"), "{e}");
}
