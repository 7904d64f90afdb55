//! [`MoeLayer`]: router + routed SwiGLU experts + optional shared expert, with the routing
//! strategy, the aux losses, the statistics and the aux-loss-free balancing bias.

use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Rng, Tensor};

use super::balancing::BiasBalancer;
use super::config::MoeConfig;
use super::experts::{check_expert_shapes, shared_expert, MoeWeights, SharedExpertWeights};
use super::losses::AuxLosses;
use super::stats::RoutingStats;
use super::strategy::{strategy_for, RouteInput, RoutingStrategy};
use crate::params::{Init, Param, ParamPath};

/// Per-call context of an MoE forward. `Default` is inference: not training, no ids, not causal.
#[derive(Debug, Clone, Default)]
pub struct MoeContext {
    /// Training mode: enables the router jitter (`jitter_noise`).
    pub training: bool,
    /// The training step, mixed into the jitter's seed (a new noise draw per step).
    pub step: u64,
    /// The base seed of the jitter noise.
    pub seed: u64,
    /// Token ids `(b, l)` or `(T)`, u32 or i64: required by hash routing.
    pub token_ids: Option<Tensor>,
    /// Task ids `(b, l)` or `(T)`, u32 or i64: required by multi-task routing.
    pub task_ids: Option<Tensor>,
    /// Whether the layer sits in a causal model (soft MoE refuses it).
    pub causal: bool,
}

impl MoeContext {
    /// Training mode at `step` with `seed` for the jitter.
    pub fn training(step: u64, seed: u64) -> Self {
        MoeContext { training: true, step, seed, ..Default::default() }
    }

    /// The same context with token ids (hash routing).
    pub fn with_token_ids(mut self, ids: Tensor) -> Self {
        self.token_ids = Some(ids);
        self
    }

    /// The same context with task ids (multi-task routing).
    pub fn with_task_ids(mut self, ids: Tensor) -> Self {
        self.task_ids = Some(ids);
        self
    }

    /// The same context marked causal (or not).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
}

/// The result of an MoE forward: values, nothing is kept in the layer or in globals.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// The layer's output, the shape of the input: routed experts plus the shared expert.
    pub out: Var,
    /// Multi-task layers: each task's output (input's shape, shared expert included); empty otherwise.
    pub task_outputs: Vec<Var>,
    /// The auxiliary losses (unweighted; see [`AuxLosses::weighted_total`]).
    pub aux: AuxLosses,
    /// Routing statistics for monitoring (and for [`MoeLayer::update_balancing_bias`]).
    pub stats: RoutingStats,
    /// `(T, k)` U32 expert ids per token (rows in (batch, seq) order) for the strategies where
    /// tokens choose their experts; `None` for expert choice, soft and multi-task routing.
    pub assignment: Option<Tensor>,
}

/// A Mixture-of-Experts feed-forward layer.
///
/// Parameters under the layer's path (transformers-5 in-memory names):
/// - the router(s) of the strategy: `gate.weight (E, d)` for top-k, Switch, dense and expert
///   choice (see [`crate::moe::strategy`] for the others);
/// - `experts.gate_up_proj (E, 2f, d)` = `[gate rows; up rows]`, `experts.down_proj (E, d, f)`;
/// - with a shared expert: `{shared_expert_name}.{gate_proj,up_proj,down_proj}.weight` and, when
///   gated, `shared_expert_gate.weight (1, d)`.
///
/// `forward(x)` takes `(b, l, d)` or `(T, d)` and returns [`MoeOutput`]: the output of the same
/// shape, the aux losses and the routing statistics.
#[derive(Debug)]
pub struct MoeLayer {
    cfg: MoeConfig,
    strategy: Box<dyn RoutingStrategy>,
    /// The router parameters, in the strategy's order.
    pub router: Vec<Param>,
    /// `experts.gate_up_proj (E, 2f, d)`.
    pub gate_up_proj: Param,
    /// `experts.down_proj (E, d, f)`.
    pub down_proj: Param,
    /// The shared expert's `gate_proj`, `up_proj`, `down_proj` weights and the optional gate.
    pub shared: Option<(Param, Param, Param, Option<Param>)>,
    balancer: Option<BiasBalancer>,
}

