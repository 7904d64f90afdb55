//! The Mamba-1 selective scan on [`Var`](crate::Var)s: one tape node whose backward is
//! [`ops::selective_scan_backward`] (recomputing each chunk from the states the forward saved).

use moeba_kernels::ops::{self, SelectiveScanArgs, SelectiveScanOutput};
use moeba_tensor::{Result, Tensor};

use crate::{CustomOp, Var};

/// The inputs of [`selective_scan`]; shapes and semantics as [`ops::SelectiveScanArgs`]:
/// `u`, `delta`, `z` `(b, d, l)`; `a (d, n)`; `b`, `c` `(b, g, n, l)`; `d`, `delta_bias` `(d)`;
/// `initial_state (b, d, n)`; `seq_idx (b, l)` document ids (no gradient).
#[derive(Clone, Copy)]
pub struct ScanInputs<'a> {
    /// `(b, d, l)`.
    pub u: &'a Var,
    /// `(b, d, l)`: raw time step (before `delta_bias` and softplus).
    pub delta: &'a Var,
    /// `(d, n)`.
    pub a: &'a Var,
    /// `(b, g, n, l)`.
    pub b: &'a Var,
    /// `(b, g, n, l)`.
    pub c: &'a Var,
    /// `(d)`: skip.
    pub d: Option<&'a Var>,
    /// `(b, d, l)`: gate, `out = y · silu(z)`.
    pub z: Option<&'a Var>,
    /// `(d)`.
    pub delta_bias: Option<&'a Var>,
    /// Whether `dt = softplus(delta + delta_bias)`.
    pub delta_softplus: bool,
    /// `(b, d, n)`.
    pub initial_state: Option<&'a Var>,
    /// `(b, l)` U32/I64 document ids.
    pub seq_idx: Option<&'a Tensor>,
}

/// The tape node: which optionals were given, the flags, and the forward's chunk states.
struct ScanOp {
    saved: SelectiveScanOutput,
    has: [bool; 4],
    delta_softplus: bool,
    seq_idx: Option<Tensor>,
}

impl CustomOp for ScanOp {
    fn name(&self) -> &'static str {
        "selective_scan"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _outputs: &[Tensor],
        grad_outputs: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut it = inputs[5..].iter();
        let mut next = |present: bool| if present { it.next() } else { None };
        let (d, z, delta_bias, initial_state) =
            (next(self.has[0]), next(self.has[1]), next(self.has[2]), next(self.has[3]));
        let args = SelectiveScanArgs {
            u: &inputs[0],
            delta: &inputs[1],
            a: &inputs[2],
            b: &inputs[3],
            c: &inputs[4],
            d,
            z,
            delta_bias,
            delta_softplus: self.delta_softplus,
            initial_state,
            seq_idx: self.seq_idx.as_ref(),
        };
        let go = match &grad_outputs[0] {
            Some(g) => g.clone(),
            None => inputs[0].zeros_like()?,
        };
        let gls = grad_outputs.get(1).and_then(|g| g.as_ref());
        let g = ops::selective_scan_backward(&args, &self.saved, &go, gls)?;
        let mut out = vec![Some(g.u), Some(g.delta), Some(g.a), Some(g.b), Some(g.c)];
        for (present, grad) in self.has.iter().zip([g.d, g.z, g.delta_bias, g.initial_state]) {
            if *present {
                out.push(grad);
            }
        }
        Ok(out)
    }
}

/// The selective scan (see [`ops::selective_scan`]): returns `(out (b, d, l), last_state
/// (b, d, n))`, recorded as one node with the fused, deterministic backward; either output may
/// carry a gradient.
pub fn selective_scan(inputs: &ScanInputs) -> Result<(Var, Var)> {
    let args = SelectiveScanArgs {
        u: inputs.u.tensor(),
        delta: inputs.delta.tensor(),
        a: inputs.a.tensor(),
        b: inputs.b.tensor(),
        c: inputs.c.tensor(),
        d: inputs.d.map(|v| v.tensor()),
        z: inputs.z.map(|v| v.tensor()),
        delta_bias: inputs.delta_bias.map(|v| v.tensor()),
        delta_softplus: inputs.delta_softplus,
        initial_state: inputs.initial_state.map(|v| v.tensor()),
        seq_idx: inputs.seq_idx,
    };
    let saved = ops::selective_scan(&args)?;
    let outputs = vec![saved.out.clone(), saved.last_state.clone()];
    let mut vars = vec![inputs.u, inputs.delta, inputs.a, inputs.b, inputs.c];
    let optionals = [inputs.d, inputs.z, inputs.delta_bias, inputs.initial_state];
    vars.extend(optionals.iter().flatten().copied());
    let op = ScanOp {
        saved,
        has: optionals.map(|o| o.is_some()),
        delta_softplus: inputs.delta_softplus,
        seq_idx: inputs.seq_idx.cloned(),
    };
    let mut out = Var::apply_custom(op, &vars, outputs);
    let last = out.pop().expect("two outputs");
    let y = out.pop().expect("two outputs");
    Ok((y, last))
}
