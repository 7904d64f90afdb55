//! [`AdamW`]: Adam with decoupled weight decay (Loshchilov & Hutter), and global-norm clipping.

use std::collections::HashMap;

use moeba_autograd::Grads;
use moeba_kernels::ops;
use moeba_nn::Param;
use moeba_tensor::{Error, Result, Tensor};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁, the first-moment decay.
    pub beta1: f64,
    /// β₂, the second-moment decay.
    pub beta2: f64,
    /// Added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay, applied as `p -= lr · wd · p` to the parameters it is on for.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// AdamW over a fixed list of parameters. Weight decay applies to matrices (rank ≥ 2) other than
/// embeddings; never to norms or biases.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(Param, bool)>,
    state: HashMap<String, (Tensor, Tensor)>,
    step: usize,
}

impl AdamW {
    /// An optimizer for `params` (decay decided per parameter as described on the type).
    pub fn new(params: Vec<Param>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|p| {
                let decay = p.var().rank() >= 2 && !p.name().contains("embed");
                (p, decay)
            })
            .collect();
        Ok(AdamW { cfg, params, state: HashMap::new(), step: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr` from `grads` scaled by `grad_scale` (clipping; see
    /// [`clip_factor`]). A parameter without a gradient is left as it is. A non-finite update is
    /// an error naming the parameter; nothing is updated then.
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        let mut updates = Vec::with_capacity(self.params.len());
        let t = (self.step + 1) as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (p, decay) in &self.params {
            let var = p.var();
            let Some(g) = grads.get(&var) else { continue };
            let g = &ops::affine(g, grad_scale, 0.0)?;
            let (m, v) = match self.state.get(p.name()) {
                Some(s) => s.clone(),
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ops::add(&ops::affine(&m, b1, 0.0)?, &ops::affine(g, 1.0 - b1, 0.0)?)?;
            let v = ops::add(&ops::affine(&v, b2, 0.0)?, &ops::affine(&ops::mul(g, g)?, 1.0 - b2, 0.0)?)?;
            // p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + eps)
            let denom = ops::affine(&ops::sqrt(&ops::affine(&v, 1.0 / bc2, 0.0)?)?, 1.0, self.cfg.eps)?;
            let upd = ops::div(&ops::affine(&m, lr / bc1, 0.0)?, &denom)?;
            let keep = if *decay { 1.0 - lr * self.cfg.weight_decay } else { 1.0 };
            let new = ops::sub(&ops::affine(var.tensor(), keep, 0.0)?, &upd)?;
            updates.push((p.clone(), new, m, v));
        }
        for (p, new, _, _) in &updates {
            let s = ops::sum_all(new)?.to_dtype(moeba_tensor::DType::F64)?.to_scalar::<f64>()?;
            if !s.is_finite() {
                return Err(Error::invalid(
                    "AdamW::step",
                    "grads",
                    format!("non-finite update for `{}`", p.name()),
                ));
            }
        }
        for (p, new, m, v) in updates {
            p.set(new)?;
            self.state.insert(p.name().to_string(), (m, v));
        }
        self.step += 1;
        Ok(())
    }
}

/// The global L2 norm of every gradient, and the factor that clips it to `max_norm`
/// (1 when it is already below; pass it to [`AdamW::step`]).
pub fn clip_factor(grads: &Grads, max_norm: f64) -> Result<(f64, f64)> {
    let mut total = 0.0;
    for (_, g) in grads.iter() {
        let s = ops::sum_all(&ops::mul(g, g)?)?;
        total += s.to_dtype(moeba_tensor::DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let factor = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
    Ok((norm, factor))
}
