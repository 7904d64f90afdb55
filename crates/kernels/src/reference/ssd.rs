//! Plain sequential SSD recurrence (Mamba-2), forward and backward (backpropagation through the
//! token loop), in f64. The definition is in [`crate::ops::ssd`]'s module docs.

use moeba_tensor::{DType, Device, Result, Tensor};

use crate::ops::{ssd_dims, SsdArgs, SsdDims, SsdGrads};

/// The inputs as f64 vectors (row-major), with the post-softplus time step and restart flags.
struct Inputs {
    x: Vec<f64>,
    /// dt' (b, l, h)
    dtp: Vec<f64>,
    /// d dt' / d dt (b, l, h)
    dtp_grad: Vec<f64>,
    a: Vec<f64>,
    bm: Vec<f64>,
    cm: Vec<f64>,
    /// D expanded to (h, p), zero when absent.
    d: Vec<f64>,
    init: Vec<f64>,
    /// restart[b, t]: the state is dropped before token t.
    restart: Vec<bool>,
}

fn softplus(v: f64) -> (f64, f64) {
    if v > 20.0 {
        (v, 1.0)
    } else {
        ((1.0 + v.exp()).ln(), 1.0 / (1.0 + (-v).exp()))
    }
}

fn load(args: &SsdArgs, dm: SsdDims) -> Result<Inputs> {
    let SsdDims { b, l, h, p, n, .. } = dm;
    let dt = args.dt.to_vec_f64()?;
    let bias = match args.dt_bias {
        Some(t) => t.to_vec_f64()?,
        None => vec![0.0; h],
    };
    let mut dtp = vec![0.0; dt.len()];
    let mut dtp_grad = vec![1.0; dt.len()];
    for (i, &v) in dt.iter().enumerate() {
        let v = v + bias[i % h.max(1)];
        if args.dt_softplus {
            (dtp[i], dtp_grad[i]) = softplus(v);
        } else {
            dtp[i] = v;
        }
    }
    let d = match args.d {
        Some(t) => {
            let v = t.to_vec_f64()?;
            if t.rank() == 1 {
                (0..h * p).map(|i| v[i / p]).collect()
            } else {
                v
            }
        }
        None => vec![0.0; h * p],
    };
    let init = match args.initial_state {
        Some(t) => t.to_vec_f64()?,
        None => vec![0.0; b * h * p * n],
    };
    let mut restart = vec![false; b * l];
    if let Some(s) = args.seq_idx {
        let s = s.to_vec_f64()?;
        for bi in 0..b {
            for t in 1..l {
                restart[bi * l + t] = s[bi * l + t] != s[bi * l + t - 1];
            }
        }
    }
    Ok(Inputs {
        x: args.x.to_vec_f64()?,
        dtp,
        dtp_grad,
        a: args.a.to_vec_f64()?,
        bm: args.b.to_vec_f64()?,
        cm: args.c.to_vec_f64()?,
        d,
        init,
        restart,
    })
}

/// All states S_t (b, h, l, p, n) of the recurrence (for the backward).
fn states(inp: &Inputs, dm: SsdDims) -> Vec<f64> {
    let SsdDims { b, l, h, p, g, n } = dm;
    let hpg = h / g;
    let mut all = vec![0.0; b * h * l * p * n];
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / hpg;
            let mut s: Vec<f64> = inp.init[(bi * h + hi) * p * n..(bi * h + hi + 1) * p * n].to_vec();
            for t in 0..l {
                let dtp = inp.dtp[(bi * l + t) * h + hi];
                let decay = if inp.restart[bi * l + t] { 0.0 } else { (dtp * inp.a[hi]).exp() };
                for pi in 0..p {
                    let xv = inp.x[((bi * l + t) * h + hi) * p + pi];
                    for ni in 0..n {
                        let bv = inp.bm[((bi * l + t) * g + gi) * n + ni];
                        s[pi * n + ni] = decay * s[pi * n + ni] + dtp * xv * bv;
                    }
                }
                let o = (((bi * h + hi) * l) + t) * p * n;
                all[o..o + p * n].copy_from_slice(&s);
            }
        }
    }
    all
}

/// The recurrence token by token: `(y (b, l, h, p), final_state (b, h, p, n))`, both f64.
/// Holds one state per (batch, head) at a time.
pub fn ssd(args: &SsdArgs) -> Result<(Tensor, Tensor)> {
    let dm = ssd_dims(args)?;
    let SsdDims { b, l, h, p, g, n } = dm;
    let inp = load(args, dm)?;
    let hpg = h / g;
    let mut y = vec![0.0; b * l * h * p];
    let mut fin = inp.init.clone();
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / hpg;
            let s = &mut fin[(bi * h + hi) * p * n..][..p * n];
            for t in 0..l {
                let dtp = inp.dtp[(bi * l + t) * h + hi];
                let decay = if inp.restart[bi * l + t] { 0.0 } else { (dtp * inp.a[hi]).exp() };
                let bc = ((bi * l + t) * g + gi) * n;
                for pi in 0..p {
                    let xi = ((bi * l + t) * h + hi) * p + pi;
                    let mut acc = inp.d[hi * p + pi] * inp.x[xi];
                    for ni in 0..n {
                        let sv = &mut s[pi * n + ni];
                        *sv = decay * *sv + dtp * inp.x[xi] * inp.bm[bc + ni];
                        acc += *sv * inp.cm[bc + ni];
                    }
                    y[xi] = acc;
                }
            }
        }
    }
    Ok((Tensor::from_vec(y, (b, l, h, p), &Device::Cpu)?, Tensor::from_vec(fin, (b, h, p, n), &Device::Cpu)?))
}

