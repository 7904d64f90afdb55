//! The Mamba-1 block (the mixer only: the model wraps it in a norm and a residual) and its
//! inference cache.
//!
//! ```text
//! x (b, l, d_model) ─ in_proj ─┬─ xs (b, l, d_inner) ─ causal conv1d + SiLU ─ u
//!                              └─ z  (b, l, d_inner)                                (gate)
//! u ─ x_proj ─ [dt (R) | B (n) | C (n)]  (Jamba: RMSNorm on each)
//! delta = dt · dt_projᵀ, A = -exp(A_log)
//! y = selective_scan(u, delta, A, B, C, D, z, delta_bias = dt_proj.bias, softplus)
//! out = out_proj(y)
//! ```
//!
//! Everything stays in `(b, l, d_inner)` memory: the conv and the scan take channel-last
//! `(b, d, l)` views and return them, so no transpose is ever copied. Parameter names and shapes
//! are HuggingFace's (`in_proj.weight`, `conv1d.weight (d_inner, 1, k)`, `conv1d.bias`,
//! `x_proj.weight`, `dt_proj.weight/.bias`, `A_log`, `D`, `out_proj.weight`; Jamba's
//! `dt_layernorm`, `b_layernorm`, `c_layernorm`), so checkpoints load one to one.

use moeba_autograd::fused::conv1d::causal_conv1d;
use moeba_autograd::fused::selective_scan::{selective_scan, ScanInputs};
use moeba_autograd::{no_grad, Var};
use moeba_kernels::ops::{self, SelectiveStateUpdateArgs};
use moeba_tensor::{Error, Result, Tensor};

use crate::norm::rms_norm;
use crate::params::{Init, Param, ParamPath};
use crate::Linear;

/// Sizes and initialisation of a [`MambaBlock`] (HF `MambaConfig` names in the docs).
#[derive(Debug, Clone, PartialEq)]
pub struct MambaConfig {
    /// Model width (`hidden_size`).
    pub d_model: usize,
    /// State size `n` (`state_size`, 16).
    pub d_state: usize,
    /// Conv width (`conv_kernel`, 4).
    pub d_conv: usize,
    /// `d_inner = expand · d_model` (2).
    pub expand: usize,
    /// Rank of the time-step projection (`time_step_rank`, `ceil(d_model / 16)`).
    pub dt_rank: usize,
    /// Whether the conv has a bias (`use_conv_bias`, true).
    pub conv_bias: bool,
    /// Whether in_proj/out_proj have biases (`use_bias`, false).
    pub bias: bool,
    /// Smallest initial time step (`time_step_min`, 0.001).
    pub dt_min: f64,
    /// Largest initial time step (`time_step_max`, 0.1).
    pub dt_max: f64,
    /// Floor of the initial time step (`time_step_floor`, 1e-4).
    pub dt_init_floor: f64,
    /// Jamba's RMSNorms on dt, B and C after x_proj (`dt_layernorm`, `b_layernorm`, `c_layernorm`).
    pub extra_norms: bool,
    /// The epsilon of those norms.
    pub norm_eps: f64,
}

impl MambaConfig {
    /// The defaults of the paper / HF for a model of width `d_model`.
    pub fn new(d_model: usize) -> Self {
        MambaConfig {
            d_model,
            d_state: 16,
            d_conv: 4,
            expand: 2,
            dt_rank: d_model.div_ceil(16),
            conv_bias: true,
            bias: false,
            dt_min: 0.001,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            extra_norms: false,
            norm_eps: 1e-6,
        }
    }

    /// `expand · d_model`.
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    /// Checks the sizes and time-step range; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &'static str, msg: String| Err(Error::invalid("MambaConfig", arg, msg));
        if self.d_model == 0 || self.expand == 0 {
            return bad(
                "d_model",
                format!("d_model {} and expand {} must be > 0", self.d_model, self.expand),
            );
        }
        if self.d_state == 0 || self.d_conv == 0 || self.dt_rank == 0 {
            return bad(
                "d_state",
                format!(
                    "d_state {}, d_conv {} and dt_rank {} must be > 0",
                    self.d_state, self.d_conv, self.dt_rank
                ),
            );
        }
        if !(self.dt_min > 0.0 && self.dt_min <= self.dt_max && self.dt_init_floor >= 0.0) {
            return bad(
                "dt_min",
                format!("need 0 < dt_min <= dt_max, got {} and {}", self.dt_min, self.dt_max),
            );
        }
        Ok(())
    }
}

