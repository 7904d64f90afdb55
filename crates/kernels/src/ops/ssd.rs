//! The Mamba-2 SSD (state-space duality) scan: chunked forward and backward.
//!
//! Semantics (per batch `b`, head `h`, with `g(h) = h / (H / G)` the group head `h` reads):
//! ```text
//! dt'_t = softplus(dt_t + dt_bias)     (or dt_t + dt_bias without `dt_softplus`)
//! S_{-1} = initial_state (or 0)                                       (P × N per head)
//! S_t = exp(dt'_t A_h) S_{t-1} + dt'_t x_t B_tᵀ                        (x_t: P, B_t: N, group g(h))
//! y_t = S_t C_t + D_h ∘ x_t
//! final_state = S_{L-1}
//! ```
//! With `seq_idx`, the state restarts (`S_{t-1}` is dropped) wherever `seq_idx[t] != seq_idx[t-1]`:
//! several documents packed in one row do not see each other; the initial state belongs to the
//! row's first document and the final state to its last.
//!
//! The CPU path ([`crate::cpu::ssd`]) runs the chunked algorithm (quadratic, attention-like form
//! inside each chunk of `chunk_size` tokens through matmuls, state passing between chunks); the
//! plain recurrence is in [`crate::reference::ssd`].

use moeba_tensor::{DType, Device, Error, Result, Tensor};

/// The inputs of [`ssd`] and [`ssd_backward`].
#[derive(Clone, Copy)]
pub struct SsdArgs<'a> {
    /// Input, (b, l, h, p).
    pub x: &'a Tensor,
    /// Raw time step, (b, l, h), before `dt_bias` and softplus.
    pub dt: &'a Tensor,
    /// Scalar decay rate per head, (h) (negative: `-exp(A_log)`).
    pub a: &'a Tensor,
    /// Input projection of the state, (b, l, g, n).
    pub b: &'a Tensor,
    /// Output projection of the state, (b, l, g, n).
    pub c: &'a Tensor,
    /// Skip connection, (h) or (h, p).
    pub d: Option<&'a Tensor>,
    /// Added to `dt` before the softplus, (h).
    pub dt_bias: Option<&'a Tensor>,
    /// Whether `dt' = softplus(dt + dt_bias)` (else `dt + dt_bias`).
    pub dt_softplus: bool,
    /// State before the first token, (b, h, p, n).
    pub initial_state: Option<&'a Tensor>,
    /// Document id per token, (b, l), u32 or i64: the state restarts wherever it changes.
    pub seq_idx: Option<&'a Tensor>,
    /// Tokens per chunk of the chunked algorithm (>= 1; the results do not depend on it beyond
    /// rounding).
    pub chunk_size: usize,
}

/// The sizes of an SSD problem, as checked by [`ssd_dims`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SsdDims {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub l: usize,
    /// Heads.
    pub h: usize,
    /// Head dim.
    pub p: usize,
    /// Groups of B and C (divides `h`).
    pub g: usize,
    /// State size.
    pub n: usize,
}

/// What [`ssd`] keeps for [`ssd_backward`]: the state entering every chunk.
#[derive(Debug, Clone)]
pub struct SsdSaved {
    /// (b, n_chunks, h, p, n) in the compute dtype (f64 for f64 input, f32 otherwise): the state
    /// before the first token of each chunk.
    pub chunk_states: Tensor,
    /// The chunk size these states were taken with.
    pub chunk_size: usize,
}

/// The outputs of [`ssd`].
#[derive(Debug, Clone)]
pub struct SsdOutput {
    /// Output, (b, l, h, p), the dtype of `x`.
    pub y: Tensor,
    /// State after the last token, (b, h, p, n), the dtype of `x`.
    pub final_state: Tensor,
    /// The chunk states for the backward.
    pub saved: SsdSaved,
}

