//! Reference selective scan (see [`crate::ops::selective_scan`]): mamba_ssm's
//! `selective_scan_ref` as plain f64 loops over logical indices, keeping the whole state history,
//! and its backward written out by hand from the recurrence. Returns contiguous **F64** tensors.
//! Arguments are not validated beyond what indexing needs: call them with arguments
//! [`crate::ops`] accepts.

use moeba_tensor::{Device, Result, Tensor};

use super::conv1d::segment_starts;
use crate::ops::{SelectiveScanArgs, SelectiveScanGrads};

fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Everything the reference reads, as f64 vectors in row-major logical order.
struct Inputs {
    bsz: usize,
    d: usize,
    l: usize,
    n: usize,
    g: usize,
    u: Vec<f64>,
    delta: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    dd: Option<Vec<f64>>,
    z: Option<Vec<f64>>,
    bias: Option<Vec<f64>>,
    h0: Option<Vec<f64>>,
    /// `reset[b][t]`: the state restarts at step t (a new document, t > 0).
    reset: Vec<Vec<bool>>,
}

impl Inputs {
    fn new(args: &SelectiveScanArgs) -> Result<Inputs> {
        let (bsz, d, l) = (args.u.dims()[0], args.u.dims()[1], args.u.dims()[2]);
        let (n, g) = (args.a.dims()[1], args.b.dims()[1]);
        let opt = |t: Option<&Tensor>| t.map(|t| t.to_vec_f64()).transpose();
        let starts = segment_starts(args.seq_idx, bsz, l)?;
        let reset = starts.iter().map(|s| (0..l).map(|t| t > 0 && s[t] == t).collect()).collect();
        Ok(Inputs {
            bsz,
            d,
            l,
            n,
            g,
            u: args.u.to_vec_f64()?,
            delta: args.delta.to_vec_f64()?,
            a: args.a.to_vec_f64()?,
            b: args.b.to_vec_f64()?,
            c: args.c.to_vec_f64()?,
            dd: opt(args.d)?,
            z: opt(args.z)?,
            bias: opt(args.delta_bias)?,
            h0: opt(args.initial_state)?,
            reset,
        })
    }

    /// Index of `(b, c, t)` in a `(b, d, l)` tensor.
    fn bdl(&self, b: usize, c: usize, t: usize) -> usize {
        (b * self.d + c) * self.l + t
    }

    /// Index of `B/C[b, group of c, n, t]`.
    fn bc(&self, b: usize, c: usize, n: usize, t: usize) -> usize {
        let grp = c / (self.d / self.g);
        ((b * self.g + grp) * self.n + n) * self.l + t
    }

    /// `(raw delta + bias, dt)` at `(b, c, t)`.
    fn dt(&self, args: &SelectiveScanArgs, b: usize, c: usize, t: usize) -> (f64, f64) {
        let x = self.delta[self.bdl(b, c, t)] + self.bias.as_ref().map_or(0.0, |v| v[c]);
        (x, if args.delta_softplus { softplus(x) } else { x })
    }

    /// The state history `h[b][c][t][n]` (after step t) and `y` before the gate.
    fn forward(&self, args: &SelectiveScanArgs) -> (Vec<f64>, Vec<f64>) {
        let (bsz, d, l, n) = (self.bsz, self.d, self.l, self.n);
        let mut hist = vec![0.0; bsz * d * l * n];
        let mut y = vec![0.0; bsz * d * l];
        for b in 0..bsz {
            for c in 0..d {
                let mut h: Vec<f64> = match &self.h0 {
                    Some(h0) => h0[(b * d + c) * n..(b * d + c + 1) * n].to_vec(),
                    None => vec![0.0; n],
                };
                for t in 0..l {
                    if self.reset[b][t] {
                        h.iter_mut().for_each(|v| *v = 0.0);
                    }
                    let (_, dt) = self.dt(args, b, c, t);
                    let u = self.u[self.bdl(b, c, t)];
                    let mut s = 0.0;
                    for i in 0..n {
                        h[i] = (dt * self.a[c * n + i]).exp() * h[i] + dt * self.b[self.bc(b, c, i, t)] * u;
                        s += h[i] * self.c[self.bc(b, c, i, t)];
                    }
                    y[self.bdl(b, c, t)] = s + self.dd.as_ref().map_or(0.0, |dv| dv[c]) * u;
                    hist[((b * d + c) * l + t) * n..((b * d + c) * l + t + 1) * n].copy_from_slice(&h);
                }
            }
        }
        (hist, y)
    }
}

