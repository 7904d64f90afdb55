//! The Mamba-2 block and its inference cache.
//!
//! The mixer of Mamba-2 (Dao & Gu 2024) with the HuggingFace `Mamba2Mixer` parameter layout, so
//! checkpoints map one to one:
//! ```text
//! in_proj (d_model → 2·d_inner + 2·G·N + H) → [z | xBC | dt]
//! xBC → causal depthwise conv1d (conv1d.weight (conv_dim, 1, k), conv1d.bias) → SiLU → [x | B | C]
//! y = SSD(x (b, l, H, P), dt, A = -exp(A_log), B, C, D, dt_bias, softplus)   (chunked, fused)
//! y = RMSNorm_grouped(y · silu(z)) · norm.weight     (G groups of d_inner / G, gate before the norm)
//! out = out_proj(y)
//! ```
//! The block is the mixer only (no pre-norm, no residual). Inference: [`Mamba2Block::prefill`]
//! runs a prompt and fills a [`Mamba2Cache`]; [`Mamba2Block::forward_step`] advances one token in
//! O(1) time and memory.

use moeba_autograd::fused::conv1d::causal_conv1d;
use moeba_autograd::fused::ssd::{ssd, SsdInputs};
use moeba_autograd::{no_grad, Var};
use moeba_kernels::ops::{self, SsdStepArgs};
use moeba_tensor::{Error, Result, Tensor};

use crate::linear::Linear;
use crate::norm::rms_norm;
use crate::params::{Init, Param, ParamPath};

/// Sizes and initialisation of a [`Mamba2Block`] (HF `Mamba2Config` names in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct Mamba2Config {
    /// Model width (HF `hidden_size`).
    pub d_model: usize,
    /// State size N per head (HF `state_size`), default 128.
    pub d_state: usize,
    /// Conv kernel width (HF `conv_kernel`), default 4.
    pub d_conv: usize,
    /// d_inner = expand · d_model, default 2.
    pub expand: usize,
    /// Head dim P (HF `head_dim`), default 64.
    pub head_dim: usize,
    /// Heads H (HF `num_heads`); must equal expand · d_model / head_dim.
    pub num_heads: usize,
    /// Groups G of B and C (HF `n_groups`), default 1; divides num_heads.
    pub n_groups: usize,
    /// SSD chunk size, default 256.
    pub chunk_size: usize,
    /// Whether conv1d has a bias (HF `use_conv_bias`), default true.
    pub conv_bias: bool,
    /// Whether in_proj/out_proj have biases (HF `use_bias`), default false.
    pub bias: bool,
    /// Smallest initial dt (HF `time_step_min`), default 0.001.
    pub dt_min: f64,
    /// Largest initial dt (HF `time_step_max`), default 0.1.
    pub dt_max: f64,
    /// Floor of the initial dt (HF `time_step_floor`), default 1e-4.
    pub dt_init_floor: f64,
    /// Epsilon of the gated RMSNorm (HF `layer_norm_epsilon`), default 1e-5.
    pub norm_eps: f64,
}

impl Mamba2Config {
    /// The defaults of the paper / HF for width `d_model` (num_heads = 2·d_model / 64).
    pub fn new(d_model: usize) -> Self {
        Mamba2Config {
            d_model,
            d_state: 128,
            d_conv: 4,
            expand: 2,
            head_dim: 64,
            num_heads: 2 * d_model / 64,
            n_groups: 1,
            chunk_size: 256,
            conv_bias: true,
            bias: false,
            dt_min: 0.001,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            norm_eps: 1e-5,
        }
    }

