//! Shared by the MoE tests: fixture loading, comparisons and a plain per-token reference MoE.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use moeba_kernels::ops::MoeScoreFn;
use moeba_nn::moe::MoeLayer;
use moeba_tensor::{Device, Tensor};

pub fn fixture(name: &str) -> Option<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/ops").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(moeba_nn::safetensors_io::deserialize(&bytes, &Device::Cpu).unwrap()),
        Err(_) => {
            eprintln!("skipping: fixture {} not found (../shared beside the repository)", path.display());
            None
        }
    }
}

pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

pub fn cpu() -> Device {
    Device::Cpu
}

// ------------------------------------------------------------------ the plain reference

/// Everything the reference needs, as host f64.
/// A shared expert as host values: gate (fs, d), up (fs, d), down (d, fs), the gate weight (d), fs.
pub type RefShared = (Vec<f64>, Vec<f64>, Vec<f64>, Option<Vec<f64>>, usize);

pub struct RefMoe {
    pub d: usize,
    pub f: usize,
    pub e: usize,
    pub k: usize,
    pub score: MoeScoreFn,
    pub renorm: bool,
    pub scaling: f64,
    pub router: Vec<f64>,
    pub gate_up: Vec<f64>,
    pub down: Vec<f64>,
    /// (gate (fs, d), up (fs, d), down (d, fs), gate weight (d), fs)
    pub shared: Option<RefShared>,
}

pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

pub fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

impl RefMoe {
    pub fn from_layer(layer: &MoeLayer) -> Self {
        let cfg = layer.config();
        let v = |p: &moeba_nn::Param| p.tensor().to_vec_f64().unwrap();
        RefMoe {
            d: cfg.d_model,
            f: cfg.d_ff,
            e: cfg.num_experts,
            k: cfg.experts_per_tok,
            score: cfg.score,
            renorm: cfg.normalize_topk,
            scaling: cfg.routed_scaling,
            router: layer.router.first().map(v).unwrap_or_default(),
            gate_up: v(&layer.gate_up_proj),
            down: v(&layer.down_proj),
            shared: layer
                .shared
                .as_ref()
                .map(|(g, u, d, gate)| (v(g), v(u), v(d), gate.as_ref().map(v), cfg.shared_expert_d_ff)),
        }
    }

    /// Expert `e` on one token.
    pub fn expert(&self, e: usize, x: &[f64]) -> Vec<f64> {
        let (d, f) = (self.d, self.f);
        let gu = &self.gate_up[e * 2 * f * d..(e + 1) * 2 * f * d];
        let h: Vec<f64> = (0..f)
            .map(|i| {
                let g: f64 = (0..d).map(|j| gu[i * d + j] * x[j]).sum();
                let u: f64 = (0..d).map(|j| gu[(f + i) * d + j] * x[j]).sum();
                silu(g) * u
            })
            .collect();
        let dn = &self.down[e * d * f..(e + 1) * d * f];
        (0..d).map(|o| (0..f).map(|i| dn[o * f + i] * h[i]).sum()).collect()
    }

    /// Scores, chosen experts (descending, ties to the lower index) and weights of one token.
    pub fn route(&self, x: &[f64]) -> (Vec<f64>, Vec<usize>, Vec<f64>) {
        let logits: Vec<f64> =
            (0..self.e).map(|i| (0..self.d).map(|j| self.router[i * self.d + j] * x[j]).sum()).collect();
        let scores: Vec<f64> = match self.score {
            MoeScoreFn::Softmax => {
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let s: f64 = ex.iter().sum();
                ex.iter().map(|v| v / s).collect()
            }
            MoeScoreFn::Sigmoid => logits.iter().map(|&l| sigmoid(l)).collect(),
        };
        let mut order: Vec<usize> = (0..self.e).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let chosen = order[..self.k].to_vec();
        let mut w: Vec<f64> = chosen.iter().map(|&i| scores[i]).collect();
        if self.renorm {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s);
        }
        w.iter_mut().for_each(|v| *v *= self.scaling);
        (scores, chosen, w)
    }

    pub fn forward(&self, x: &[f64]) -> Vec<f64> {
        let d = self.d;
        let mut out = Vec::with_capacity(x.len());
        for tok in x.chunks(d) {
            let (_, chosen, w) = self.route(tok);
            let mut y = vec![0.0; d];
            for (&e, &wi) in chosen.iter().zip(&w) {
                for (yo, v) in y.iter_mut().zip(self.expert(e, tok)) {
                    *yo += wi * v;
                }
            }
            if let Some((g, u, dn, gate, fs)) = &self.shared {
                let h: Vec<f64> = (0..*fs)
                    .map(|i| {
                        let a: f64 = (0..d).map(|j| g[i * d + j] * tok[j]).sum();
                        let b: f64 = (0..d).map(|j| u[i * d + j] * tok[j]).sum();
                        silu(a) * b
                    })
                    .collect();
                let s = gate.as_ref().map_or(1.0, |gw| sigmoid((0..d).map(|j| gw[j] * tok[j]).sum()));
                for o in 0..d {
                    y[o] += s * (0..*fs).map(|i| dn[o * fs + i] * h[i]).sum::<f64>();
                }
            }
            out.extend(y);
        }
        out
    }
}
