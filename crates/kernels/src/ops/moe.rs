//! Mixture-of-Experts ops: top-k gating, token permutation, grouped expert GEMM.
//!
//! The dropless MoE pipeline as small routing primitives (MegaBlocks' decomposition):
//! ```text
//! logits (T, E) ─ topk_gating ─ indices (T, k), weights (T, k), counts, mean_score, lse
//! indices ─ moe_plan_from_topk ─ MoeRoutingPlan (rows grouped by expert, a stable counting sort)
//! x (T, d) ─ moe_permute ─ x_sorted (R, d) ─ grouped_matmul (per expert) ─ y (R, d')
//! y, row weights (R) ─ moe_unpermute ─ out (T, d')      (weighted sum back to the tokens)
//! ```
//! Every op has a backward here too; all are deterministic (fixed summation orders, no atomics).
//! The CPU implementations are in `cpu::{gating, permute, grouped_gemm}`, the plain references
//! in `reference::moe`. Index arguments are `U32` or `I64`; float arguments f32, f64, bf16 or
//! f16 (bf16/f16 compute in f32 and round once).

use moeba_tensor::{DType, Device, Error, Result, Tensor};

use super::check_float;

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoeScoreFn {
    /// `softmax(logits)` over the experts (Mixtral, Switch, Qwen2-MoE).
    Softmax,
    /// `sigmoid(logits)` elementwise (DeepSeek-V3).
    Sigmoid,
}

/// Settings of [`topk_gating`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopkGatingOptions {
    /// Experts per token (1..=E).
    pub k: usize,
    /// The score function.
    pub score: MoeScoreFn,
    /// Divide the k selected scores by their sum (Mixtral's `norm_topk_prob`).
    pub renormalize: bool,
    /// Multiplies the final weights (DeepSeek-V3's `routed_scaling_factor`; 1.0 for none).
    pub scaling: f64,
}

impl TopkGatingOptions {
    /// Softmax scores, top-`k`, renormalised, no scaling (Mixtral).
    pub fn softmax(k: usize) -> Self {
        TopkGatingOptions { k, score: MoeScoreFn::Softmax, renormalize: true, scaling: 1.0 }
    }
}

/// The outputs of [`topk_gating`]; float tensors have the logits' dtype unless said otherwise.
#[derive(Debug, Clone)]
pub struct TopkGating {
    /// (T, k) `U32`: chosen experts per token, by descending (biased) score, ties to the lower index.
    pub indices: Tensor,
    /// (T, k): the chosen scores (without the selection bias), renormalised if asked, times `scaling`.
    pub weights: Tensor,
    /// (T, E): every expert's score (softmax or sigmoid of the logits).
    pub scores: Tensor,
    /// (E): number of (token, slot) assignments per expert (before any capacity drop). Float:
    /// f64 for f64 logits, f32 otherwise.
    pub counts: Tensor,
    /// (E): mean over the tokens of `scores` (P_e of the load-balancing loss; 0 when T = 0).
    pub mean_score: Tensor,
    /// (T): logsumexp of each token's logits (for the router z-loss), whatever the score function.
    pub lse: Tensor,
}

/// Checks the logits and options of the gating ops; returns (T, E).
fn check_gating(
    op: &'static str,
    logits: &Tensor,
    selection_bias: Option<&Tensor>,
    opts: &TopkGatingOptions,
) -> Result<(usize, usize)> {
    check_float(op, logits)?;
    if logits.rank() != 2 {
        return Err(Error::bad_shape(op, logits.shape(), "logits must be (tokens, experts)"));
    }
    let (t, e) = (logits.dims()[0], logits.dims()[1]);
    if e == 0 {
        return Err(Error::invalid(op, "logits", "zero experts: logits must have at least one column"));
    }
    if opts.k == 0 || opts.k > e {
        return Err(Error::invalid(
            op,
            "k",
            format!("experts per token k = {} must be in 1..={e} (the number of experts)", opts.k),
        ));
    }
    if !opts.scaling.is_finite() {
        return Err(Error::invalid(op, "scaling", format!("must be finite, got {}", opts.scaling)));
    }
    if let Some(b) = selection_bias {
        check_float(op, b)?;
        if b.dims() != [e] {
            return Err(Error::bad_shape(op, b.shape(), format!("selection_bias must be ({e})")));
        }
        check_device(op, logits, b)?;
    }
    check_cpu(op, logits)?;
    Ok((t, e))
}