/// Reference [`crate::ops::selective_scan`]: `(out (b, d, l), last_state (b, d, n))`.
pub fn selective_scan(args: &SelectiveScanArgs) -> Result<(Tensor, Tensor)> {
    let x = Inputs::new(args)?;
    let (bsz, d, l, n) = (x.bsz, x.d, x.l, x.n);
    let (hist, mut y) = x.forward(args);
    if let Some(z) = &x.z {
        y.iter_mut().zip(z).for_each(|(y, &z)| *y *= z * sigmoid(z));
    }
    let mut last = vec![0.0; bsz * d * n];
    for bc in 0..bsz * d {
        if l > 0 {
            last[bc * n..(bc + 1) * n].copy_from_slice(&hist[(bc * l + l - 1) * n..(bc * l + l) * n]);
        } else if let Some(h0) = &x.h0 {
            last[bc * n..(bc + 1) * n].copy_from_slice(&h0[bc * n..(bc + 1) * n]);
        }
    }
    Ok((Tensor::from_vec(y, (bsz, d, l), &Device::Cpu)?, Tensor::from_vec(last, (bsz, d, n), &Device::Cpu)?))
}

/// Reference [`crate::ops::selective_scan_backward`] (F64 gradients).
pub fn selective_scan_backward(
    args: &SelectiveScanArgs,
    grad_out: &Tensor,
    grad_last_state: Option<&Tensor>,
) -> Result<SelectiveScanGrads> {
    let x = Inputs::new(args)?;
    let (bsz, d, l, n, g) = (x.bsz, x.d, x.l, x.n, x.g);
    let (hist, y) = x.forward(args);
    let go = grad_out.to_vec_f64()?;
    let gls = grad_last_state.map(|t| t.to_vec_f64()).transpose()?;
    let (mut du, mut ddelta, mut dz) =
        (vec![0.0; bsz * d * l], vec![0.0; bsz * d * l], vec![0.0; bsz * d * l]);
    let (mut da, mut db, mut dc) = (vec![0.0; d * n], vec![0.0; bsz * g * n * l], vec![0.0; bsz * g * n * l]);
    let (mut dd, mut dbias, mut dh0) = (vec![0.0; d], vec![0.0; d], vec![0.0; bsz * d * n]);
    for b in 0..bsz {
        for c in 0..d {
            // dh holds dL/dh_t while walking t downwards.
            let mut dh: Vec<f64> = match &gls {
                Some(v) => v[(b * d + c) * n..(b * d + c + 1) * n].to_vec(),
                None => vec![0.0; n],
            };
            for t in (0..l).rev() {
                let i = x.bdl(b, c, t);
                let u = x.u[i];
                let (raw, dt) = x.dt(args, b, c, t);
                let dy = match &x.z {
                    Some(z) => {
                        let s = sigmoid(z[i]);
                        dz[i] = go[i] * y[i] * s * (1.0 + z[i] * (1.0 - s));
                        go[i] * z[i] * s
                    }
                    None => go[i],
                };
                if let Some(dv) = &x.dd {
                    dd[c] += dy * u;
                    du[i] += dy * dv[c];
                }
                let mut ddt = 0.0;
                for k in 0..n {
                    let h_t = hist[(i) * n + k];
                    let h_prev = if x.reset[b][t] {
                        0.0
                    } else if t > 0 {
                        hist[(i - 1) * n + k]
                    } else {
                        x.h0.as_ref().map_or(0.0, |h0| h0[(b * d + c) * n + k])
                    };
                    let (bv, cv) = (x.b[x.bc(b, c, k, t)], x.c[x.bc(b, c, k, t)]);
                    dh[k] += dy * cv;
                    dc[x.bc(b, c, k, t)] += dy * h_t;
                    let decay = (dt * x.a[c * n + k]).exp();
                    // h_t = decay · h_prev + dt · B · u
                    ddt += dh[k] * (decay * x.a[c * n + k] * h_prev + bv * u);
                    da[c * n + k] += dh[k] * decay * dt * h_prev;
                    db[x.bc(b, c, k, t)] += dh[k] * dt * u;
                    du[i] += dh[k] * dt * bv;
                    dh[k] = if x.reset[b][t] { 0.0 } else { dh[k] * decay };
                }
                let draw = if args.delta_softplus && raw <= 20.0 { ddt * sigmoid(raw) } else { ddt };
                ddelta[i] = draw;
                dbias[c] += draw;
            }
            dh0[(b * d + c) * n..(b * d + c + 1) * n].copy_from_slice(&dh);
        }
    }
    let cpu = &Device::Cpu;
    Ok(SelectiveScanGrads {
        u: Tensor::from_vec(du, (bsz, d, l), cpu)?,
        delta: Tensor::from_vec(ddelta, (bsz, d, l), cpu)?,
        a: Tensor::from_vec(da, (d, n), cpu)?,
        b: Tensor::from_vec(db, (bsz, g, n, l), cpu)?,
        c: Tensor::from_vec(dc, (bsz, g, n, l), cpu)?,
        d: args.d.map(|_| Tensor::from_vec(dd, d, cpu)).transpose()?,
        z: args.z.map(|_| Tensor::from_vec(dz, (bsz, d, l), cpu)).transpose()?,
        delta_bias: args.delta_bias.map(|_| Tensor::from_vec(dbias, d, cpu)).transpose()?,
        initial_state: args.initial_state.map(|_| Tensor::from_vec(dh0, (bsz, d, n), cpu)).transpose()?,
    })
}
