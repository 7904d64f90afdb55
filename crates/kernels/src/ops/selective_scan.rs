//! The Mamba-1 selective scan (S6): forward and backward, and the single decoding step.
//!
//! Semantics of mamba_ssm's `selective_scan_ref` with input-dependent B and C in `g` groups:
//!
//! ```text
//! dt[b,c,t] = softplus(delta[b,c,t] + delta_bias[c])        (or without softplus / bias)
//! h[b,c,:]  = initial_state[b,c,:]  (zeros when absent)
//! for t in 0..l:
//!     if seq_idx[b,t] != seq_idx[b,t-1]: h = 0              (a new packed document starts)
//!     h[n] = exp(dt·A[c,n]) · h[n] + dt · B[b,g(c),n,t] · u[b,c,t]
//!     y[b,c,t] = Σ_n h[n] · C[b,g(c),n,t] + D[c] · u[b,c,t]
//! out = y · silu(z)                                         (when z is given)
//! last_state = h after the last step
//! ```
//!
//! with `g(c) = c / (d / g)` (channels split evenly over the groups). `softplus` is torch's
//! (`x` itself above 20).
//!
//! The CPU kernel runs one pass per channel with the `n`-state in registers/L1, vectorised over 8
//! (AVX2) or 16 (AVX-512) channels at once, parallel over (batch, group, block of channels). The
//! forward keeps the state at the start of every chunk of [`SELECTIVE_SCAN_CHUNK`] steps; the
//! backward recomputes each chunk from its saved state and runs it in reverse, so memory stays
//! O(b·d·n·l/chunk). The backward is deterministic: cross-channel sums (dB, dC) and per-channel
//! sums (dA, dD, d delta_bias) are added in an order that depends on the shapes only, never on the
//! thread count.
//!
//! Layout: any strided view is accepted. When `u` is channel-last in memory (stride 1 along `d`,
//! e.g. the transposed view of a `(b, l, d)` activation), `out` (and the gradients of `u`,
//! `delta` and `z`) come back as `(b, d, l)` views of fresh `(b, l, d)`-contiguous tensors, the
//! layout the kernel works in; otherwise they are `(b, d, l)`-contiguous.

use moeba_tensor::{Device, Error, Result, Tensor};

use super::conv1d::check_seq_idx;
use super::{check_float, check_same};

/// Number of steps between the states the forward saves for the backward.
pub const SELECTIVE_SCAN_CHUNK: usize = 128;

/// The inputs of [`selective_scan`]. Shapes: `u`, `delta`, `z` `(b, d, l)`; `a` `(d, n)`;
/// `b`, `c` `(b, g, n, l)` with `g` dividing `d`; `d`, `delta_bias` `(d)`; `initial_state`
/// `(b, d, n)`; `seq_idx` `(b, l)` U32/I64 document ids. Every float input has one dtype.
#[derive(Debug, Clone, Copy)]
pub struct SelectiveScanArgs<'a> {
    /// `(b, d, l)`: the input sequence.
    pub u: &'a Tensor,
    /// `(b, d, l)`: the raw time step, before `delta_bias` and softplus.
    pub delta: &'a Tensor,
    /// `(d, n)`: the (negative, real) state matrix.
    pub a: &'a Tensor,
    /// `(b, g, n, l)`: input-dependent B.
    pub b: &'a Tensor,
    /// `(b, g, n, l)`: input-dependent C.
    pub c: &'a Tensor,
    /// `(d)`: the skip term `D · u`.
    pub d: Option<&'a Tensor>,
    /// `(b, d, l)`: the gate, `out = y · silu(z)`.
    pub z: Option<&'a Tensor>,
    /// `(d)`: added to `delta` before the softplus.
    pub delta_bias: Option<&'a Tensor>,
    /// Whether `dt = softplus(delta + delta_bias)` (else `dt = delta + delta_bias`).
    pub delta_softplus: bool,
    /// `(b, d, n)`: the state before the first step (zeros when `None`).
    pub initial_state: Option<&'a Tensor>,
    /// `(b, l)` U32/I64: document id of every token; the state restarts at zero wherever it
    /// changes along a row. `initial_state` applies to the row's first document.
    pub seq_idx: Option<&'a Tensor>,
}

/// The results of [`selective_scan`].
#[derive(Debug, Clone)]
pub struct SelectiveScanOutput {
    /// `(b, d, l)`: the output (see the module docs for its memory layout).
    pub out: Tensor,
    /// `(b, d, n)`: the state after the last step.
    pub last_state: Tensor,
    /// `(b, ceil(l / SELECTIVE_SCAN_CHUNK), n, d)`: the state at the start of every chunk, in the
    /// compute dtype (f32 for f32/bf16/f16 inputs, f64 for f64), saved for the backward.
    pub chunk_states: Tensor,
}