fn check_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if !a.device().same_device(b.device()) {
        return Err(Error::DeviceMismatch { op, lhs: a.device().to_string(), rhs: b.device().to_string() });
    }
    Ok(())
}

fn check_cpu(op: &'static str, x: &Tensor) -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    let _ = op;
    match x.device() {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(Error::Unsupported {
            op,
            msg: "the MoE ops have no CUDA kernels yet; HINT: run the MoE layer on the CPU".into(),
        }),
    }
}

fn check_same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    check_device(op, a, b)
}

/// Fused top-k gating: scores, top-k selection, (renormalised) weights, per-expert counts and
/// mean scores, and the logsumexp, in one pass per token.
///
/// `logits` (T, E); `selection_bias` (E) is added to the scores for choosing experts only
/// (DeepSeek-V3's aux-loss-free balancing), never to the weights. Ties: lower expert index
/// first. Sorted by descending (biased) score. Errors on k = 0, k > E, E = 0, wrong shapes.
pub fn topk_gating(
    logits: &Tensor,
    selection_bias: Option<&Tensor>,
    opts: &TopkGatingOptions,
) -> Result<TopkGating> {
    check_gating("topk_gating", logits, selection_bias, opts)?;
    crate::cpu::gating::topk_gating(logits, selection_bias, opts)
}

/// The gradient of [`topk_gating`] with respect to the logits (T, E), from the gradients of
/// `weights` (T, k), `mean_score` (E) and `lse` (T) (any may be `None`: no gradient). The
/// selection is piecewise constant: no gradient flows through `indices` or `counts`.
pub fn topk_gating_backward(
    logits: &Tensor,
    fwd: &TopkGating,
    opts: &TopkGatingOptions,
    grad_weights: Option<&Tensor>,
    grad_mean_score: Option<&Tensor>,
    grad_lse: Option<&Tensor>,
) -> Result<Tensor> {
    let op = "topk_gating_backward";
    let (t, e) = check_gating(op, logits, None, opts)?;
    let k = opts.k;
    if fwd.indices.dims() != [t, k] || fwd.scores.dims() != [t, e] || fwd.weights.dims() != [t, k] {
        return Err(Error::invalid(
            op,
            "fwd",
            format!(
                "forward outputs do not match logits {} and k = {k}: indices {}, weights {}, scores {}",
                logits.shape(),
                fwd.indices.shape(),
                fwd.weights.shape(),
                fwd.scores.shape()
            ),
        ));
    }
    for (name, g, dims) in [
        ("grad_weights", grad_weights, vec![t, k]),
        ("grad_mean_score", grad_mean_score, vec![e]),
        ("grad_lse", grad_lse, vec![t]),
    ] {
        if let Some(g) = g {
            check_same_dtype(op, logits, g)?;
            if g.dims() != dims.as_slice() {
                return Err(Error::invalid(op, name, format!("expected shape {dims:?}, got {}", g.shape())));
            }
        }
    }
    crate::cpu::gating::topk_gating_backward(logits, fwd, opts, grad_weights, grad_mean_score, grad_lse)
}

/// Rows grouped by expert (a stable counting sort: within an expert, token order). R rows.
///
/// Row `r` of the permuted activations is token `row_token[r]`; the rows of expert `e` are
/// `expert_offsets[e]..expert_offsets[e + 1]`. Cloning is cheap (tensors share storage).
#[derive(Debug, Clone)]
pub struct MoeRoutingPlan {
    /// T: the number of tokens routed.
    pub num_tokens: usize,
    /// E: the number of experts.
    pub num_experts: usize,
    /// (E + 1) `I64`, on the device: expert `e`'s rows are `offsets[e]..offsets[e + 1]`.
    pub expert_offsets: Tensor,
    /// (R) `U32`: the token each row comes from.
    pub row_token: Tensor,
    /// (R) `U32`: the flat index `t * k + j` into the (T, k) weights (top-k plans), or `e * C + c`
    /// into the (E, C) weights (expert-choice plans).
    pub row_slot: Tensor,
    /// Top-k plans: assignments dropped by the capacity limit. Expert-choice plans: tokens that
    /// no expert picked.
    pub dropped: usize,
}

impl MoeRoutingPlan {
    /// R: the number of rows (kept assignments).
    pub fn num_rows(&self) -> usize {
        self.row_token.elem_count()
    }

    /// The E + 1 expert offsets on the host.
    pub fn offsets_host(&self) -> Result<Vec<usize>> {
        offsets_from_tensor("MoeRoutingPlan::offsets_host", &self.expert_offsets, self.num_rows())
    }

