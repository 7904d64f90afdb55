//! Each routing strategy's defining behaviour, pinned by a test.

use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_nn::moe::strategy::{ExpertChoiceRouting, HashRouting};
use moeba_nn::moe::{MoeConfig, MoeContext, MoeLayer, MoeWeights, RoutingKind};
use moeba_nn::ParamStore;
use moeba_tensor::{DType, Tensor};

mod moe_common;
use moe_common::{cpu, RefMoe};

fn layer(cfg: &MoeConfig, seed: u64) -> (ParamStore, MoeLayer) {
    let store = ParamStore::new(DType::F64, cpu(), seed);
    let layer = MoeLayer::new(&store.root().pp("moe"), cfg).unwrap();
    (store, layer)
}

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    Tensor::randn(seed, dims, 0.0, 1.0, DType::F64, &cpu()).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let d = *t.dims().last().unwrap();
    t.to_vec_f64().unwrap().chunks(d).map(|c| c.to_vec()).collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn topk_picks_the_k_best_experts_per_token() {
    let cfg = MoeConfig::new(6, 4, 5, 2);
    let (_s, l) = layer(&cfg, 1);
    let x = randn(2, &[9, 6]);
    let y = l.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
    let r = RefMoe::from_layer(&l);
    let idx = rows(y.assignment.as_ref().unwrap());
    for (t, tok) in rows(&x).iter().enumerate() {
        let (_, chosen, _) = r.route(tok);
        assert_eq!(idx[t], chosen.iter().map(|&c| c as f64).collect::<Vec<_>>(), "token {t}");
    }
    assert!(close(&y.out.tensor().to_vec_f64().unwrap(), &r.forward(&x.to_vec_f64().unwrap()), 1e-10));
}

#[test]
fn switch_is_top1_with_capacity_and_reports_drops() {
    // All tokens prefer expert 0: the router sees only dim 0, x[:, 0] > 0.
    let cfg = MoeConfig::new(3, 4, 4, 1).with_strategy(RoutingKind::Switch);
    let (_s, l) = layer(&cfg, 3);
    let mut router = vec![0.0; 12];
    router[0] = 5.0; // expert 0 weight on dim 0
    l.router[0].set(Tensor::from_vec(router, (4, 3), &cpu()).unwrap()).unwrap();
    let mut xv = randn(4, &[8, 3]).to_vec_f64().unwrap();
    for t in 0..8 {
        xv[t * 3] = 1.0 + t as f64 * 0.1;
    }
    let x = Tensor::from_vec(xv, (8, 3), &cpu()).unwrap();
    let y = l.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
    // Capacity ceil(1.0 · 8 / 4) = 2: expert 0 keeps tokens 0 and 1, six are dropped.
    assert_eq!(y.stats.counts, vec![8.0, 0.0, 0.0, 0.0]);
    assert_eq!(y.stats.kept, vec![2.0, 0.0, 0.0, 0.0]);
    assert_eq!(y.stats.dropped, 6);
    assert!((y.stats.dropped_fraction() - 0.75).abs() < 1e-15);
    let out = rows(y.out.tensor());
    let r = RefMoe { renorm: false, ..RefMoe::from_layer(&l) };
    for (t, tok) in rows(&x).iter().enumerate() {
        if t < 2 {
            let (scores, chosen, _) = r.route(tok);
            assert_eq!(chosen, vec![0]);
            let want: Vec<f64> = r.expert(0, tok).iter().map(|v| v * scores[0]).collect();
            assert!(close(&out[t], &want, 1e-10), "kept token {t}");
        } else {
            assert!(out[t].iter().all(|&v| v == 0.0), "dropped token {t} must be zero: {:?}", out[t]);
        }
    }
    // A larger capacity factor keeps more.
    let mut cfg2 = cfg.clone();
    cfg2.capacity_factor = Some(2.0);
    let (_s2, l2) = layer(&cfg2, 3);
    l2.router[0].set(l.router[0].tensor()).unwrap();
    let y2 = l2.forward(&Var::constant(x), &MoeContext::default()).unwrap();
    assert_eq!(y2.stats.kept[0], 4.0);
    assert_eq!(y2.stats.dropped, 4);
    // Switch is top-1 by definition.
    let bad = MoeConfig::new(3, 4, 4, 2).with_strategy(RoutingKind::Switch).validate().unwrap_err();
    assert!(bad.to_string().contains("experts_per_tok"), "{bad}");
}