    /// expand · d_model.
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    /// Channels of the conv: d_inner + 2 · n_groups · d_state.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.n_groups * self.d_state
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Mamba2Config";
        if self.d_model == 0 || self.d_state == 0 || self.d_conv == 0 || self.head_dim == 0 {
            return Err(Error::invalid(
                OP,
                "sizes",
                format!("d_model, d_state, d_conv, head_dim must be > 0: {self:?}"),
            ));
        }
        if self.num_heads * self.head_dim != self.d_inner() {
            return Err(Error::invalid(
                OP,
                "num_heads",
                format!(
                    "num_heads {} × head_dim {} must equal expand {} × d_model {} = {}",
                    self.num_heads,
                    self.head_dim,
                    self.expand,
                    self.d_model,
                    self.d_inner()
                ),
            ));
        }
        if self.n_groups == 0 || !self.num_heads.is_multiple_of(self.n_groups) {
            return Err(Error::invalid(
                OP,
                "n_groups",
                format!("n_groups {} must divide num_heads {}", self.n_groups, self.num_heads),
            ));
        }
        if self.chunk_size == 0 {
            return Err(Error::invalid(OP, "chunk_size", "must be at least 1"));
        }
        if !(self.dt_min > 0.0 && self.dt_min <= self.dt_max) {
            return Err(Error::invalid(
                OP,
                "dt_min",
                format!("need 0 < dt_min <= dt_max, got {} and {}", self.dt_min, self.dt_max),
            ));
        }
        Ok(())
    }
}

/// The per-layer decoding cache: `conv_state (b, conv_dim, d_conv)` holds the last `d_conv`
/// pre-conv xBC columns (oldest first, as HF), `ssm_state (b, h, p, n)` the SSD state.
#[derive(Debug, Clone)]
pub struct Mamba2Cache {
    /// (b, conv_dim, d_conv).
    pub conv_state: Tensor,
    /// (b, num_heads, head_dim, d_state).
    pub ssm_state: Tensor,
}

/// The Mamba-2 mixer (HF `Mamba2Mixer` names: `in_proj`, `conv1d`, `A_log`, `D`, `dt_bias`,
/// `norm`, `out_proj`).
#[derive(Debug, Clone)]
pub struct Mamba2Block {
    cfg: Mamba2Config,
    /// d_model → 2·d_inner + 2·G·N + H.
    pub in_proj: Linear,
    /// (conv_dim, 1, d_conv), HF layout.
    pub conv_weight: Param,
    /// (conv_dim), when `conv_bias`.
    pub conv_bias: Option<Param>,
    /// (h): A = -exp(A_log).
    pub a_log: Param,
    /// (h).
    pub d: Param,
    /// (h).
    pub dt_bias: Param,
    /// (d_inner): the gated RMSNorm's weight.
    pub norm_weight: Param,
    /// d_inner → d_model.
    pub out_proj: Linear,
}