    /// Rows per expert (E), on the host.
    pub fn expert_rows(&self) -> Result<Vec<usize>> {
        Ok(self.offsets_host()?.windows(2).map(|w| w[1] - w[0]).collect())
    }

    /// Checks that the plan's pieces agree with each other (shapes, dtypes, offsets monotone
    /// from 0 to R, tokens in range). Every op taking a plan calls it.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let r = self.num_rows();
        if self.row_token.rank() != 1 || self.row_slot.dims() != [r] {
            return Err(Error::invalid(
                op,
                "plan",
                format!(
                    "row_token {} and row_slot {} must both be (R)",
                    self.row_token.shape(),
                    self.row_slot.shape()
                ),
            ));
        }
        if self.expert_offsets.dims() != [self.num_experts + 1] {
            return Err(Error::invalid(
                op,
                "plan",
                format!(
                    "expert_offsets {} must be (E + 1) = ({})",
                    self.expert_offsets.shape(),
                    self.num_experts + 1
                ),
            ));
        }
        offsets_from_tensor(op, &self.expert_offsets, r)?;
        let toks = index_vec(op, "plan.row_token", &self.row_token)?;
        if let Some((i, &t)) = toks.iter().enumerate().find(|(_, &t)| t >= self.num_tokens) {
            return Err(Error::invalid(
                op,
                "plan",
                format!("row_token[{i}] = {t} is out of range for {} tokens", self.num_tokens),
            ));
        }
        index_vec(op, "plan.row_slot", &self.row_slot)?;
        Ok(())
    }
}

/// An index tensor (U32 or I64, any shape) as host `usize`s; negative values are an error.
pub(crate) fn index_vec(op: &'static str, arg: &'static str, ids: &Tensor) -> Result<Vec<usize>> {
    match ids.dtype() {
        DType::U32 => Ok(ids.cpu_data::<u32>()?.iter().map(|&v| v as usize).collect()),
        DType::I64 => ids
            .cpu_data::<i64>()?
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                usize::try_from(v)
                    .map_err(|_| Error::invalid(op, arg, format!("element {i} is negative ({v})")))
            })
            .collect(),
        dt => Err(Error::invalid(op, arg, format!("indices must be u32 or i64, got {dt}"))),
    }
}

/// The E + 1 offsets of a 1-d index tensor, checked: start at 0, never decrease, end at `rows`.
pub(crate) fn offsets_from_tensor(op: &'static str, offsets: &Tensor, rows: usize) -> Result<Vec<usize>> {
    if offsets.rank() != 1 || offsets.elem_count() == 0 {
        return Err(Error::invalid(
            op,
            "expert_offsets",
            format!("must be a non-empty 1-d (E + 1) tensor, got {}", offsets.shape()),
        ));
    }
    let o = index_vec(op, "expert_offsets", offsets)?;
    let n = o.len();
    if o[0] != 0 || o[n - 1] != rows || o.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::invalid(
            op,
            "expert_offsets",
            format!(
                "must rise from 0 to the number of rows {rows} without decreasing, got {:?}",
                &o[..n.min(16)]
            ),
        ));
    }
    Ok(o)
}

/// The plan of a top-k routing: `indices` (T, k) (U32 or I64) sorted into groups by expert,
/// stable (within an expert, in `t * k + j` order). `capacity`: each expert keeps at most
/// `capacity` rows (earlier tokens first); the rest are dropped and counted in `dropped`.
/// Errors on an index outside `0..num_experts` (naming it) or `num_experts == 0`.
pub fn moe_plan_from_topk(
    indices: &Tensor,
    num_experts: usize,
    capacity: Option<usize>,
) -> Result<MoeRoutingPlan> {
    let op = "moe_plan_from_topk";
    if indices.rank() != 2 {
        return Err(Error::bad_shape(op, indices.shape(), "indices must be (tokens, k)"));
    }
    if num_experts == 0 {
        return Err(Error::invalid(op, "num_experts", "must be at least 1"));
    }
    check_cpu(op, indices)?;
    crate::cpu::permute::plan_from_topk(indices, num_experts, capacity)
}