/// The gradients computed by [`ssd_backward`], each with its input's shape and dtype.
#[derive(Debug, Clone)]
pub struct SsdGrads {
    /// d/dx, (b, l, h, p).
    pub x: Tensor,
    /// d/d(raw dt), (b, l, h).
    pub dt: Tensor,
    /// d/dA, (h).
    pub a: Tensor,
    /// d/dB, (b, l, g, n).
    pub b: Tensor,
    /// d/dC, (b, l, g, n).
    pub c: Tensor,
    /// d/dD, the shape of `d`, when `d` was given.
    pub d: Option<Tensor>,
    /// d/d(dt_bias), (h), when `dt_bias` was given.
    pub dt_bias: Option<Tensor>,
    /// d/d(initial_state), (b, h, p, n), when an initial state was given.
    pub initial_state: Option<Tensor>,
}

/// The inputs of [`ssd_state_update`]: one decoding step.
#[derive(Clone, Copy)]
pub struct SsdStepArgs<'a> {
    /// Input, (b, h, p).
    pub x: &'a Tensor,
    /// Raw time step, (b, h).
    pub dt: &'a Tensor,
    /// Decay rate per head, (h).
    pub a: &'a Tensor,
    /// (b, g, n).
    pub b: &'a Tensor,
    /// (b, g, n).
    pub c: &'a Tensor,
    /// Skip, (h) or (h, p).
    pub d: Option<&'a Tensor>,
    /// (h).
    pub dt_bias: Option<&'a Tensor>,
    /// Whether `dt' = softplus(dt + dt_bias)`.
    pub dt_softplus: bool,
    /// The state before this token, (b, h, p, n).
    pub state: &'a Tensor,
}

fn want(op: &'static str, arg: &'static str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::invalid(op, arg, format!("expected shape {dims:?}, got {:?}", t.dims())));
    }
    Ok(())
}

fn same_kind(op: &'static str, arg: &'static str, x: &Tensor, t: &Tensor) -> Result<()> {
    if t.dtype() != x.dtype() {
        return Err(Error::invalid(op, arg, format!("dtype {} differs from x's {}", t.dtype(), x.dtype())));
    }
    if !t.device().same_device(x.device()) {
        return Err(Error::DeviceMismatch { op, lhs: x.device().to_string(), rhs: t.device().to_string() });
    }
    Ok(())
}

fn check_float_x(op: &'static str, x: &Tensor) -> Result<()> {
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: x.dtype(),
            hint: "; expected f32, f64, bf16 or f16".into(),
        });
    }
    if !matches!(x.device(), Device::Cpu) {
        return Err(Error::Unsupported { op, msg: format!("no CUDA kernel yet (x is on {})", x.device()) });
    }
    Ok(())
}

fn check_finite(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    let v = t.to_vec_f64()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(op, arg, format!("element {i} is {} (must be finite)", v[i])));
    }
    Ok(())
}

/// Checks every argument of [`SsdArgs`] (shapes, dtypes, devices, `h % g == 0`, `chunk_size >= 1`,
/// a finite `dt`) and returns the sizes.
pub fn ssd_dims(args: &SsdArgs) -> Result<SsdDims> {
    const OP: &str = "ssd";
    let x = args.x;
    check_float_x(OP, x)?;
    if x.rank() != 4 {
        return Err(Error::invalid(OP, "x", format!("expected (b, l, h, p), got {:?}", x.dims())));
    }
    let [b, l, h, p] = [x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]];
    if args.b.rank() != 4 {
        return Err(Error::invalid(OP, "b", format!("expected (b, l, g, n), got {:?}", args.b.dims())));
    }
    let (g, n) = (args.b.dims()[2], args.b.dims()[3]);
    if g == 0 || !h.is_multiple_of(g) {
        return Err(Error::invalid(OP, "b", format!("groups g = {g} must divide the heads h = {h}")));
    }
    for (name, t) in [("dt", args.dt), ("a", args.a), ("b", args.b), ("c", args.c)] {
        same_kind(OP, name, x, t)?;
    }
    want(OP, "dt", args.dt, &[b, l, h])?;
    want(OP, "a", args.a, &[h])?;
    want(OP, "b", args.b, &[b, l, g, n])?;
    want(OP, "c", args.c, &[b, l, g, n])?;
    if let Some(d) = args.d {
        same_kind(OP, "d", x, d)?;
        if d.dims() != [h] && d.dims() != [h, p] {
            return Err(Error::invalid(OP, "d", format!("expected ({h}) or ({h}, {p}), got {:?}", d.dims())));
        }
    }
    if let Some(t) = args.dt_bias {
        same_kind(OP, "dt_bias", x, t)?;
        want(OP, "dt_bias", t, &[h])?;
    }
    if let Some(t) = args.initial_state {
        same_kind(OP, "initial_state", x, t)?;
        want(OP, "initial_state", t, &[b, h, p, n])?;
    }
    if let Some(s) = args.seq_idx {
        if !matches!(s.dtype(), DType::U32 | DType::I64) {
            return Err(Error::invalid(OP, "seq_idx", format!("must be u32 or i64, got {}", s.dtype())));
        }
        want(OP, "seq_idx", s, &[b, l])?;
    }
    if args.chunk_size == 0 {
        return Err(Error::invalid(OP, "chunk_size", "must be at least 1"));
    }
    check_finite(OP, "dt", args.dt)?;
    Ok(SsdDims { b, l, h, p, g, n })
}