#[test]
fn dense_gated_runs_every_expert() {
    let cfg = MoeConfig::new(5, 3, 4, 1).with_strategy(RoutingKind::DenseGated);
    let (_s, l) = layer(&cfg, 5);
    let x = randn(6, &[7, 5]);
    let y = l.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
    assert_eq!(y.stats.counts, vec![7.0; 4]);
    let r = RefMoe::from_layer(&l);
    for (t, tok) in rows(&x).iter().enumerate() {
        let (scores, _, _) = r.route(tok);
        let mut want = vec![0.0; 5];
        for (e, &g) in scores.iter().enumerate() {
            for (w, v) in want.iter_mut().zip(r.expert(e, tok)) {
                *w += g * v;
            }
        }
        assert!(close(&rows(y.out.tensor())[t], &want, 1e-10), "token {t}");
    }
    let (_s2, l2) = layer(&cfg, 5);
    let mut inputs = vec![x];
    inputs.extend(l2.params().iter().map(|p| p.tensor()));
    check_gradients(
        |vs| {
            let w = MoeWeights {
                router: vec![vs[1].clone()],
                gate_up: vs[2].clone(),
                down: vs[3].clone(),
                shared: None,
            };
            Ok(l2.forward_with(&vs[0], &w, &MoeContext::default())?.out)
        },
        &inputs,
        &GradCheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn hash_routing_is_fixed_and_ignores_values() {
    let cfg = MoeConfig::new(4, 3, 8, 2).with_strategy(RoutingKind::Hash { seed: 7 });
    let (_s, l) = layer(&cfg, 1);
    assert!(l.router.is_empty(), "no learned router");
    let ids = Tensor::from_vec(vec![5u32, 17, 5, 300, 2, 17], (2, 3), &cpu()).unwrap();
    let ctx = MoeContext::default().with_token_ids(ids.clone());
    let a = l.forward(&Var::constant(randn(1, &[2, 3, 4])), &ctx).unwrap();
    let b = l.forward(&Var::constant(randn(2, &[2, 3, 4]).affine(1e3)), &ctx).unwrap();
    let ia = rows(a.assignment.as_ref().unwrap());
    assert_eq!(ia, rows(b.assignment.as_ref().unwrap()), "routing ignores the values");
    assert_eq!(ia[0], ia[2], "the same token id goes to the same experts");
    assert_eq!(ia[1], ia[5]);
    let h = HashRouting { seed: 7 };
    for (t, &id) in [5u64, 17, 5, 300, 2, 17].iter().enumerate() {
        let want: Vec<f64> = h.experts_of(id, 2, 8).iter().map(|&e| e as f64).collect();
        assert_eq!(ia[t], want);
        assert_ne!(want[0], want[1], "distinct experts");
    }
    assert!(a.aux.lb_loss.is_none() && a.stats.entropy.is_none());
    // Another layer (seed) routes differently.
    let other = HashRouting { seed: 8 };
    let differs = (0..64u64).any(|id| other.experts_of(id, 2, 8) != h.experts_of(id, 2, 8));
    assert!(differs);
    // Without token ids it is an error.
    let e = l.forward(&Var::constant(randn(1, &[2, 3, 4])), &MoeContext::default()).unwrap_err();
    assert!(e.to_string().contains("token_ids"), "{e}");
    // Output: each expert weighted 1/k.
    let r = RefMoe::from_layer(&l);
    let x = randn(1, &[2, 3, 4]);
    let got = rows(l.forward(&Var::constant(x.clone()), &ctx).unwrap().out.tensor());
    for (t, tok) in rows(&x).iter().enumerate() {
        let mut want = vec![0.0; 4];
        for &e in &ia[t] {
            for (w, v) in want.iter_mut().zip(r.expert(e as usize, tok)) {
                *w += 0.5 * v;
            }
        }
        assert!(close(&got[t], &want, 1e-10));
    }
}

trait Affine {
    fn affine(self, s: f64) -> Tensor;
}
impl Affine for Tensor {
    fn affine(self, s: f64) -> Tensor {
        moeba_kernels::ops::affine(&self, s, 0.5).unwrap()
    }
}

#[test]
fn expert_choice_gives_every_expert_exactly_its_capacity() {
    for (t, e, k, cf) in [(10usize, 4usize, 2usize, None), (7, 3, 1, Some(2.0)), (5, 8, 2, Some(1.0))] {
        let mut cfg = MoeConfig::new(4, 3, e, k).with_strategy(RoutingKind::ExpertChoice);
        cfg.capacity_factor = cf;
        let (_s, l) = layer(&cfg, t as u64);
        let x = randn(3, &[t, 4]);
        let y = l.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
        let c = ExpertChoiceRouting::capacity(&cfg, t);
        assert_eq!(y.stats.kept, vec![c as f64; e], "t {t} e {e} k {k}");
        // Reference: expert e takes the c tokens with the highest softmax score for it.
        let r = RefMoe::from_layer(&l);
        let xs = rows(&x);
        let scores: Vec<Vec<f64>> = xs.iter().map(|tok| r.route(tok).0).collect();
        let mut want = vec![vec![0.0; 4]; t];
        let mut picked = vec![false; t];
        for ex in 0..e {
            let mut order: Vec<usize> = (0..t).collect();
            order.sort_by(|&a, &b| scores[b][ex].total_cmp(&scores[a][ex]).then(a.cmp(&b)));
            for &tok in &order[..c] {
                picked[tok] = true;
                for (w, v) in want[tok].iter_mut().zip(r.expert(ex, &xs[tok])) {
                    *w += scores[tok][ex] * v;
                }
            }
        }
        let got = rows(y.out.tensor());
        for tok in 0..t {
            assert!(close(&got[tok], &want[tok], 1e-10), "token {tok}");
        }
        assert_eq!(y.stats.dropped, picked.iter().filter(|p| !**p).count());
    }
    // Gradients flow to the router through the chosen scores.
    let cfg = MoeConfig::new(3, 2, 3, 1).with_strategy(RoutingKind::ExpertChoice);
    let (_s, l) = layer(&cfg, 2);
    let mut inputs = vec![randn(4, &[5, 3])];
    inputs.extend(l.params().iter().map(|p| p.tensor()));
    check_gradients(
        |vs| {
            let w = MoeWeights {
                router: vec![vs[1].clone()],
                gate_up: vs[2].clone(),
                down: vs[3].clone(),
                shared: None,
            };
            Ok(l.forward_with(&vs[0], &w, &MoeContext::default())?.out)
        },
        &inputs,
        &GradCheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn soft_moe_mixes_tokens_and_refuses_causal_use() {
    let cfg = MoeConfig::new(4, 3, 3, 1).with_strategy(RoutingKind::Soft { slots_per_expert: 2 });
    let (_s, l) = layer(&cfg, 4);
    let x = randn(5, &[2, 5, 4]);
    let e = l.forward(&Var::constant(x.clone()), &MoeContext::default().with_causal(true)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("soft MoE") && msg.contains("causal"), "{msg}");
    let y = l.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
    assert_eq!(y.out.dims(), &[2, 5, 4]);
    // Reference per sequence: D = softmax over tokens, C = softmax over slots.
    let r = RefMoe::from_layer(&l);
    let phi = l.router[0].tensor().to_vec_f64().unwrap(); // (6, 4)
    let (n, d) = (6, 4);
    let got = rows(y.out.tensor());
    for b in 0..2 {
        let toks: Vec<Vec<f64>> = rows(&x)[b * 5..(b + 1) * 5].to_vec();
        let logits: Vec<Vec<f64>> = toks
            .iter()
            .map(|tk| (0..n).map(|s| (0..d).map(|j| phi[s * d + j] * tk[j]).sum()).collect())
            .collect();
        let softmax = |v: Vec<f64>| {
            let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = v.iter().map(|a| (a - m).exp()).collect();
            let s: f64 = ex.iter().sum();
            ex.into_iter().map(|a| a / s).collect::<Vec<f64>>()
        };
        let disp: Vec<Vec<f64>> = (0..n).map(|s| softmax((0..5).map(|t| logits[t][s]).collect())).collect();
        let slot_out: Vec<Vec<f64>> = (0..n)
            .map(|s| {
                let xin: Vec<f64> = (0..d).map(|j| (0..5).map(|t| disp[s][t] * toks[t][j]).sum()).collect();
                r.expert(s / 2, &xin)
            })
            .collect();
        for t in 0..5 {
            let comb = softmax(logits[t].clone());
            let want: Vec<f64> = (0..d).map(|j| (0..n).map(|s| comb[s] * slot_out[s][j]).sum()).collect();
            assert!(close(&got[b * 5 + t], &want, 1e-10), "seq {b} token {t}");
        }
    }
    // Token 0's output depends on a later token of its sequence, not on the other sequence.
    let mut xv = x.to_vec_f64().unwrap();
    xv[4 * 4] += 1.0; // sequence 0, token 4
    let y2 = l
        .forward(&Var::constant(Tensor::from_vec(xv, (2, 5, 4), &cpu()).unwrap()), &MoeContext::default())
        .unwrap();
    let g2 = rows(y2.out.tensor());
    assert!(!close(&g2[0], &got[0], 1e-12), "token 0 must see token 4");
    assert!(close(&g2[5], &got[5], 1e-14), "sequence 1 is untouched");
    // Gradient check.
    let (_s3, l3) = layer(&cfg, 6);
    let mut inputs = vec![randn(7, &[1, 4, 4])];
    inputs.extend(l3.params().iter().map(|p| p.tensor()));
    check_gradients(
        |vs| {
            let w = MoeWeights {
                router: vec![vs[1].clone()],
                gate_up: vs[2].clone(),
                down: vs[3].clone(),
                shared: None,
            };
            Ok(l3.forward_with(&vs[0], &w, &MoeContext::default())?.out)
        },
        &inputs,
        &GradCheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn hierarchical_routes_inside_one_group() {
    let cfg = MoeConfig::new(5, 3, 6, 2).with_strategy(RoutingKind::Hierarchical { num_groups: 3 });
    let (_s, l) = layer(&cfg, 8);
    let names: Vec<&str> = l.router.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["moe.group_gate.weight", "moe.gate.weight"]);
    let x = randn(9, &[11, 5]);
    let y = l.forward(&Var::constant(x.clone()), &MoeContext::default()).unwrap();
    let idx = rows(y.assignment.as_ref().unwrap());
    let group_r = RefMoe {
        router: l.router[0].tensor().to_vec_f64().unwrap(),
        e: 3,
        k: 1,
        renorm: false,
        ..RefMoe::from_layer(&l)
    };
    let expert_r = RefMoe { router: l.router[1].tensor().to_vec_f64().unwrap(), ..RefMoe::from_layer(&l) };
    let got = rows(y.out.tensor());
    for (t, tok) in rows(&x).iter().enumerate() {
        let (gscores, g, _) = group_r.route(tok);
        let g = g[0];
        assert!(idx[t].iter().all(|&e| e as usize / 2 == g), "token {t}: {:?} outside group {g}", idx[t]);
        // Inside the group: softmax over the group's two experts, both chosen (k = 2 = m), renormalised.
        let (escores, _, _) = expert_r.route(tok);
        let (a, b) = (escores[2 * g], escores[2 * g + 1]);
        let mut want = vec![0.0; 5];
        for (e, p) in [(2 * g, a / (a + b)), (2 * g + 1, b / (a + b))] {
            for (w, v) in want.iter_mut().zip(expert_r.expert(e, tok)) {
                *w += gscores[g] * p * v;
            }
        }
        assert!(close(&got[t], &want, 1e-10), "token {t}");
    }
    let bad = MoeConfig::new(5, 3, 6, 3).with_strategy(RoutingKind::Hierarchical { num_groups: 3 });
    assert!(bad.validate().unwrap_err().to_string().contains("experts_per_tok"));
    let bad = MoeConfig::new(5, 3, 6, 1).with_strategy(RoutingKind::Hierarchical { num_groups: 4 });
    assert!(bad.validate().unwrap_err().to_string().contains("num_groups"));
    // Gradients reach both routers.
    let (_s2, l2) =
        layer(&MoeConfig::new(3, 2, 4, 1).with_strategy(RoutingKind::Hierarchical { num_groups: 2 }), 3);
    let mut inputs = vec![randn(2, &[6, 3])];
    inputs.extend(l2.params().iter().map(|p| p.tensor()));
    let rep = check_gradients(
        |vs| {
            let w = MoeWeights {
                router: vec![vs[1].clone(), vs[2].clone()],
                gate_up: vs[3].clone(),
                down: vs[4].clone(),
                shared: None,
            };
            Ok(l2.forward_with(&vs[0], &w, &MoeContext::default())?.out)
        },
        &inputs,
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert!(rep.inputs[1].had_gradient && rep.inputs[2].had_gradient);
}

#[test]
fn multi_task_minus_plus_example() {
    // "1 2 3 4 - 5 6 + 8 9": digits are their own token ids, '-' = 10, '+' = 11. The minus task
    // covers "1 2 3 4 - 5 6" (task 0), the plus task "+ 8 9" (task 1).
    let ids: Vec<u32> = vec![1, 2, 3, 4, 10, 5, 6, 11, 8, 9];
    let tasks: Vec<u32> = vec![0, 0, 0, 0, 0, 0, 0, 1, 1, 1];
    let d = 6;
    let table = randn(12, &[12, d]);
    let x = Var::constant(
        moeba_kernels::ops::embedding(&table, &Tensor::from_vec(ids, 10, &cpu()).unwrap()).unwrap(),
    );
    let cfg = MoeConfig::new(d, 4, 4, 2).with_strategy(RoutingKind::MultiTask { num_tasks: 2 });
    let (_s, l) = layer(&cfg, 13);
    let names: Vec<&str> = l.router.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["moe.gates.0.weight", "moe.gates.1.weight"]);
    let ctx = MoeContext::default().with_task_ids(Tensor::from_vec(tasks.clone(), 10, &cpu()).unwrap());
    let y = l.forward(&x, &ctx).unwrap();
    assert_eq!(y.task_outputs.len(), 2);
    let xs = x.tensor().to_vec_f64().unwrap();
    let outs: Vec<Vec<Vec<f64>>> = y.task_outputs.iter().map(|o| rows(o.tensor())).collect();
    for j in 0..2 {
        let r = RefMoe { router: l.router[j].tensor().to_vec_f64().unwrap(), ..RefMoe::from_layer(&l) };
        let want = r.forward(&xs);
        assert!(close(&outs[j].concat(), &want, 1e-10), "task {j} output");
    }
    let out = rows(y.out.tensor());
    for (t, &task) in tasks.iter().enumerate() {
        assert_eq!(out[t], outs[task as usize][t], "token {t} takes its own task's output");
    }
    assert_eq!(y.stats.tokens, 20, "both tasks routed every token");
    // The gates are separate: changing the plus task's gate leaves the minus task alone.
    l.router[1].set(randn(99, &[4, d])).unwrap();
    let y2 = l.forward(&x, &ctx).unwrap();
    assert_eq!(rows(y2.task_outputs[0].tensor()), outs[0]);
    assert_ne!(rows(y2.task_outputs[1].tensor()), outs[1]);
    // Bad task ids.
    let bad = MoeContext::default()
        .with_task_ids(Tensor::from_vec(vec![0u32, 0, 0, 0, 0, 0, 0, 2, 1, 1], 10, &cpu()).unwrap());
    let e = l.forward(&x, &bad).unwrap_err().to_string();
    assert!(e.contains("task_ids[7] = 2") && e.contains("2 tasks"), "{e}");
    let e = l.forward(&x, &MoeContext::default()).unwrap_err().to_string();
    assert!(e.contains("task_ids"), "{e}");
    let short = MoeContext::default().with_task_ids(Tensor::from_vec(vec![0u32; 3], 3, &cpu()).unwrap());
    assert!(l.forward(&x, &short).unwrap_err().to_string().contains("task_ids"));
}