/// Expert choice: `token_ids` (E, C) U32 or I64 — expert `e` processes tokens `token_ids[e, :]`
/// (in that order); `row_slot = e * C + c`. `dropped` counts the tokens no expert picked.
/// Errors on a token id outside `0..num_tokens`.
pub fn moe_plan_from_expert_choice(token_ids: &Tensor, num_tokens: usize) -> Result<MoeRoutingPlan> {
    let op = "moe_plan_from_expert_choice";
    if token_ids.rank() != 2 {
        return Err(Error::bad_shape(op, token_ids.shape(), "token_ids must be (experts, capacity)"));
    }
    check_cpu(op, token_ids)?;
    crate::cpu::permute::plan_from_expert_choice(token_ids, num_tokens)
}

fn check_rows(op: &'static str, arg: &'static str, x: &Tensor, rows: usize, what: &str) -> Result<usize> {
    check_float(op, x)?;
    if x.rank() != 2 || x.dims()[0] != rows {
        return Err(Error::invalid(op, arg, format!("expected ({rows}, d) ({what}), got {}", x.shape())));
    }
    check_cpu(op, x)?;
    Ok(x.dims()[1])
}

/// Gathers the tokens into expert order: `out[r] = x[row_token[r]]`. `x` (T, d) → (R, d).
pub fn moe_permute(x: &Tensor, plan: &MoeRoutingPlan) -> Result<Tensor> {
    let op = "moe_permute";
    plan.validate(op)?;
    check_rows(op, "x", x, plan.num_tokens, "tokens")?;
    crate::cpu::permute::permute(x, plan)
}

/// The backward of [`moe_permute`]: `out[t] = Σ_{rows r of token t} grad[r]`, summed in row
/// order. `grad` (R, d) → (T, d).
pub fn moe_permute_backward(grad: &Tensor, plan: &MoeRoutingPlan) -> Result<Tensor> {
    let op = "moe_permute_backward";
    plan.validate(op)?;
    check_rows(op, "grad", grad, plan.num_rows(), "rows")?;
    crate::cpu::permute::unpermute(grad, None, plan)
}

/// `out[t] = Σ_{rows r of token t} w[r] · y[r]`, summed in a fixed order (ascending r;
/// deterministic, no atomics). `y` (R, d), `row_weights` (R) → (T, d); tokens with no row get 0.
pub fn moe_unpermute(y: &Tensor, row_weights: &Tensor, plan: &MoeRoutingPlan) -> Result<Tensor> {
    let op = "moe_unpermute";
    plan.validate(op)?;
    check_rows(op, "y", y, plan.num_rows(), "rows")?;
    check_same_dtype(op, y, row_weights)?;
    if row_weights.dims() != [plan.num_rows()] {
        return Err(Error::invalid(
            op,
            "row_weights",
            format!("expected ({}), got {}", plan.num_rows(), row_weights.shape()),
        ));
    }
    crate::cpu::permute::unpermute(y, Some(row_weights), plan)
}

/// The backward of [`moe_unpermute`]: `dy[r] = w[r] · grad_out[t_r]` (R, d) and
/// `dw[r] = ⟨y[r], grad_out[t_r]⟩` (R).
pub fn moe_unpermute_backward(
    y: &Tensor,
    row_weights: &Tensor,
    plan: &MoeRoutingPlan,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let op = "moe_unpermute_backward";
    plan.validate(op)?;
    let d = check_rows(op, "y", y, plan.num_rows(), "rows")?;
    check_same_dtype(op, y, row_weights)?;
    check_same_dtype(op, y, grad_out)?;
    if row_weights.dims() != [plan.num_rows()] {
        return Err(Error::invalid(
            op,
            "row_weights",
            format!("expected ({}), got {}", plan.num_rows(), row_weights.shape()),
        ));
    }
    if grad_out.dims() != [plan.num_tokens, d] {
        return Err(Error::invalid(
            op,
            "grad_out",
            format!("expected ({}, {d}), got {}", plan.num_tokens, grad_out.shape()),
        ));
    }
    crate::cpu::permute::unpermute_backward(y, row_weights, plan, grad_out)
}