/// Chunked SSD forward: `y (b, l, h, p)`, `final_state (b, h, p, n)` and the chunk states kept
/// for [`ssd_backward`]. See the module docs for the semantics.
pub fn ssd(args: &SsdArgs) -> Result<SsdOutput> {
    let dims = ssd_dims(args)?;
    crate::cpu::ssd::forward(args, dims)
}

/// Gradients of `sum(y * grad_y) + sum(final_state * grad_final_state)` with respect to every
/// input of [`ssd`], from the `saved` chunk states of the forward on the same `args`.
/// `grad_y` is (b, l, h, p), `grad_final_state` (b, h, p, n). Deterministic (bit-identical
/// whatever the thread count); works chunk by chunk, recomputing inside each chunk.
pub fn ssd_backward(
    args: &SsdArgs,
    saved: &SsdSaved,
    grad_y: &Tensor,
    grad_final_state: Option<&Tensor>,
) -> Result<SsdGrads> {
    const OP: &str = "ssd_backward";
    let dims = ssd_dims(args)?;
    let SsdDims { b, l, h, p, n, .. } = dims;
    same_kind(OP, "grad_y", args.x, grad_y)?;
    want(OP, "grad_y", grad_y, &[b, l, h, p])?;
    if let Some(t) = grad_final_state {
        same_kind(OP, "grad_final_state", args.x, t)?;
        want(OP, "grad_final_state", t, &[b, h, p, n])?;
    }
    let nc = l.div_ceil(saved.chunk_size.max(1));
    if saved.chunk_size == 0 || saved.chunk_states.dims() != [b, nc, h, p, n] {
        return Err(Error::invalid(
            OP,
            "saved",
            format!(
                "chunk states {:?} (chunk size {}) do not match these inputs (expected {:?})",
                saved.chunk_states.dims(),
                saved.chunk_size,
                [b, nc, h, p, n]
            ),
        ));
    }
    crate::cpu::ssd::backward(args, dims, saved, grad_y, grad_final_state)
}

