//! Multi-task (multi-gate) MoE (Ma et al. 2018, MMoE): one gate per task over shared experts.

use moeba_autograd::Var;
use moeba_tensor::{Error, Result, Tensor};

use super::{
    gating_options, per_token_ids, router_logits, topk_route, RouteInput, Routed, RouterParamSpec,
    RoutingStrategy,
};
use crate::moe::config::MoeConfig;

/// Task `j` has its own router `gates.{j}.weight (E, d)` over the one set of experts. Every
/// token is routed by every task's gate (top-`experts_per_tok` with the usual options), giving
/// one output per task, all returned in `task_outputs` (`(T, d)` each). `out` row `t` is the
/// output of the token's own task, `MoeContext::task_ids[t]` (required; a task id out of range
/// is an error naming it). Aux losses and stats are summed over the tasks.
#[derive(Debug, Clone, Copy)]
pub struct MultiTaskRouting {
    /// Number of tasks (gates).
    pub num_tasks: usize,
}

impl RoutingStrategy for MultiTaskRouting {
    fn name(&self) -> &'static str {
        "multi_task"
    }

    fn router_params(&self, cfg: &MoeConfig) -> Vec<RouterParamSpec> {
        (0..self.num_tasks)
            .map(|j| RouterParamSpec::new(format!("gates.{j}.weight"), &[cfg.num_experts, cfg.d_model]))
            .collect()
    }

    fn route(&self, input: &RouteInput) -> Result<Routed> {
        let cfg = input.cfg;
        let t = input.tokens();
        let task_ids = input.ctx.task_ids.as_ref().ok_or_else(|| {
            Error::invalid(
                "MoeLayer::forward",
                "task_ids",
                "multi-task routing needs each token's task: HINT: set MoeContext::task_ids",
            )
        })?;
        let tasks = per_token_ids("task_ids", task_ids, input.batch, input.seq)?;
        if let Some((i, &bad)) = tasks.iter().enumerate().find(|(_, &v)| v >= self.num_tasks as u64) {
            return Err(Error::invalid(
                "MoeLayer::forward",
                "task_ids",
                format!("task_ids[{i}] = {bad} is out of range: the layer has {} tasks", self.num_tasks),
            ));
        }
        let opts = gating_options(cfg);
        let capacity = cfg.capacity(t);
        let mut routed: Option<Routed> = None;
        let mut outputs = Vec::with_capacity(self.num_tasks);
        for j in 0..self.num_tasks {
            let logits = router_logits(input.router_x, input.router_param(self.name(), j)?)?;
            let r = topk_route(input, &logits, &opts, capacity, None)?;
            outputs.push(r.out.clone());
            routed = Some(match routed {
                None => r,
                Some(acc) => Routed {
                    out: acc.out,
                    task_outputs: Vec::new(),
                    aux: acc.aux.add(&r.aux)?,
                    stats: acc.stats.merge(&r.stats),
                    assignment: None,
                },
            });
        }
        let Some(acc) = routed else {
            return Err(Error::invalid("MoeLayer::forward", "strategy", "multi-task routing with 0 tasks"));
        };
        // out[t] = outputs[task_ids[t]][t].
        let mut out = outputs[0].clone();
        for (j, o) in outputs.iter().enumerate().skip(1) {
            let cond: Vec<f64> = tasks.iter().map(|&v| if v == j as u64 { 1.0 } else { 0.0 }).collect();
            let cond = Tensor::from_vec(cond, (t, 1), &moeba_tensor::Device::Cpu)?
                .to_dtype(o.dtype())?
                .to_device(o.device())?;
            out = Var::where_cond(&cond, o, &out)?;
        }
        Ok(Routed { out, task_outputs: outputs, aux: acc.aux, stats: acc.stats, assignment: None })
    }
}