/// The gradients of [`selective_scan_backward`]: one per input, `None` for absent optionals.
#[derive(Debug, Clone)]
pub struct SelectiveScanGrads {
    /// `(b, d, l)`.
    pub u: Tensor,
    /// `(b, d, l)`: with respect to the raw `delta` (before bias and softplus).
    pub delta: Tensor,
    /// `(d, n)`.
    pub a: Tensor,
    /// `(b, g, n, l)`.
    pub b: Tensor,
    /// `(b, g, n, l)`.
    pub c: Tensor,
    /// `(d)`.
    pub d: Option<Tensor>,
    /// `(b, d, l)`.
    pub z: Option<Tensor>,
    /// `(d)`.
    pub delta_bias: Option<Tensor>,
    /// `(b, d, n)`.
    pub initial_state: Option<Tensor>,
}

/// The sizes of a checked scan: batch, channels, length, state size, groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanDims {
    /// Batch.
    pub batch: usize,
    /// Channels `d`.
    pub dim: usize,
    /// Sequence length `l`.
    pub len: usize,
    /// State size `n`.
    pub state: usize,
    /// Groups `g` of B and C.
    pub groups: usize,
}

/// Validates the arguments of a scan (shapes, dtypes, devices, `g | d`); returns its sizes.
pub fn check_selective_scan_args(op: &'static str, args: &SelectiveScanArgs) -> Result<ScanDims> {
    let u = args.u;
    check_float(op, u)?;
    if u.rank() != 3 {
        return Err(Error::invalid(op, "u", format!("must be (batch, d, length), got {}", u.shape())));
    }
    let (bsz, d, l) = (u.dims()[0], u.dims()[1], u.dims()[2]);
    if args.a.rank() != 2 || args.a.dims()[0] != d {
        return Err(Error::invalid(op, "a", format!("expected (d, n) with d = {d}, got {}", args.a.shape())));
    }
    let n = args.a.dims()[1];
    let same = |name: &'static str, t: &Tensor, want: &[usize]| -> Result<()> {
        check_same(op, u, t)?;
        if t.dims() != want {
            return Err(Error::invalid(
                op,
                name,
                format!(
                    "expected shape {want:?} (u is {}, a is {}), got {}",
                    u.shape(),
                    args.a.shape(),
                    t.shape()
                ),
            ));
        }
        Ok(())
    };
    same("delta", args.delta, &[bsz, d, l])?;
    check_same(op, u, args.a)?;
    if args.b.rank() != 4 {
        return Err(Error::invalid(
            op,
            "b",
            format!("must be (batch, groups, n, length), got {}", args.b.shape()),
        ));
    }
    let g = args.b.dims()[1];
    if g == 0 || d % g != 0 {
        return Err(Error::invalid(
            op,
            "b",
            format!("the number of groups {g} (dim 1 of b {}) must divide d = {d}", args.b.shape()),
        ));
    }
    same("b", args.b, &[bsz, g, n, l])?;
    same("c", args.c, &[bsz, g, n, l])?;
    if let Some(t) = args.d {
        same("d", t, &[d])?;
    }
    if let Some(t) = args.z {
        same("z", t, &[bsz, d, l])?;
    }
    if let Some(t) = args.delta_bias {
        same("delta_bias", t, &[d])?;
    }
    if let Some(t) = args.initial_state {
        same("initial_state", t, &[bsz, d, n])?;
    }
    if let Some(s) = args.seq_idx {
        check_seq_idx(op, s, bsz, l, u.device())?;
    }
    Ok(ScanDims { batch: bsz, dim: d, len: l, state: n, groups: g })
}

#[cfg(feature = "cuda")]
fn no_cuda(op: &'static str) -> Error {
    Error::Unsupported { op, msg: "no CUDA kernel yet; HINT: move the inputs to the CPU".into() }
}

/// The selective scan forward (see the module docs). A non-finite `delta` is an error.
pub fn selective_scan(args: &SelectiveScanArgs) -> Result<SelectiveScanOutput> {
    const OP: &str = "selective_scan";
    let dims = check_selective_scan_args(OP, args)?;
    match args.u.device() {
        Device::Cpu => crate::cpu::selective_scan::selective_scan(args, dims),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(no_cuda(OP)),
    }
}