/// One decoding step: x (b, h, p), dt (b, h), b/c (b, g, n), state (b, h, p, n) -> (y (b, h, p),
/// new state (b, h, p, n)), the recurrence of [`ssd`] for one token. O(1) in the tokens before.
pub fn ssd_state_update(args: &SsdStepArgs) -> Result<(Tensor, Tensor)> {
    const OP: &str = "ssd_state_update";
    let x = args.x;
    check_float_x(OP, x)?;
    if x.rank() != 3 {
        return Err(Error::invalid(OP, "x", format!("expected (b, h, p), got {:?}", x.dims())));
    }
    let [b, h, p] = [x.dims()[0], x.dims()[1], x.dims()[2]];
    if args.b.rank() != 3 {
        return Err(Error::invalid(OP, "b", format!("expected (b, g, n), got {:?}", args.b.dims())));
    }
    let (g, n) = (args.b.dims()[1], args.b.dims()[2]);
    if g == 0 || !h.is_multiple_of(g) {
        return Err(Error::invalid(OP, "b", format!("groups g = {g} must divide the heads h = {h}")));
    }
    for (name, t) in [("dt", args.dt), ("a", args.a), ("b", args.b), ("c", args.c), ("state", args.state)] {
        same_kind(OP, name, x, t)?;
    }
    want(OP, "dt", args.dt, &[b, h])?;
    want(OP, "a", args.a, &[h])?;
    want(OP, "b", args.b, &[b, g, n])?;
    want(OP, "c", args.c, &[b, g, n])?;
    want(OP, "state", args.state, &[b, h, p, n])?;
    if let Some(d) = args.d {
        same_kind(OP, "d", x, d)?;
        if d.dims() != [h] && d.dims() != [h, p] {
            return Err(Error::invalid(OP, "d", format!("expected ({h}) or ({h}, {p}), got {:?}", d.dims())));
        }
    }
    if let Some(t) = args.dt_bias {
        same_kind(OP, "dt_bias", x, t)?;
        want(OP, "dt_bias", t, &[h])?;
    }
    check_finite(OP, "dt", args.dt)?;
    crate::cpu::ssd::state_update(args, SsdDims { b, l: 1, h, p, g, n })
}

/// Rows per block of the lower-triangular (Q × Q) products of the chunked algorithm: blocks
/// strictly above the diagonal are skipped.
pub const SSD_TRI_BLOCK: usize = 64;

/// Entries of a `q × q` product that the block-lower-triangular GEMMs compute (blocks of
/// [`SSD_TRI_BLOCK`] rows, each up to the end of its diagonal block).
pub fn ssd_tri_entries(q: usize) -> usize {
    (0..q)
        .step_by(SSD_TRI_BLOCK)
        .map(|r0| ((r0 + SSD_TRI_BLOCK).min(q) - r0) * (r0 + SSD_TRI_BLOCK).min(q))
        .sum()
}

/// Floating-point operations (an FMA counts 2) that the chunked SSD forward's GEMMs execute,
/// what the benchmarks divide by. Per chunk of `q` tokens: per group `C Bᵀ` (2·T·n, T =
/// [`ssd_tri_entries`]`(q)`); per head the intra-chunk `M X` (2·T·p), the chunk state `Xᵀ diag(w) B`
/// (2qpn) and the inter-chunk output `C Sᵀ` (2qpn).
pub fn ssd_forward_flops(b: usize, l: usize, h: usize, p: usize, g: usize, n: usize, chunk: usize) -> f64 {
    let chunk = chunk.max(1);
    let (mut f, mut t0) = (0.0, 0);
    while t0 < l {
        let q = chunk.min(l - t0);
        let tri = ssd_tri_entries(q) as f64;
        f += 2.0 * tri * (n * g) as f64 + h as f64 * (2.0 * tri * p as f64 + 4.0 * (q * p * n) as f64);
        t0 += chunk;
    }
    f * b as f64
}

/// Floating-point operations that the chunked SSD backward's GEMMs execute. Per chunk: per group
/// `C Bᵀ`, `dG B` and `dGᵀ C` (6·T·n); per head `dY Xᵀ` and `Mᵀ dY` (4·T·p) and five q×p×n
/// products (10qpn: the chunk-state gradient, `C Sᵀ`, `B dSeᵀ`, the dB and dC updates).
pub fn ssd_backward_flops(b: usize, l: usize, h: usize, p: usize, g: usize, n: usize, chunk: usize) -> f64 {
    let chunk = chunk.max(1);
    let (mut f, mut t0) = (0.0, 0);
    while t0 < l {
        let q = chunk.min(l - t0);
        let tri = ssd_tri_entries(q) as f64;
        f += 6.0 * tri * (n * g) as f64 + h as f64 * (4.0 * tri * p as f64 + 10.0 * (q * p * n) as f64);
        t0 += chunk;
    }
    f * b as f64
}