impl MoeLayer {
    /// Validates `cfg` and creates (or finds) the parameters under `path` for `cfg.strategy`.
    /// Weights are initialised like torch's `nn.Linear`: U(±1/√fan_in).
    pub fn new(path: &ParamPath, cfg: &MoeConfig) -> Result<Self> {
        Self::with_strategy(path, cfg, strategy_for(&cfg.strategy))
    }

    /// Like [`MoeLayer::new`] with a custom [`RoutingStrategy`] (`cfg.strategy` is then only
    /// used for validation).
    pub fn with_strategy(
        path: &ParamPath,
        cfg: &MoeConfig,
        strategy: Box<dyn RoutingStrategy>,
    ) -> Result<Self> {
        cfg.validate()?;
        let (d, f, e) = (cfg.d_model, cfg.d_ff, cfg.num_experts);
        let uniform = |fan_in: usize| Init::Uniform { bound: 1.0 / (fan_in.max(1) as f64).sqrt() };
        let router = strategy
            .router_params(cfg)
            .into_iter()
            .map(|spec| {
                let fan_in = spec.shape.last().copied().unwrap_or(1);
                path.get(&spec.name, spec.shape, uniform(fan_in))
            })
            .collect::<Result<Vec<_>>>()?;
        let experts = path.pp("experts");
        let gate_up_proj = experts.get("gate_up_proj", (e, 2 * f, d), uniform(d))?;
        let down_proj = experts.get("down_proj", (e, d, f), uniform(f))?;
        let shared = if cfg.shared_expert_enabled {
            let fs = cfg.shared_expert_d_ff;
            let sp = path.pp(&cfg.shared_expert_name);
            let g = sp.pp("gate_proj").get("weight", (fs, d), uniform(d))?;
            let u = sp.pp("up_proj").get("weight", (fs, d), uniform(d))?;
            let dn = sp.pp("down_proj").get("weight", (d, fs), uniform(fs))?;
            let gate = if cfg.shared_expert_gate {
                Some(path.pp("shared_expert_gate").get("weight", (1, d), uniform(d))?)
            } else {
                None
            };
            Some((g, u, dn, gate))
        } else {
            None
        };
        let balancer = cfg.bias_balancing.map(|rate| BiasBalancer::new(e, rate));
        Ok(MoeLayer { cfg: cfg.clone(), strategy, router, gate_up_proj, down_proj, shared, balancer })
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The routing strategy.
    pub fn strategy(&self) -> &dyn RoutingStrategy {
        self.strategy.as_ref()
    }

    /// Every parameter of the layer, in [`MoeWeights`] order: router(s), gate_up, down, shared
    /// expert (gate, up, down, gate weight).
    pub fn params(&self) -> Vec<Param> {
        let mut ps = self.router.clone();
        ps.push(self.gate_up_proj.clone());
        ps.push(self.down_proj.clone());
        if let Some((g, u, d, gate)) = &self.shared {
            ps.extend([g.clone(), u.clone(), d.clone()]);
            ps.extend(gate.clone());
        }
        ps
    }

    /// The current parameters as Vars.
    pub fn weights(&self) -> MoeWeights {
        MoeWeights {
            router: self.router.iter().map(Param::var).collect(),
            gate_up: self.gate_up_proj.var(),
            down: self.down_proj.var(),
            shared: self.shared.as_ref().map(|(g, u, d, gate)| SharedExpertWeights {
                gate_proj: g.var(),
                up_proj: u.var(),
                down_proj: d.var(),
                gate: gate.as_ref().map(Param::var),
            }),
        }
    }

    /// The aux-loss-free selection bias (one value per expert), if the layer balances by bias.
    pub fn balancing_bias(&self) -> Option<Vec<f64>> {
        self.balancer.as_ref().map(BiasBalancer::bias)
    }

    /// The balancer itself (to save or restore its state), if any.
    pub fn balancer(&self) -> Option<&BiasBalancer> {
        self.balancer.as_ref()
    }

    /// DeepSeek-V3's bias update after a step, from that step's stats:
    /// `b_i += rate · sign(mean load - load_i)`. Returns the new bias, or `None` (and does
    /// nothing) when `bias_balancing` is off.
    pub fn update_balancing_bias(&self, stats: &RoutingStats) -> Result<Option<Vec<f64>>> {
        match &self.balancer {
            Some(b) => Ok(Some(b.update_from_stats(stats)?)),
            None => Ok(None),
        }
    }

    /// The forward pass on the layer's current parameters (see [`MoeLayer::forward_with`]).
    pub fn forward(&self, x: &Var, ctx: &MoeContext) -> Result<MoeOutput> {
        self.forward_with(x, &self.weights(), ctx)
    }

    /// The forward pass with explicit parameter Vars `w` (the layer's own from
    /// [`MoeLayer::weights`], or a gradient checker's). `x` is `(b, l, d)` or `(T, d)`.
    pub fn forward_with(&self, x: &Var, w: &MoeWeights, ctx: &MoeContext) -> Result<MoeOutput> {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        let (batch, seq) = match x.dims() {
            [t, dd] if *dd == d => (1, *t),
            [b, l, dd] if *dd == d => (*b, *l),
            _ => {
                return Err(Error::bad_shape(
                    "MoeLayer::forward",
                    x.shape(),
                    format!("expected (batch, seq, {d}) or (tokens, {d})"),
                ))
            }
        };
        if !x.dtype().is_float() {
            return Err(Error::dtype("MoeLayer::forward", x.dtype()));
        }
        check_expert_shapes(&w.gate_up, &w.down, cfg.num_experts, cfg.d_ff, d)?;
        let specs = self.strategy.router_params(cfg);
        if specs.len() != w.router.len() {
            return Err(Error::invalid(
                "MoeLayer::forward",
                "weights.router",
                format!(
                    "{} routing needs {} router parameters, {} given",
                    self.strategy.name(),
                    specs.len(),
                    w.router.len()
                ),
            ));
        }
        for (spec, v) in specs.iter().zip(&w.router) {
            if v.dims() != spec.shape.as_slice() {
                return Err(Error::bad_shape(
                    "MoeLayer::forward",
                    v.shape(),
                    format!("router `{}` must be {:?}", spec.name, spec.shape),
                ));
            }
        }
        let t = batch * seq;
        let xt = x.reshape((t, d))?;
        let router_x = self.router_input(&xt, ctx)?;
        let bias = match &self.balancer {
            Some(b) => Some(b.bias_tensor(x.dtype(), x.device())?),
            None => None,
        };
        let input = RouteInput {
            x: &xt,
            router_x: &router_x,
            batch,
            seq,
            router: &w.router,
            gate_up: &w.gate_up,
            down: &w.down,
            cfg,
            ctx,
            selection_bias: bias.as_ref(),
        };
        let routed = self.strategy.route(&input)?;
        let shared = match &w.shared {
            Some(sw) => Some(shared_expert(&xt, sw)?),
            None => None,
        };
        let finish = |y: &Var| -> Result<Var> {
            let y = match &shared {
                Some(s) => y.add(s)?,
                None => y.clone(),
            };
            y.reshape(x.dims())
        };
        let out = finish(&routed.out)?;
        let task_outputs = routed.task_outputs.iter().map(finish).collect::<Result<Vec<_>>>()?;
        Ok(MoeOutput {
            out,
            task_outputs,
            aux: routed.aux,
            stats: routed.stats,
            assignment: routed.assignment,
        })
    }

    /// The router's input: `x`, or in training with `jitter_noise = j > 0`, `x · U(1 - j, 1 + j)`
    /// (a constant noise draw seeded by the context's seed and step; Switch's multiplicative jitter).
    fn router_input(&self, x: &Var, ctx: &MoeContext) -> Result<Var> {
        let j = self.cfg.jitter_noise;
        if !(ctx.training && j > 0.0) {
            return Ok(x.clone());
        }
        let seed = ctx.seed ^ ctx.step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x4D6F_4542_4A49_5454;
        let mut rng = Rng::new(seed);
        let n = x.elem_count();
        let noise: Vec<f64> = (0..n).map(|_| 1.0 - j + 2.0 * j * rng.uniform()).collect();
        let noise = Tensor::from_vec(noise, x.dims(), &moeba_tensor::Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        x.mul(&Var::constant(ops::contiguous(&noise)?))
    }
}