/// The selective scan backward: the gradient of every input from the cotangents of `out`
/// (`grad_out (b, d, l)`) and, optionally, of the last state (`grad_last_state (b, d, n)`).
/// `saved` is the output of [`selective_scan`] on the same `args`. Deterministic.
pub fn selective_scan_backward(
    args: &SelectiveScanArgs,
    saved: &SelectiveScanOutput,
    grad_out: &Tensor,
    grad_last_state: Option<&Tensor>,
) -> Result<SelectiveScanGrads> {
    const OP: &str = "selective_scan_backward";
    let dims = check_selective_scan_args(OP, args)?;
    let ScanDims { batch, dim, len, state, .. } = dims;
    check_same(OP, args.u, grad_out)?;
    if grad_out.dims() != [batch, dim, len] {
        return Err(Error::invalid(
            OP,
            "grad_out",
            format!("expected ({batch}, {dim}, {len}), got {}", grad_out.shape()),
        ));
    }
    if let Some(g) = grad_last_state {
        check_same(OP, args.u, g)?;
        if g.dims() != [batch, dim, state] {
            return Err(Error::invalid(
                OP,
                "grad_last_state",
                format!("expected ({batch}, {dim}, {state}), got {}", g.shape()),
            ));
        }
    }
    let chunks = len.div_ceil(SELECTIVE_SCAN_CHUNK);
    if saved.chunk_states.dims() != [batch, chunks, state, dim] {
        return Err(Error::invalid(
            OP,
            "saved",
            format!(
                "chunk_states is {} but these arguments need ({batch}, {chunks}, {state}, {dim}); HINT: pass \
                 the output of selective_scan on the same arguments",
                saved.chunk_states.shape()
            ),
        ));
    }
    match args.u.device() {
        Device::Cpu => {
            crate::cpu::selective_scan::selective_scan_backward(args, dims, saved, grad_out, grad_last_state)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(no_cuda(OP)),
    }
}

/// The inputs of [`selective_state_update`]: one decoding step. Shapes: `state (b, d, n)`;
/// `u`, `delta`, `z` `(b, d)`; `a (d, n)`; `b`, `c` `(b, g, n)`; `d`, `delta_bias` `(d)`.
#[derive(Debug, Clone, Copy)]
pub struct SelectiveStateUpdateArgs<'a> {
    /// `(b, d, n)`: the state before the step.
    pub state: &'a Tensor,
    /// `(b, d)`: the input of this step.
    pub u: &'a Tensor,
    /// `(b, d)`: the raw time step.
    pub delta: &'a Tensor,
    /// `(d, n)`.
    pub a: &'a Tensor,
    /// `(b, g, n)`.
    pub b: &'a Tensor,
    /// `(b, g, n)`.
    pub c: &'a Tensor,
    /// `(d)`.
    pub d: Option<&'a Tensor>,
    /// `(b, d)`.
    pub z: Option<&'a Tensor>,
    /// `(d)`.
    pub delta_bias: Option<&'a Tensor>,
    /// Whether `dt = softplus(delta + delta_bias)`.
    pub delta_softplus: bool,
}

/// One decoding step of the scan: returns `(out (b, d), new_state (b, d, n))`, exactly one step
/// of [`selective_scan`] started from `state`.
pub fn selective_state_update(args: &SelectiveStateUpdateArgs) -> Result<(Tensor, Tensor)> {
    const OP: &str = "selective_state_update";
    let two = |name: &'static str, t: &Tensor| -> Result<Tensor> {
        if t.rank() != 2 {
            return Err(Error::invalid(OP, name, format!("must be (batch, d), got {}", t.shape())));
        }
        t.unsqueeze(2)
    };
    let three = |name: &'static str, t: &Tensor| -> Result<Tensor> {
        if t.rank() != 3 {
            return Err(Error::invalid(OP, name, format!("must be (batch, groups, n), got {}", t.shape())));
        }
        t.unsqueeze(3)
    };
    let u = two("u", args.u)?;
    let delta = two("delta", args.delta)?;
    let z = args.z.map(|z| two("z", z)).transpose()?;
    let b = three("b", args.b)?;
    let c = three("c", args.c)?;
    let scan = SelectiveScanArgs {
        u: &u,
        delta: &delta,
        a: args.a,
        b: &b,
        c: &c,
        d: args.d,
        z: z.as_ref(),
        delta_bias: args.delta_bias,
        delta_softplus: args.delta_softplus,
        initial_state: Some(args.state),
        seq_idx: None,
    };
    let out = selective_scan(&scan)?;
    Ok((out.out.squeeze(2)?, out.last_state))
}