/// Gradients of `sum(y * grad_y) + sum(final_state * grad_final_state)` by backpropagation
/// through the token loop (every state kept). All gradients are f64.
pub fn ssd_backward(args: &SsdArgs, grad_y: &Tensor, grad_final_state: Option<&Tensor>) -> Result<SsdGrads> {
    let dm = ssd_dims(args)?;
    let SsdDims { b, l, h, p, g, n } = dm;
    let inp = load(args, dm)?;
    let all = states(&inp, dm);
    let gy = grad_y.to_vec_f64()?;
    let gfin = match grad_final_state {
        Some(t) => t.to_vec_f64()?,
        None => vec![0.0; b * h * p * n],
    };
    let hpg = h / g;
    let mut dx = vec![0.0; b * l * h * p];
    let mut ddtp = vec![0.0; b * l * h];
    let mut da = vec![0.0; h];
    let mut db = vec![0.0; b * l * g * n];
    let mut dc = vec![0.0; b * l * g * n];
    let mut dd = vec![0.0; h * p];
    let mut dinit = vec![0.0; b * h * p * n];
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / hpg;
            let mut ds: Vec<f64> = gfin[(bi * h + hi) * p * n..][..p * n].to_vec();
            for t in (0..l).rev() {
                let s = &all[(((bi * h + hi) * l) + t) * p * n..][..p * n];
                let bc = ((bi * l + t) * g + gi) * n;
                // y_t = S_t C_t + D x_t
                for pi in 0..p {
                    let xi = ((bi * l + t) * h + hi) * p + pi;
                    let gyv = gy[xi];
                    dx[xi] += inp.d[hi * p + pi] * gyv;
                    dd[hi * p + pi] += gyv * inp.x[xi];
                    for ni in 0..n {
                        ds[pi * n + ni] += gyv * inp.cm[bc + ni];
                        dc[bc + ni] += s[pi * n + ni] * gyv;
                    }
                }
                // S_t = decay S_{t-1} + dt' x_t B_tᵀ
                let dtp = inp.dtp[(bi * l + t) * h + hi];
                let keep = !inp.restart[bi * l + t];
                let decay = if keep { (dtp * inp.a[hi]).exp() } else { 0.0 };
                let prev: Vec<f64> = if t == 0 {
                    inp.init[(bi * h + hi) * p * n..][..p * n].to_vec()
                } else {
                    all[(((bi * h + hi) * l) + t - 1) * p * n..][..p * n].to_vec()
                };
                let mut d_decay = 0.0;
                let mut d_dtp = 0.0;
                for pi in 0..p {
                    let xi = ((bi * l + t) * h + hi) * p + pi;
                    let xv = inp.x[xi];
                    for ni in 0..n {
                        let dsv = ds[pi * n + ni];
                        let bv = inp.bm[bc + ni];
                        d_decay += dsv * prev[pi * n + ni];
                        d_dtp += dsv * xv * bv;
                        dx[xi] += dtp * dsv * bv;
                        db[bc + ni] += dtp * dsv * xv;
                    }
                }
                if keep {
                    // decay = exp(dt' A)
                    d_dtp += d_decay * decay * inp.a[hi];
                    da[hi] += d_decay * decay * dtp;
                }
                ddtp[(bi * l + t) * h + hi] += d_dtp;
                for v in ds.iter_mut() {
                    *v *= decay;
                }
            }
            dinit[(bi * h + hi) * p * n..][..p * n].copy_from_slice(&ds);
        }
    }
    let ddt: Vec<f64> = ddtp.iter().zip(&inp.dtp_grad).map(|(a, b)| a * b).collect();
    let mut dbias = vec![0.0; h];
    for (i, v) in ddt.iter().enumerate() {
        dbias[i % h.max(1)] += v;
    }
    let cpu = &Device::Cpu;
    let d = match args.d {
        Some(t) if t.rank() == 1 => Some(Tensor::from_vec(
            (0..h).map(|hi| dd[hi * p..(hi + 1) * p].iter().sum::<f64>()).collect(),
            h,
            cpu,
        )?),
        Some(_) => Some(Tensor::from_vec(dd, (h, p), cpu)?),
        None => None,
    };
    Ok(SsdGrads {
        x: Tensor::from_vec(dx, (b, l, h, p), cpu)?,
        dt: Tensor::from_vec(ddt, (b, l, h), cpu)?,
        a: Tensor::from_vec(da, h, cpu)?,
        b: Tensor::from_vec(db, (b, l, g, n), cpu)?,
        c: Tensor::from_vec(dc, (b, l, g, n), cpu)?,
        d,
        dt_bias: if args.dt_bias.is_some() { Some(Tensor::from_vec(dbias, h, cpu)?) } else { None },
        initial_state: if args.initial_state.is_some() {
            Some(Tensor::from_vec(dinit, (b, h, p, n), cpu)?.to_dtype(DType::F64)?)
        } else {
            None
        },
    })
}
