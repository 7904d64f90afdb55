//! The MoE auxiliary losses on [`Var`]s: load balancing (Switch/GShard `E · Σ f_i P_i`), the
//! variance of expert usage, and the router z-loss (ST-MoE). Values, returned by the layer's
//! forward in [`AuxLosses`]; weighting and summing them into the training loss is the trainer's
//! job ([`AuxLosses::weighted_total`] is a convenience).

use moeba_autograd::Var;
use moeba_kernels::ops;
use moeba_tensor::{Error, Result, Tensor};

use super::config::MoeConfig;

/// How the load fraction `f_i` of the balancing loss is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbConvention {
    /// `f_i = count_i / (T · k)`: the fraction of assignments, `Σ f = 1` (Switch / GShard).
    Switch,
    /// `f_i = count_i / T`: `Σ f = k` (HF `load_balancing_loss_func`, Mixtral); equals `k ×` Switch.
    Hf,
}

/// The load-balancing loss `E · Σ_i f_i · P_i`, with `P = mean_score (E)` (the mean router
/// probability per expert, differentiable) and `f` from the non-differentiable assignment
/// `counts (E)` over `tokens` tokens with `k` experts each (see [`LbConvention`]). Rank 0.
/// Its minimum, 1 (Switch) or k (HF), is reached at uniform routing.
pub fn load_balancing_loss(
    mean_score: &Var,
    counts: &Tensor,
    tokens: usize,
    k: usize,
    convention: LbConvention,
) -> Result<Var> {
    let e = mean_score.elem_count();
    if mean_score.rank() != 1 || counts.dims() != [e] {
        return Err(Error::ShapeMismatch {
            op: "load_balancing_loss",
            lhs: mean_score.shape().clone(),
            rhs: counts.shape().clone(),
        });
    }
    let denom = match convention {
        LbConvention::Switch => (tokens * k).max(1),
        LbConvention::Hf => tokens.max(1),
    } as f64;
    let f = ops::affine(&ops::to_dtype(counts, mean_score.dtype())?, e as f64 / denom, 0.0)?;
    mean_score.mul(&Var::constant(f))?.sum_all()
}

/// The router z-loss `mean_t (logsumexp_t)²` from the per-token log-sum-exp of the router
/// logits `lse (T)`. Rank 0 (0 for no tokens).
pub fn router_z_loss(lse: &Var) -> Result<Var> {
    if lse.rank() != 1 {
        return Err(Error::bad_shape("router_z_loss", lse.shape(), "lse must be (tokens)"));
    }
    if lse.elem_count() == 0 {
        return Ok(Var::constant(Tensor::zeros((), lse.dtype(), lse.device())?));
    }
    lse.sqr()?.mean_all()
}

/// The routed usage of each expert: `u_i = Σ_t Σ_j w[t, j] · [idx[t, j] = i] / T` from the
/// combine weights `weights (T, k)` and the expert ids `indices (T, k)`: the share of the routed
/// weight mass each expert receives (Shazeer et al.'s "importance" / T). Differentiable in the
/// weights. Output `(num_experts)`.
pub fn routed_usage(weights: &Var, indices: &Tensor, num_experts: usize) -> Result<Var> {
    if weights.rank() != 2 || indices.dims() != weights.dims() {
        return Err(Error::ShapeMismatch {
            op: "routed_usage",
            lhs: weights.shape().clone(),
            rhs: indices.shape().clone(),
        });
    }
    let t = weights.dims()[0];
    let n = weights.elem_count();
    let zeros = Var::constant(Tensor::zeros(num_experts, weights.dtype(), weights.device())?);
    let used = zeros.scatter_add(0, &indices.reshape(n)?, &weights.reshape(n)?)?;
    used.scale(1.0 / t.max(1) as f64)
}

/// The variance of expert usage, `mean_i (u_i - mean(u))²` (population variance over experts;
/// the issue's `load_balance_alpha × variance(expert_usage)` without the alpha). Rank 0.
pub fn usage_variance_loss(usage: &Var) -> Result<Var> {
    if usage.rank() != 1 || usage.elem_count() == 0 {
        return Err(Error::bad_shape(
            "usage_variance_loss",
            usage.shape(),
            "usage must be (experts), E >= 1",
        ));
    }
    let centered = usage.sub(&usage.mean_all()?)?;
    centered.sqr()?.mean_all()
}

/// The auxiliary losses of one MoE forward (each rank 0; `None` when the strategy has no
/// learned router for it, e.g. hash routing).
#[derive(Debug, Clone, Default)]
pub struct AuxLosses {
    /// Load-balancing loss, Switch convention (`E · Σ f_i P_i`, `Σ f = 1`). Multiply by `k` for
    /// the HF/Mixtral value.
    pub lb_loss: Option<Var>,
    /// Router z-loss `mean (logsumexp logits)²`.
    pub z_loss: Option<Var>,
    /// Variance of the routed usage over experts ([`usage_variance_loss`]).
    pub usage_var_loss: Option<Var>,
}

impl AuxLosses {
    /// `lb_loss_alpha · lb + z_loss_alpha · z + usage_var_alpha · var` with the alphas of `cfg`,
    /// skipping absent losses and zero alphas; `None` when nothing is left.
    pub fn weighted_total(&self, cfg: &MoeConfig) -> Result<Option<Var>> {
        let mut total: Option<Var> = None;
        for (loss, alpha) in [
            (&self.lb_loss, cfg.lb_loss_alpha),
            (&self.z_loss, cfg.z_loss_alpha),
            (&self.usage_var_loss, cfg.usage_var_alpha),
        ] {
            if let (Some(l), true) = (loss, alpha != 0.0) {
                let term = l.scale(alpha)?;
                total = Some(match total {
                    Some(t) => t.add(&term)?,
                    None => term,
                });
            }
        }
        Ok(total)
    }

    /// Element-wise sum with another set (e.g. the tasks of a multi-task layer), keeping any
    /// loss present in either.
    pub fn add(&self, other: &AuxLosses) -> Result<AuxLosses> {
        fn sum(a: &Option<Var>, b: &Option<Var>) -> Result<Option<Var>> {
            Ok(match (a, b) {
                (Some(a), Some(b)) => Some(a.add(b)?),
                (Some(a), None) => Some(a.clone()),
                (None, b) => b.clone(),
            })
        }
        Ok(AuxLosses {
            lb_loss: sum(&self.lb_loss, &other.lb_loss)?,
            z_loss: sum(&self.z_loss, &other.z_loss)?,
            usage_var_loss: sum(&self.usage_var_loss, &other.usage_var_loss)?,
        })
    }
}