/// The inference state of one Mamba layer: O(1) in the sequence length.
#[derive(Debug, Clone)]
pub struct MambaCache {
    /// `(b, d_inner, d_conv)`: the last `d_conv` pre-conv inputs, oldest first (HF layout).
    pub conv_state: Tensor,
    /// `(b, d_inner, d_state)`: the scan state.
    pub ssm_state: Tensor,
}

/// The Mamba-1 mixer (see the module docs).
#[derive(Clone, Debug)]
pub struct MambaBlock {
    /// `(2 d_inner, d_model)`: rows `0..d_inner` give x, the rest the gate z.
    pub in_proj: Linear,
    /// `(d_inner, 1, d_conv)` (HF Conv1d layout).
    pub conv_weight: Param,
    /// `(d_inner)`.
    pub conv_bias: Option<Param>,
    /// `(dt_rank + 2 d_state, d_inner)`.
    pub x_proj: Linear,
    /// `(d_inner, dt_rank)` and its bias `(d_inner)` (applied in the scan as `delta_bias`).
    pub dt_proj: Linear,
    /// `(d_inner, d_state)`: `A = -exp(A_log)`.
    pub a_log: Param,
    /// `(d_inner)`: the skip.
    pub d: Param,
    /// `(d_model, d_inner)`.
    pub out_proj: Linear,
    /// Jamba's `dt_layernorm (dt_rank)`, `b_layernorm (d_state)`, `c_layernorm (d_state)`.
    pub norms: Option<[Param; 3]>,
    cfg: MambaConfig,
}

