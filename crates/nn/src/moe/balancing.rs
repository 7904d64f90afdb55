//! Auxiliary-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the router
//! scores when *choosing* experts (never to the combine weights), nudged after every step
//! towards the mean load: `b_i += rate · sign(mean load - load_i)`.
//!
//! The bias is state, not a trained parameter: no gradient reaches it. [`BiasBalancer`] keeps it
//! behind a lock so a layer can update it through `&self` between steps.

use std::sync::RwLock;

use moeba_tensor::{DType, Device, Error, Result, Tensor};

use super::stats::RoutingStats;

/// The per-expert selection bias and its update rate.
#[derive(Debug)]
pub struct BiasBalancer {
    rate: f64,
    bias: RwLock<Vec<f64>>,
}

impl Clone for BiasBalancer {
    fn clone(&self) -> Self {
        BiasBalancer { rate: self.rate, bias: RwLock::new(self.bias()) }
    }
}

impl BiasBalancer {
    /// A zero bias over `num_experts` experts, updated by `rate` per step.
    pub fn new(num_experts: usize, rate: f64) -> Self {
        BiasBalancer { rate, bias: RwLock::new(vec![0.0; num_experts]) }
    }

    /// The update rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The current bias values (one per expert).
    pub fn bias(&self) -> Vec<f64> {
        self.bias.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the bias (a checkpoint load). The length must match the number of experts.
    pub fn set_bias(&self, values: &[f64]) -> Result<()> {
        let mut b = self.bias.write().unwrap_or_else(|e| e.into_inner());
        if values.len() != b.len() {
            return Err(Error::invalid(
                "BiasBalancer::set_bias",
                "values",
                format!("{} values for {} experts", values.len(), b.len()),
            ));
        }
        b.copy_from_slice(values);
        Ok(())
    }

    /// The bias as an `(E)` tensor of `dtype` on `device`, for the gating kernel.
    pub fn bias_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let b = self.bias();
        let n = b.len();
        Tensor::from_vec(b, n, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    /// One DeepSeek-V3 update from the load of a step: `b_i += rate · sign(mean - load_i)`
    /// (no change where the load equals the mean). Returns the new bias.
    pub fn update(&self, load: &[f64]) -> Result<Vec<f64>> {
        let mut b = self.bias.write().unwrap_or_else(|e| e.into_inner());
        if load.len() != b.len() {
            return Err(Error::invalid(
                "BiasBalancer::update",
                "load",
                format!("{} per-expert loads for {} experts", load.len(), b.len()),
            ));
        }
        let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
        for (bi, &l) in b.iter_mut().zip(load) {
            let diff = mean - l;
            if diff > 0.0 {
                *bi += self.rate;
            } else if diff < 0.0 {
                *bi -= self.rate;
            }
        }
        Ok(b.clone())
    }

    /// [`BiasBalancer::update`] from a forward's stats (the per-expert assignment counts).
    pub fn update_from_stats(&self, stats: &RoutingStats) -> Result<Vec<f64>> {
        self.update(&stats.counts)
    }
}
