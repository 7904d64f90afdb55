//! Reference causal depthwise conv1d (see [`crate::ops::causal_conv1d`]): plain f64 loops over
//! logical indices, returning contiguous **F64** tensors. Arguments are not validated beyond
//! what indexing needs: call them with arguments [`crate::ops`] accepts.

use moeba_tensor::{Device, Result, Tensor};

/// The start of the document of each token of each row: `start[b][t]` is the first position
/// `s <= t` such that every token in `s..=t` has the id of token `t` (0 without `seq_idx`).
pub fn segment_starts(seq_idx: Option<&Tensor>, b: usize, l: usize) -> Result<Vec<Vec<usize>>> {
    let ids = match seq_idx {
        Some(s) => s.to_vec_f64()?,
        None => return Ok(vec![vec![0; l]; b]),
    };
    Ok((0..b)
        .map(|bi| {
            let mut start = vec![0; l];
            for t in 1..l {
                start[t] = if ids[bi * l + t] != ids[bi * l + t - 1] { t } else { start[t - 1] };
            }
            start
        })
        .collect())
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn silu_grad(x: f64) -> f64 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

/// The pre-activation `bias + Σ_j w[c, j] x[t - (k-1) + j]` (positions before the document's
/// start read as zero), `(b, d, l)` row-major.
fn pre_activation(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    starts: &[Vec<usize>],
    (b, d, l, k): (usize, usize, usize, usize),
) -> Vec<f64> {
    let mut out = vec![0.0; b * d * l];
    for bi in 0..b {
        for c in 0..d {
            for t in 0..l {
                let mut s = bias.map_or(0.0, |bv| bv[c]);
                for j in 0..k {
                    let src = t as isize - (k as isize - 1) + j as isize;
                    if src >= starts[bi][t] as isize {
                        s += w[c * k + j] * x[(bi * d + c) * l + src as usize];
                    }
                }
                out[(bi * d + c) * l + t] = s;
            }
        }
    }
    out
}

/// Reference [`crate::ops::causal_conv1d`].
pub fn causal_conv1d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu_act: bool,
    seq_idx: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, d, l) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let k = weight.dims()[1];
    let starts = segment_starts(seq_idx, b, l)?;
    let bias_v = bias.map(|t| t.to_vec_f64()).transpose()?;
    let mut out =
        pre_activation(&x.to_vec_f64()?, &weight.to_vec_f64()?, bias_v.as_deref(), &starts, (b, d, l, k));
    if silu_act {
        out.iter_mut().for_each(|v| *v = silu(*v));
    }
    Tensor::from_vec(out, (b, d, l), &Device::Cpu)
}

/// Reference [`crate::ops::causal_conv1d_backward`]: `(grad x, grad weight, grad bias)`.
pub fn causal_conv1d_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu_act: bool,
    seq_idx: Option<&Tensor>,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (b, d, l) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let k = weight.dims()[1];
    let starts = segment_starts(seq_idx, b, l)?;
    let xv = x.to_vec_f64()?;
    let wv = weight.to_vec_f64()?;
    let bias_v = bias.map(|t| t.to_vec_f64()).transpose()?;
    let pre = pre_activation(&xv, &wv, bias_v.as_deref(), &starts, (b, d, l, k));
    let mut g = grad_out.to_vec_f64()?;
    if silu_act {
        g.iter_mut().zip(&pre).for_each(|(g, &p)| *g *= silu_grad(p));
    }
    let mut dx = vec![0.0; b * d * l];
    let mut dw = vec![0.0; d * k];
    let mut db = vec![0.0; d];
    for bi in 0..b {
        for c in 0..d {
            for t in 0..l {
                let gt = g[(bi * d + c) * l + t];
                db[c] += gt;
                for j in 0..k {
                    let src = t as isize - (k as isize - 1) + j as isize;
                    if src >= starts[bi][t] as isize {
                        let s = (bi * d + c) * l + src as usize;
                        dw[c * k + j] += gt * xv[s];
                        dx[s] += gt * wv[c * k + j];
                    }
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(dx, (b, d, l), &Device::Cpu)?,
        Tensor::from_vec(dw, (d, k), &Device::Cpu)?,
        bias.map(|_| Tensor::from_vec(db, d, &Device::Cpu)).transpose()?,
    ))
}

/// Reference [`crate::ops::causal_conv1d_update`]: `(out (b, d), new_state (b, d, k))`.
pub fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu_act: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, d) = (x.dims()[0], x.dims()[1]);
    let k = weight.dims()[1];
    let xv = x.to_vec_f64()?;
    let sv = conv_state.to_vec_f64()?;
    let wv = weight.to_vec_f64()?;
    let bias_v = bias.map(|t| t.to_vec_f64()).transpose()?;
    let mut state = vec![0.0; b * d * k];
    let mut out = vec![0.0; b * d];
    for bi in 0..b {
        for c in 0..d {
            let row = (bi * d + c) * k;
            for j in 0..k - 1 {
                state[row + j] = sv[row + j + 1];
            }
            state[row + k - 1] = xv[bi * d + c];
            let mut s = bias_v.as_ref().map_or(0.0, |bv| bv[c]);
            for j in 0..k {
                s += wv[c * k + j] * state[row + j];
            }
            out[bi * d + c] = if silu_act { silu(s) } else { s };
        }
    }
    Ok((Tensor::from_vec(out, (b, d), &Device::Cpu)?, Tensor::from_vec(state, (b, d, k), &Device::Cpu)?))
}