/// Checks the operands of the grouped GEMM; returns (R, in, out, offsets).
fn check_grouped(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    expert_offsets: &Tensor,
) -> Result<(usize, usize, usize, Vec<usize>)> {
    check_float(op, x)?;
    check_same_dtype(op, x, w)?;
    check_cpu(op, x)?;
    if x.rank() != 2 || w.rank() != 3 || x.dims()[1] != w.dims()[2] {
        return Err(Error::ShapeMismatch { op, lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    let (r, inn, out, e) = (x.dims()[0], x.dims()[1], w.dims()[1], w.dims()[0]);
    if expert_offsets.dims() != [e + 1] {
        return Err(Error::invalid(
            op,
            "expert_offsets",
            format!("expected (E + 1) = ({}) for w {}, got {}", e + 1, w.shape(), expert_offsets.shape()),
        ));
    }
    let offs = offsets_from_tensor(op, expert_offsets, r)?;
    Ok((r, inn, out, offs))
}

/// Row `r` of expert `e`'s group: `out[r] = w[e] · x[r]`; `x` (R, in), `w` (E, out, in) in the
/// nn.Linear layout, `expert_offsets` (E + 1) → (R, out). Groups may be empty.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, expert_offsets: &Tensor) -> Result<Tensor> {
    let (_, _, _, offs) = check_grouped("grouped_matmul", x, w, expert_offsets)?;
    crate::cpu::grouped_gemm::grouped_matmul(x, w, &offs)
}

/// The backward of [`grouped_matmul`]: `dx[r] = grad_out[r] · w[e]` (R, in) and
/// `dw[e] = grad_out[rows_e]ᵀ · x[rows_e]` (E, out, in; zero for empty experts).
pub fn grouped_matmul_backward(
    x: &Tensor,
    w: &Tensor,
    expert_offsets: &Tensor,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let op = "grouped_matmul_backward";
    let (r, _, out, offs) = check_grouped(op, x, w, expert_offsets)?;
    check_same_dtype(op, x, grad_out)?;
    if grad_out.dims() != [r, out] {
        return Err(Error::invalid(
            op,
            "grad_out",
            format!("expected ({r}, {out}), got {}", grad_out.shape()),
        ));
    }
    crate::cpu::grouped_gemm::grouped_matmul_backward(x, w, &offs, grad_out)
}

fn check_swiglu(op: &'static str, h: &Tensor) -> Result<usize> {
    check_float(op, h)?;
    check_cpu(op, h)?;
    if h.rank() != 2 || !h.dims()[1].is_multiple_of(2) {
        return Err(Error::bad_shape(op, h.shape(), "expected (R, 2f): the gate half, then the up half"));
    }
    Ok(h.dims()[1] / 2)
}

/// The SwiGLU activation on fused projections: `h (R, 2f) = [gate | up]` → `silu(gate) * up`
/// `(R, f)`, in one pass (the layout `grouped_matmul` produces from a `gate_up (E, 2f, d)` weight).
pub fn moe_swiglu(h: &Tensor) -> Result<Tensor> {
    check_swiglu("moe_swiglu", h)?;
    crate::cpu::grouped_gemm::swiglu(h)
}

/// The backward of [`moe_swiglu`]: from `h (R, 2f)` and `grad (R, f)`, `dh (R, 2f)` =
/// `[grad · up · silu'(gate) | grad · silu(gate)]`.
pub fn moe_swiglu_backward(h: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let op = "moe_swiglu_backward";
    let f = check_swiglu(op, h)?;
    check_same_dtype(op, h, grad)?;
    if grad.dims() != [h.dims()[0], f] {
        return Err(Error::ShapeMismatch { op, lhs: h.shape().clone(), rhs: grad.shape().clone() });
    }
    crate::cpu::grouped_gemm::swiglu_backward(h, grad)
}

/// The SwiGLU experts on grouped rows in one call: `h = grouped_matmul(x, gate_up)` (R, 2f),
/// `a = moe_swiglu(h)` (R, f), `y = grouped_matmul(a, down)` (R, d_out), with `gate_up (E, 2f, d)`
/// and `down (E, d_out, f)`. Returns `y`, and `(h, a)` when `keep` (what the backward needs).
///
/// The result equals the three ops in sequence; on the CPU's f32 AVX2 path the SwiGLU runs on each
/// chunk of experts right after its GEMM, and without `keep` `h` and `a` are never allocated whole.
pub fn moe_swiglu_experts_forward(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    expert_offsets: &Tensor,
    keep: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let op = "moe_swiglu_experts_forward";
    let (_, _, f2, offs) = check_grouped(op, x, gate_up, expert_offsets)?;
    check_same_dtype(op, x, down)?;
    let e = gate_up.dims()[0];
    if !f2.is_multiple_of(2) || down.rank() != 3 || down.dims()[0] != e || down.dims()[2] != f2 / 2 {
        return Err(Error::invalid(
            op,
            "gate_up/down",
            format!(
                "expected gate_up (E, 2f, d) and down (E, d_out, f), got {} and {}",
                gate_up.shape(),
                down.shape()
            ),
        ));
    }
    crate::cpu::grouped_gemm::swiglu_experts_forward(x, gate_up, down, &offs, keep)
}
