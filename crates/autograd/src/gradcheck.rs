//! Numerical gradient checking: analytic gradients from [`Var::backward_with`] against central
//! differences, both in f64.
//!
//! Any op's tests can use [`check_gradients`]: write the computation as a closure over `Var`s,
//! give it sample inputs, and it fails with the worst element when the backward is wrong.
//!
//! ```
//! use moeba_autograd::gradcheck::{check_gradients, GradCheckOptions};
//! use moeba_tensor::{DType, Device, Tensor};
//! let x = Tensor::randn(1, (3, 4), 0.0, 1.0, DType::F32, &Device::Cpu)?;
//! let w = Tensor::randn(2, (4, 2), 0.0, 1.0, DType::F32, &Device::Cpu)?;
//! // Any output shape: it is contracted with a fixed random cotangent.
//! let report = check_gradients(|v| v[0].matmul(&v[1])?.tanh(), &[x, w], &GradCheckOptions::default())?;
//! assert!(report.max_abs_err() < 1e-6);
//! # Ok::<(), moeba_tensor::Error>(())
//! ```

use moeba_kernels::ops;
use moeba_tensor::{DType, Error, Result, Shape, Tensor};

use crate::grad_mode::no_grad;
use crate::Var;

/// Settings of [`check_gradients`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradCheckOptions {
    /// Central-difference step: `(L(x + eps) - L(x - eps)) / 2 eps`. Default `1e-6` (in f64 the
    /// truncation error is O(eps²) and the rounding error about 1e-16 |L| / eps).
    pub eps: f64,
    /// Absolute tolerance. Default `1e-5`.
    pub atol: f64,
    /// Relative tolerance (of the numerical value). Default `1e-3`. An element passes when
    /// `|analytic - numeric| <= atol + rtol * |numeric|` (torch.autograd.gradcheck's rule).
    pub rtol: f64,
    /// Seed of the random cotangent that non-scalar outputs are contracted with.
    pub seed: u64,
}

impl Default for GradCheckOptions {
    fn default() -> Self {
        GradCheckOptions { eps: 1e-6, atol: 1e-5, rtol: 1e-3, seed: 0x5EED }
    }
}

impl GradCheckOptions {
    /// The defaults with another step.
    pub fn with_eps(self, eps: f64) -> Self {
        GradCheckOptions { eps, ..self }
    }

    /// The defaults with other tolerances.
    pub fn with_tolerances(self, atol: f64, rtol: f64) -> Self {
        GradCheckOptions { atol, rtol, ..self }
    }
}

/// How well one input's analytic gradient matched.
#[derive(Debug, Clone, PartialEq)]
pub struct InputReport {
    /// The input's shape.
    pub shape: Shape,
    /// Largest `|analytic - numeric|` over the input's elements.
    pub max_abs_err: f64,
    /// Largest `|analytic - numeric| / max(|numeric|, atol)`.
    pub max_rel_err: f64,
    /// Whether backward gave this input a gradient at all (`false`: it was taken as zero).
    pub had_gradient: bool,
}

/// The result of a passing [`check_gradients`]: one entry per input.
#[derive(Debug, Clone, PartialEq)]
pub struct GradCheckReport {
    /// Per input, in order.
    pub inputs: Vec<InputReport>,
}

impl GradCheckReport {
    /// The largest absolute error over all inputs.
    pub fn max_abs_err(&self) -> f64 {
        self.inputs.iter().map(|r| r.max_abs_err).fold(0.0, f64::max)
    }

    /// The largest relative error over all inputs.
    pub fn max_rel_err(&self) -> f64 {
        self.inputs.iter().map(|r| r.max_rel_err).fold(0.0, f64::max)
    }
}

/// The worst element seen so far.
struct Worst {
    input: usize,
    flat: usize,
    analytic: f64,
    numeric: f64,
    /// `|analytic - numeric| / allowed`; > 1 fails (infinite for non-finite values).
    ratio: f64,
}

