//! The Mamba-2 SSD scan on [`Var`](crate::Var)s: one tape node whose backward is
//! [`ops::ssd_backward`] (chunk-level, from the chunk states kept by the forward).

use moeba_kernels::ops::{self, SsdArgs, SsdSaved};
use moeba_tensor::{Result, Tensor};

use crate::{CustomOp, Var};

/// The inputs of [`ssd`]; shapes and semantics as [`ops::SsdArgs`].
#[derive(Clone, Copy)]
pub struct SsdInputs<'a> {
    /// (b, l, h, p).
    pub x: &'a Var,
    /// Raw time step, (b, l, h).
    pub dt: &'a Var,
    /// Decay rate per head, (h) (negative).
    pub a: &'a Var,
    /// (b, l, g, n).
    pub b: &'a Var,
    /// (b, l, g, n).
    pub c: &'a Var,
    /// Skip, (h) or (h, p).
    pub d: Option<&'a Var>,
    /// (h).
    pub dt_bias: Option<&'a Var>,
    /// (b, h, p, n).
    pub initial_state: Option<&'a Var>,
    /// Whether `dt' = softplus(dt + dt_bias)`.
    pub dt_softplus: bool,
    /// Document id per token, (b, l) (no gradient).
    pub seq_idx: Option<&'a Tensor>,
    /// Tokens per chunk.
    pub chunk_size: usize,
}

/// The tape node: which optional inputs were given, and the chunk states.
struct SsdOp {
    saved: SsdSaved,
    has_d: bool,
    has_bias: bool,
    has_init: bool,
    dt_softplus: bool,
    seq_idx: Option<Tensor>,
    chunk_size: usize,
}

impl CustomOp for SsdOp {
    fn name(&self) -> &'static str {
        "ssd"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut it = inputs[5..].iter();
        let d = if self.has_d { it.next() } else { None };
        let dt_bias = if self.has_bias { it.next() } else { None };
        let initial_state = if self.has_init { it.next() } else { None };
        let args = SsdArgs {
            x: &inputs[0],
            dt: &inputs[1],
            a: &inputs[2],
            b: &inputs[3],
            c: &inputs[4],
            d,
            dt_bias,
            dt_softplus: self.dt_softplus,
            initial_state,
            seq_idx: self.seq_idx.as_ref(),
            chunk_size: self.chunk_size,
        };
        let gy = match &grad_outputs[0] {
            Some(g) => g.clone(),
            None => inputs[0].zeros_like()?,
        };
        let g = ops::ssd_backward(&args, &self.saved, &gy, grad_outputs.get(1).and_then(|g| g.as_ref()))?;
        let mut out = vec![Some(g.x), Some(g.dt), Some(g.a), Some(g.b), Some(g.c)];
        if self.has_d {
            out.push(g.d);
        }
        if self.has_bias {
            out.push(g.dt_bias);
        }
        if self.has_init {
            out.push(g.initial_state);
        }
        Ok(out)
    }
}

/// The chunked SSD scan ([`ops::ssd`]) recorded as one node: returns `(y (b, l, h, p),
/// final_state (b, h, p, n))`; either or both may carry a gradient.
pub fn ssd(inputs: &SsdInputs) -> Result<(Var, Var)> {
    let i = inputs;
    let args = SsdArgs {
        x: i.x.tensor(),
        dt: i.dt.tensor(),
        a: i.a.tensor(),
        b: i.b.tensor(),
        c: i.c.tensor(),
        d: i.d.map(|v| v.tensor()),
        dt_bias: i.dt_bias.map(|v| v.tensor()),
        dt_softplus: i.dt_softplus,
        initial_state: i.initial_state.map(|v| v.tensor()),
        seq_idx: i.seq_idx,
        chunk_size: i.chunk_size,
    };
    let out = ops::ssd(&args)?;
    let mut vars: Vec<&Var> = vec![i.x, i.dt, i.a, i.b, i.c];
    vars.extend(i.d);
    vars.extend(i.dt_bias);
    vars.extend(i.initial_state);
    let op = SsdOp {
        saved: out.saved,
        has_d: i.d.is_some(),
        has_bias: i.dt_bias.is_some(),
        has_init: i.initial_state.is_some(),
        dt_softplus: i.dt_softplus,
        seq_idx: i.seq_idx.cloned(),
        chunk_size: i.chunk_size,
    };
    let mut res = Var::apply_custom(op, &vars, vec![out.y, out.final_state]);
    let fin = res.pop().expect("two outputs");
    let y = res.pop().expect("two outputs");
    Ok((y, fin))
}