/// `p` created with `init`, then, when it did not exist before, replaced by `f(value)`.
fn param_init(
    path: &ParamPath,
    name: &str,
    shape: usize,
    init: Init,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Param> {
    let fresh = !path.contains(name);
    let p = path.get(name, shape, init)?;
    if fresh {
        let t = p.tensor();
        p.set(f(&t)?.to_dtype(t.dtype())?)?;
    }
    Ok(p)
}

/// Values of a tensor mapped through `f` in f64.
fn map_f64(t: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
    let v: Vec<f64> = t.to_vec_f64()?.into_iter().map(f).collect();
    Tensor::from_vec(v, t.shape().clone(), t.device())
}

impl Mamba2Block {
    /// Creates (or finds) the parameters under `path`. New ones are initialised as the paper:
    /// `A_log = log(U(1, 16))`, `dt_bias = softplus⁻¹(dt)` with `dt = exp(U(log dt_min, log
    /// dt_max))` floored at `dt_init_floor`, `D = 1`, norm weight 1, torch defaults elsewhere.
    pub fn new(path: &ParamPath, cfg: &Mamba2Config) -> Result<Self> {
        cfg.validate()?;
        let (d_inner, conv_dim, h) = (cfg.d_inner(), cfg.conv_dim(), cfg.num_heads);
        let in_proj = Linear::new(
            &path.pp("in_proj"),
            cfg.d_model,
            2 * d_inner + 2 * cfg.n_groups * cfg.d_state + h,
            cfg.bias,
        )?;
        let cp = path.pp("conv1d");
        let bound = 1.0 / (cfg.d_conv as f64).sqrt();
        let conv_weight = cp.get("weight", (conv_dim, 1, cfg.d_conv), Init::Uniform { bound })?;
        let conv_bias =
            if cfg.conv_bias { Some(cp.get("bias", conv_dim, Init::Uniform { bound })?) } else { None };
        let a_log = param_init(path, "A_log", h, Init::Uniform { bound: 1.0 }, |u| {
            map_f64(u, |u| (1.0 + 15.0 * (u + 1.0) / 2.0).ln())
        })?;
        let (lo, hi, floor) = (cfg.dt_min.ln(), cfg.dt_max.ln(), cfg.dt_init_floor);
        let dt_bias = param_init(path, "dt_bias", h, Init::Uniform { bound: 1.0 }, |u| {
            map_f64(u, |u| {
                let dt = (lo + (hi - lo) * (u + 1.0) / 2.0).exp().max(floor);
                // softplus⁻¹(dt) = dt + log(1 - e^-dt)
                dt + (-(-dt).exp_m1()).ln()
            })
        })?;
        let d = path.get("D", h, Init::Ones)?;
        let norm_weight = path.pp("norm").get("weight", d_inner, Init::Ones)?;
        let out_proj = Linear::new(&path.pp("out_proj"), d_inner, cfg.d_model, cfg.bias)?;
        Ok(Mamba2Block {
            cfg: cfg.clone(),
            in_proj,
            conv_weight,
            conv_bias,
            a_log,
            d,
            dt_bias,
            norm_weight,
            out_proj,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Mamba2Config {
        &self.cfg
    }

    /// `(z, xBC, dt)` split off the last dim of in_proj's output `(..., 2·d_inner + 2GN + H)`.
    fn split_in(&self, zxbcdt: &Var) -> Result<(Var, Var, Var)> {
        let c = &self.cfg;
        let last = zxbcdt.rank() - 1;
        let (di, cd) = (c.d_inner(), c.conv_dim());
        Ok((
            zxbcdt.narrow(last, 0, di)?,
            zxbcdt.narrow(last, di, cd)?,
            zxbcdt.narrow(last, di + cd, c.num_heads)?,
        ))
    }

    /// `out_proj(RMSNorm_grouped(y · silu(z)) · norm.weight)` for `y, z (..., d_inner)`.
    fn gate_norm_out(&self, y: &Var, z: &Var) -> Result<Var> {
        let c = &self.cfg;
        let gated = y.mul(&z.silu()?)?;
        let dims = gated.dims().to_vec();
        let gs = c.d_inner() / c.n_groups;
        let mut grouped = dims[..dims.len() - 1].to_vec();
        grouped.extend([c.n_groups, gs]);
        let w = self.norm_weight.var().reshape((c.n_groups, gs))?;
        let normed = rms_norm(&gated.reshape(grouped)?, &w, c.norm_eps)?.reshape(dims)?;
        self.out_proj.forward(&normed)
    }

    /// The conv weight as (conv_dim, d_conv).
    fn conv_w(&self) -> Result<Var> {
        self.conv_weight.var().reshape((self.cfg.conv_dim(), self.cfg.d_conv))
    }

    /// The forward, also returning the pre-conv xBC (b, l, conv_dim) and the final SSD state.
    fn forward_full(&self, x: &Var, seq_idx: Option<&Tensor>) -> Result<(Var, Var, Var)> {
        let c = &self.cfg;
        if x.rank() != 3 || x.dims()[2] != c.d_model {
            return Err(Error::bad_shape(
                "Mamba2Block::forward",
                x.shape(),
                format!("expected (batch, len, d_model = {})", c.d_model),
            ));
        }
        let (b, l) = (x.dims()[0], x.dims()[1]);
        let (h, p, g, n, di) = (c.num_heads, c.head_dim, c.n_groups, c.d_state, c.d_inner());
        let (z, xbc, dt) = self.split_in(&self.in_proj.forward(x)?)?;
        let bias = self.conv_bias.as_ref().map(|p| p.var());
        let conv = causal_conv1d(&xbc.transpose(1, 2)?, &self.conv_w()?, bias.as_ref(), true, seq_idx)?;
        let conv = conv.transpose(1, 2)?; // (b, l, conv_dim)
        let xs = conv.narrow(2, 0, di)?.reshape((b, l, h, p))?;
        let bm = conv.narrow(2, di, g * n)?.reshape((b, l, g, n))?;
        let cm = conv.narrow(2, di + g * n, g * n)?.reshape((b, l, g, n))?;
        let a = self.a_log.var().exp()?.neg()?;
        let (dv, dtb) = (self.d.var(), self.dt_bias.var());
        let (y, fin) = ssd(&SsdInputs {
            x: &xs,
            dt: &dt,
            a: &a,
            b: &bm,
            c: &cm,
            d: Some(&dv),
            dt_bias: Some(&dtb),
            initial_state: None,
            dt_softplus: true,
            seq_idx,
            chunk_size: c.chunk_size,
        })?;
        let out = self.gate_norm_out(&y.reshape((b, l, di))?, &z)?;
        Ok((out, xbc, fin))
    }

    /// `x (b, l, d_model) → (b, l, d_model)`. With `seq_idx (b, l)` (u32/i64 document ids),
    /// packed documents do not see each other (conv window and SSD state restart).
    pub fn forward(&self, x: &Var, seq_idx: Option<&Tensor>) -> Result<Var> {
        Ok(self.forward_full(x, seq_idx)?.0)
    }

    /// Runs the prompt `x (b, l, d_model)` (no tape) and returns its output and the cache after
    /// its last token.
    pub fn prefill(&self, x: &Tensor) -> Result<(Tensor, Mamba2Cache)> {
        let _g = no_grad();
        let (out, xbc, fin) = self.forward_full(&Var::constant(x.clone()), None)?;
        let (b, l, k) = (x.dims()[0], x.dims()[1], self.cfg.d_conv);
        let m = l.min(k);
        let tail = xbc.tensor().narrow(1, l - m, m)?.transpose(1, 2)?; // (b, conv_dim, m)
        let conv_state = if m < k {
            let pad = Tensor::zeros((b, self.cfg.conv_dim(), k - m), x.dtype(), x.device())?;
            ops::concat(&[&pad, &tail], 2)?
        } else {
            ops::contiguous(&tail)?
        };
        Ok((out.tensor().clone(), Mamba2Cache { conv_state, ssm_state: fin.tensor().clone() }))
    }

    /// An empty cache (zero states) for `batch` sequences, in the parameters' dtype.
    pub fn empty_cache(&self, batch: usize) -> Result<Mamba2Cache> {
        let c = &self.cfg;
        let t = self.d.tensor();
        Ok(Mamba2Cache {
            conv_state: Tensor::zeros((batch, c.conv_dim(), c.d_conv), t.dtype(), t.device())?,
            ssm_state: Tensor::zeros((batch, c.num_heads, c.head_dim, c.d_state), t.dtype(), t.device())?,
        })
    }

    /// One token `x (b, d_model) → (b, d_model)`, advancing `cache` (O(1) in the tokens before).
    pub fn forward_step(&self, x: &Tensor, cache: &mut Mamba2Cache) -> Result<Tensor> {
        let c = &self.cfg;
        if x.rank() != 2 || x.dims()[1] != c.d_model {
            return Err(Error::bad_shape(
                "Mamba2Block::forward_step",
                x.shape(),
                format!("expected (batch, d_model = {})", c.d_model),
            ));
        }
        let _g = no_grad();
        let b = x.dims()[0];
        let (h, p, g, n, di) = (c.num_heads, c.head_dim, c.n_groups, c.d_state, c.d_inner());
        let (z, xbc, dt) = self.split_in(&self.in_proj.forward(&Var::constant(x.clone()))?)?;
        let bias = self.conv_bias.as_ref().map(|p| p.tensor());
        let (conv, conv_state) = ops::causal_conv1d_update(
            &ops::contiguous(xbc.tensor())?,
            &cache.conv_state,
            self.conv_w()?.tensor(),
            bias.as_ref(),
            true,
        )?;
        let xs = conv.narrow(1, 0, di)?.reshape((b, h, p))?;
        let bm = conv.narrow(1, di, g * n)?.reshape((b, g, n))?;
        let cm = conv.narrow(1, di + g * n, g * n)?.reshape((b, g, n))?;
        let a = ops::neg(&ops::exp(&self.a_log.tensor())?)?;
        let (dv, dtb) = (self.d.tensor(), self.dt_bias.tensor());
        let (y, ssm_state) = ops::ssd_state_update(&SsdStepArgs {
            x: &xs,
            dt: dt.tensor(),
            a: &a,
            b: &bm,
            c: &cm,
            d: Some(&dv),
            dt_bias: Some(&dtb),
            dt_softplus: true,
            state: &cache.ssm_state,
        })?;
        let out = self.gate_norm_out(&Var::constant(y.reshape((b, di))?), &z)?;
        cache.conv_state = conv_state;
        cache.ssm_state = ssm_state;
        Ok(out.tensor().clone())
    }
}