/// Checks the backward of `f` at `inputs` against central differences.
///
/// `f` builds the output from one `Var` per input. The inputs (float tensors of any float
/// dtype) are converted to f64 first, so `f` runs in f64: constants it creates should take the
/// dtype of its inputs (e.g. `v[0].dtype()`); non-differentiable arguments (indices, masks) are
/// captured by the closure. The output may have any shape: the check differentiates
/// `L = Σ out ⊙ c` for a fixed random cotangent `c`, so every output element matters.
///
/// Analytic gradients come from [`Var::backward_with`] (an input that gets none counts as zero,
/// so an op that stops gradients fails the check); numerical ones from `2 × elements` evaluations
/// of `f` under no-grad. Keep shapes small.
///
/// Returns the per-input errors, or an error naming the worst element (input index, flat and
/// multi-dimensional index, analytic vs numeric value, the tolerance). Errors from `f` or from
/// backward (such as an op without a backward) are returned as they are.
pub fn check_gradients<F>(f: F, inputs: &[Tensor], opts: &GradCheckOptions) -> Result<GradCheckReport>
where
    F: Fn(&[Var]) -> Result<Var>,
{
    let xs = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if !t.dtype().is_float() {
                return Err(Error::invalid(
                    "check_gradients",
                    "inputs",
                    format!(
                        "input {i} has dtype {}; only float inputs are differentiated. HINT: capture \
                         index tensors in the closure",
                        t.dtype()
                    ),
                ));
            }
            ops::to_dtype(t, DType::F64)
        })
        .collect::<Result<Vec<_>>>()?;

    // Analytic.
    let vars: Vec<Var> = xs.iter().cloned().map(Var::param).collect();
    let out = f(&vars)?;
    if !out.dtype().is_float() {
        return Err(Error::dtype("check_gradients", out.dtype()));
    }
    let cotangent = Tensor::randn(opts.seed, out.shape(), 0.0, 1.0, out.dtype(), out.device())?;
    let cot = cotangent.to_vec_f64()?;
    let out_shape = out.shape().clone();
    let grads = if out.requires_grad() { Some(out.backward_with(cotangent)?) } else { None };
    drop(out);
    let mut analytic = Vec::with_capacity(vars.len());
    for v in &vars {
        match grads.as_ref().and_then(|g| g.get(v)) {
            Some(g) => analytic.push((g.to_vec_f64()?, true)),
            None => analytic.push((vec![0.0; v.elem_count()], false)),
        }
    }
    drop(vars);

    // Numerical.
    let objective = |xs: &[Tensor]| -> Result<f64> {
        let _guard = no_grad();
        let vars: Vec<Var> = xs.iter().cloned().map(Var::constant).collect();
        let out = f(&vars)?;
        if out.shape() != &out_shape {
            return Err(Error::ShapeMismatch {
                op: "check_gradients",
                lhs: out_shape.clone(),
                rhs: out.shape().clone(),
            });
        }
        Ok(out.tensor().to_vec_f64()?.iter().zip(&cot).map(|(o, c)| o * c).sum())
    };
    let mut reports = Vec::with_capacity(xs.len());
    let mut worst: Option<Worst> = None;
    let mut point = xs.clone();
    for (i, x) in xs.iter().enumerate() {
        let base = x.to_vec_f64()?;
        let (ref analytic, had_gradient) = analytic[i];
        let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
        let mut values = base.clone();
        for j in 0..base.len() {
            let mut eval = |v: f64| -> Result<f64> {
                values[j] = v;
                point[i] = Tensor::from_vec(values.clone(), x.shape(), x.device())?;
                objective(&point)
            };
            let plus = eval(base[j] + opts.eps)?;
            let minus = eval(base[j] - opts.eps)?;
            values[j] = base[j];
            let numeric = (plus - minus) / (2.0 * opts.eps);
            let a = analytic[j];
            let err = (a - numeric).abs();
            let allowed = opts.atol + opts.rtol * numeric.abs();
            let ratio = if a == numeric {
                0.0
            } else if err.is_finite() {
                err / allowed
            } else {
                f64::INFINITY
            };
            max_abs = max_abs.max(err);
            max_rel = max_rel.max(err / numeric.abs().max(opts.atol));
            if worst.as_ref().is_none_or(|w| ratio > w.ratio) {
                worst = Some(Worst { input: i, flat: j, analytic: a, numeric, ratio });
            }
        }
        point[i] = x.clone();
        reports.push(InputReport {
            shape: x.shape().clone(),
            max_abs_err: max_abs,
            max_rel_err: max_rel,
            had_gradient,
        });
    }
    match worst {
        Some(w) if w.ratio > 1.0 || w.ratio.is_nan() => {
            let shape = xs[w.input].shape();
            let r = &reports[w.input];
            Err(Error::Msg(format!(
                "check_gradients: the gradient of input {} (shape {shape}) is wrong at element {} {:?}: \
                 analytic {:e} vs numeric {:e} (allowed |diff| <= {:e} + {:e}·|numeric|; this input's max \
                 abs error {:e}, max rel error {:e}{})",
                w.input,
                w.flat,
                unravel(w.flat, shape.dims()),
                w.analytic,
                w.numeric,
                opts.atol,
                opts.rtol,
                r.max_abs_err,
                r.max_rel_err,
                if r.had_gradient { "" } else { "; backward gave this input NO gradient" },
            )))
        }
        _ => Ok(GradCheckReport { inputs: reports }),
    }
}

/// The multi-dimensional index of row-major flat index `flat` in `dims`.
fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (k, &n) in dims.iter().enumerate().rev() {
        if n > 0 {
            idx[k] = flat % n;
            flat /= n;
        }
    }
    idx
}