impl MambaBlock {
    /// Creates (or finds) the block's parameters under `path`, initialised as the paper does:
    /// `A_log[c, i] = ln(i + 1)`, `D = 1`, `dt_proj.bias = softplus⁻¹(dt)` with `dt` log-uniform
    /// in `[dt_min, dt_max]` and floored at `dt_init_floor`; projections as torch's defaults.
    pub fn new(path: &ParamPath, cfg: &MambaConfig) -> Result<Self> {
        cfg.validate()?;
        let (dm, di, n, k, r) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.d_conv, cfg.dt_rank);
        let dev = path.store().device().clone();
        let dtype = path.store().dtype();
        let in_proj = Linear::new(&path.pp("in_proj"), dm, 2 * di, cfg.bias)?;
        let conv = path.pp("conv1d");
        let cb = 1.0 / (k as f64).sqrt();
        let conv_weight = conv.get("weight", (di, 1, k), Init::Uniform { bound: cb })?;
        let conv_bias =
            if cfg.conv_bias { Some(conv.get("bias", di, Init::Uniform { bound: cb })?) } else { None };
        let x_proj = Linear::new(&path.pp("x_proj"), di, r + 2 * n, false)?;
        let dtp = path.pp("dt_proj");
        let fresh_bias = !dtp.contains("bias");
        // Created first as U(-1/2, 1/2) from its own per-name seed (Linear then finds it), and
        // mapped to log-uniform dt below.
        let bias = dtp.get("bias", di, Init::Uniform { bound: 0.5 })?;
        let dt_proj = Linear::new(&dtp, r, di, true)?;
        if fresh_bias {
            let u = bias.tensor().to_vec_f64()?;
            let (lo, hi) = (cfg.dt_min.ln(), cfg.dt_max.ln());
            let v: Vec<f64> = u
                .iter()
                .map(|&x| {
                    let dt = (lo + (x.clamp(-0.5, 0.5) + 0.5) * (hi - lo)).exp().max(cfg.dt_init_floor);
                    dt + (-(-dt).exp_m1()).ln()
                })
                .collect();
            bias.set(Tensor::from_vec(v, di, &dev)?.to_dtype(dtype)?)?;
        }
        let fresh_a = !path.contains("A_log");
        let a_log = path.get("A_log", (di, n), Init::Zeros)?;
        if fresh_a {
            let v: Vec<f64> = (0..di).flat_map(|_| (1..=n).map(|i| (i as f64).ln())).collect();
            a_log.set(Tensor::from_vec(v, (di, n), &dev)?.to_dtype(dtype)?)?;
        }
        let d = path.get("D", di, Init::Ones)?;
        let out_proj = Linear::new(&path.pp("out_proj"), di, dm, cfg.bias)?;
        let norms = if cfg.extra_norms {
            Some([
                path.pp("dt_layernorm").get("weight", r, Init::Ones)?,
                path.pp("b_layernorm").get("weight", n, Init::Ones)?,
                path.pp("c_layernorm").get("weight", n, Init::Ones)?,
            ])
        } else {
            None
        };
        Ok(MambaBlock {
            in_proj,
            conv_weight,
            conv_bias,
            x_proj,
            dt_proj,
            a_log,
            d,
            out_proj,
            norms,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MambaConfig {
        &self.cfg
    }

    /// `x (b, l, d_model) → (b, l, d_model)`. `seq_idx (b, l)` (U32/I64 document ids) restarts
    /// the conv window and the scan state at every document boundary of a packed row.
    pub fn forward(&self, x: &Var, seq_idx: Option<&Tensor>) -> Result<Var> {
        Ok(self.forward_full(x, seq_idx)?.0)
    }

    /// The forward, also returning the pre-conv input `(b, l, d_inner)` and the last scan state.
    fn forward_full(&self, x: &Var, seq_idx: Option<&Tensor>) -> Result<(Var, Var, Var)> {
        let (dm, di, n, k, r) =
            (self.cfg.d_model, self.cfg.d_inner(), self.cfg.d_state, self.cfg.d_conv, self.cfg.dt_rank);
        if x.rank() != 3 || x.dims()[2] != dm {
            return Err(Error::bad_shape(
                "MambaBlock::forward",
                x.shape(),
                format!("expected (batch, length, {dm})"),
            ));
        }
        let (b, l) = (x.dims()[0], x.dims()[1]);
        let xz = self.in_proj.forward(x)?;
        let xs = xz.narrow(2, 0, di)?;
        let z = xz.narrow(2, di, di)?.transpose(1, 2)?;
        let w = self.conv_weight.var().reshape((di, k))?;
        let cb = self.conv_bias.as_ref().map(|p| p.var());
        let u = causal_conv1d(&xs.transpose(1, 2)?, &w, cb.as_ref(), true, seq_idx)?;
        let dbc = self.x_proj.forward(&u.transpose(1, 2)?)?;
        let (mut dt, mut bm, mut cm) = (dbc.narrow(2, 0, r)?, dbc.narrow(2, r, n)?, dbc.narrow(2, r + n, n)?);
        if let Some([nd, nb, nc]) = &self.norms {
            let eps = self.cfg.norm_eps;
            dt = rms_norm(&dt, &nd.var(), eps)?;
            bm = rms_norm(&bm, &nb.var(), eps)?;
            cm = rms_norm(&cm, &nc.var(), eps)?;
        }
        let delta = dt.reshape((b * l, r))?.matmul(&self.dt_proj.weight.var().t()?)?.reshape((b, l, di))?;
        let a = self.a_log.var().exp()?.neg()?;
        let bm = bm.transpose(1, 2)?.unsqueeze(1)?;
        let cm = cm.transpose(1, 2)?.unsqueeze(1)?;
        let (dskip, dbias) = (self.d.var(), self.dt_proj.bias.as_ref().map(|p| p.var()));
        let (y, last) = selective_scan(&ScanInputs {
            u: &u,
            delta: &delta.transpose(1, 2)?,
            a: &a,
            b: &bm,
            c: &cm,
            d: Some(&dskip),
            z: Some(&z),
            delta_bias: dbias.as_ref(),
            delta_softplus: true,
            initial_state: None,
            seq_idx,
        })?;
        let out = self.out_proj.forward(&y.transpose(1, 2)?)?;
        Ok((out, xs, last))
    }

    /// An empty cache for `batch` rows (zero states), in the parameters' dtype and device.
    pub fn empty_cache(&self, batch: usize) -> Result<MambaCache> {
        let t = self.d.tensor();
        let (di, k, n) = (self.cfg.d_inner(), self.cfg.d_conv, self.cfg.d_state);
        Ok(MambaCache {
            conv_state: Tensor::zeros((batch, di, k), t.dtype(), t.device())?,
            ssm_state: Tensor::zeros((batch, di, n), t.dtype(), t.device())?,
        })
    }

    /// Runs a prompt `x (b, l, d_model)` without recording a tape; returns the output and the
    /// cache after its last token (the last `d_conv` pre-conv inputs, left zero-padded, and the
    /// scan state).
    pub fn prefill(&self, x: &Tensor) -> Result<(Tensor, MambaCache)> {
        let _guard = no_grad();
        let (out, xs, last) = self.forward_full(&Var::constant(x.clone()), None)?;
        let (b, l, di, k) = (x.dims()[0], x.dims()[1], self.cfg.d_inner(), self.cfg.d_conv);
        let m = l.min(k);
        let tail = xs.tensor().narrow(1, l - m, m)?.transpose(1, 2)?;
        let conv_state = if m < k {
            let pad = Tensor::zeros((b, di, k - m), x.dtype(), x.device())?;
            ops::concat(&[&pad, &tail], 2)?
        } else {
            ops::contiguous(&tail)?
        };
        Ok((out.tensor().clone(), MambaCache { conv_state, ssm_state: last.tensor().clone() }))
    }

    /// Advances one token `x (b, d_model) → (b, d_model)` in O(1), updating `cache`.
    pub fn forward_step(&self, x: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        let _guard = no_grad();
        let (dm, di, n, k, r) =
            (self.cfg.d_model, self.cfg.d_inner(), self.cfg.d_state, self.cfg.d_conv, self.cfg.dt_rank);
        if x.rank() != 2 || x.dims()[1] != dm {
            return Err(Error::bad_shape(
                "MambaBlock::forward_step",
                x.shape(),
                format!("expected (batch, {dm})"),
            ));
        }
        let b = x.dims()[0];
        if cache.conv_state.dims() != [b, di, k] || cache.ssm_state.dims() != [b, di, n] {
            return Err(Error::invalid(
                "MambaBlock::forward_step",
                "cache",
                format!(
                    "conv_state {} / ssm_state {} do not match ({b}, {di}, {k}) / ({b}, {di}, {n}); HINT: build it \
                     with prefill or empty_cache",
                    cache.conv_state.shape(),
                    cache.ssm_state.shape()
                ),
            ));
        }
        let xz = self.in_proj.forward(&Var::constant(x.clone()))?;
        let xs = xz.tensor().narrow(1, 0, di)?;
        let z = xz.tensor().narrow(1, di, di)?;
        let w = self.conv_weight.tensor().reshape((di, k))?;
        let cb = self.conv_bias.as_ref().map(|p| p.tensor());
        let (u, conv_state) = ops::causal_conv1d_update(&xs, &cache.conv_state, &w, cb.as_ref(), true)?;
        let dbc = self.x_proj.forward(&Var::constant(u.clone()))?;
        let (mut dt, mut bm, mut cm) = (dbc.narrow(1, 0, r)?, dbc.narrow(1, r, n)?, dbc.narrow(1, r + n, n)?);
        if let Some([nd, nb, nc]) = &self.norms {
            let eps = self.cfg.norm_eps;
            dt = rms_norm(&dt, &nd.var(), eps)?;
            bm = rms_norm(&bm, &nb.var(), eps)?;
            cm = rms_norm(&cm, &nc.var(), eps)?;
        }
        let delta = ops::matmul(dt.tensor(), &self.dt_proj.weight.tensor().t()?)?;
        let a = ops::neg(&ops::exp(&self.a_log.tensor())?)?;
        let (dskip, dbias) = (self.d.tensor(), self.dt_proj.bias.as_ref().map(|p| p.tensor()));
        let (y, ssm_state) = ops::selective_state_update(&SelectiveStateUpdateArgs {
            state: &cache.ssm_state,
            u: &u,
            delta: &delta,
            a: &a,
            b: &bm.tensor().unsqueeze(1)?,
            c: &cm.tensor().unsqueeze(1)?,
            d: Some(&dskip),
            z: Some(&z),
            delta_bias: dbias.as_ref(),
            delta_softplus: true,
        })?;
        let out = self.out_proj.forward(&Var::constant(y))?;
        *cache = MambaCache { conv_state, ssm_state };
        Ok(out.tensor().clone())
    }
}
