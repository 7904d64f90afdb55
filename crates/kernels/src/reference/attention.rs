//! Plain RoPE and materialised causal attention (see the module docs of `reference`).
//!
//! Every function reads its inputs through `to_vec_f64` (any layout, any float dtype), computes
//! in f64 straight from the definitions of [`crate::ops::rope`] and [`crate::ops::attention`],
//! and returns contiguous **F64** tensors. Attention builds the whole `(lq × lk)` probability matrix
//! of each (batch, head): this is the version the tiled kernels are tested against.

use moeba_tensor::{Device, Result, Tensor};

use crate::ops::{
    check_attention, check_rope, AttentionDims, AttentionOptions, AttentionOutput, RopeOptions, RopeStyle,
};

/// The feature indices `(first, second)` of pair `i` in a head of `dim` features.
pub fn rope_pair(style: RopeStyle, i: usize, dim: usize) -> (usize, usize) {
    match style {
        RopeStyle::RotateHalf => (i, i + dim / 2),
        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
    }
}

fn rope_impl(x: &Tensor, opts: &RopeOptions, inverse: bool) -> Result<Tensor> {
    let op = if inverse { "reference::rope_backward" } else { "reference::rope" };
    check_rope(op, x, opts)?;
    let (l, dim) = (x.dims()[2], x.dims()[3]);
    let xv = x.to_vec_f64()?;
    let mut out = vec![0.0; xv.len()];
    let rows = xv.len().checked_div(dim).unwrap_or(0);
    let inv_freqs = opts.scaling.inv_freqs(dim, opts.theta);
    let amp = opts.scaling.amplitude();
    for r in 0..rows {
        let t = r % l;
        let pos = (opts.position_offset + t) as f64;
        for (i, f) in inv_freqs.iter().enumerate() {
            let (c, s) = ((pos * f).cos() * amp, (pos * f).sin() * amp);
            let s = if inverse { -s } else { s };
            let (a, b) = rope_pair(opts.style, i, dim);
            let (xa, xb) = (xv[r * dim + a], xv[r * dim + b]);
            out[r * dim + a] = xa * c - xb * s;
            out[r * dim + b] = xb * c + xa * s;
        }
    }
    Tensor::from_vec(out, x.dims(), &Device::Cpu)
}

/// Reference [`crate::ops::rope`] (F64 result).
pub fn rope(x: &Tensor, opts: &RopeOptions) -> Result<Tensor> {
    rope_impl(x, opts, false)
}

/// Reference [`crate::ops::rope_backward`]: the inverse rotation (F64 result).
pub fn rope_backward(grad_out: &Tensor, opts: &RopeOptions) -> Result<Tensor> {
    rope_impl(grad_out, opts, true)
}

/// Whether query `i` may see key `j` (bottom-right aligned causal mask, sliding window).
pub fn visible(i: usize, j: usize, lq: usize, lk: usize, opts: &AttentionOptions) -> bool {
    // Absolute position of query i, as a signed number (negative when lq > lk).
    let p = lk as i64 - lq as i64 + i as i64;
    let j = j as i64;
    if opts.causal && j > p {
        return false;
    }
    match opts.window {
        Some(w) => j > p - w as i64,
        None => true,
    }
}

/// Per (batch, q head): the probability matrix `(lq × lk)` and the log-sum-exp per query.
struct Probs {
    p: Vec<f64>,
    lse: Vec<f64>,
}

fn idx(dims: &[usize], a: usize, b: usize, c: usize, d: usize) -> usize {
    ((a * dims[1] + b) * dims[2] + c) * dims[3] + d
}

fn probs(q: &[f64], k: &[f64], d: &AttentionDims, opts: &AttentionOptions, bi: usize, h: usize) -> Probs {
    let (qd, kd) = ([d.b, d.hq, d.lq, d.dk], [d.b, d.hkv, d.lk, d.dk]);
    let g = h / (d.hq / d.hkv);
    let mut p = vec![0.0; d.lq * d.lk];
    let mut lse = vec![f64::NEG_INFINITY; d.lq];
    for i in 0..d.lq {
        let row = &mut p[i * d.lk..(i + 1) * d.lk];
        let mut m = f64::NEG_INFINITY;
        for (j, s) in row.iter_mut().enumerate() {
            *s = if visible(i, j, d.lq, d.lk, opts) {
                let dot: f64 = (0..d.dk).map(|t| q[idx(&qd, bi, h, i, t)] * k[idx(&kd, bi, g, j, t)]).sum();
                opts.scale * dot
            } else {
                f64::NEG_INFINITY
            };
            m = m.max(*s);
        }
        if m == f64::NEG_INFINITY {
            // No visible key: the row's probabilities are 0 and its output is 0.
            row.fill(0.0);
            continue;
        }
        let total: f64 = row.iter().map(|s| (s - m).exp()).sum();
        for s in row.iter_mut() {
            *s = (*s - m).exp() / total;
        }
        lse[i] = m + total.ln();
    }
    Probs { p, lse }
}

/// Reference [`crate::ops::attention`]: scores, mask, softmax and `P V` with the whole score
/// matrix of each head materialised. F64 `out (b, hq, lq, dv)` and `lse (b, hq, lq)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<AttentionOutput> {
    let d = check_attention("reference::attention", q, k, v, opts)?;
    let (qv, kv, vv) = (q.to_vec_f64()?, k.to_vec_f64()?, v.to_vec_f64()?);
    let (od, vd) = ([d.b, d.hq, d.lq, d.dv], [d.b, d.hkv, d.lk, d.dv]);
    let mut out = vec![0.0; d.b * d.hq * d.lq * d.dv];
    let mut lse = vec![0.0; d.b * d.hq * d.lq];
    for bi in 0..d.b {
        for h in 0..d.hq {
            let g = h / (d.hq / d.hkv);
            let pr = probs(&qv, &kv, &d, opts, bi, h);
            for i in 0..d.lq {
                lse[(bi * d.hq + h) * d.lq + i] = pr.lse[i];
                for t in 0..d.dv {
                    out[idx(&od, bi, h, i, t)] =
                        (0..d.lk).map(|j| pr.p[i * d.lk + j] * vv[idx(&vd, bi, g, j, t)]).sum();
                }
            }
        }
    }
    Ok(AttentionOutput {
        out: Tensor::from_vec(out, od.as_slice(), &Device::Cpu)?,
        lse: Tensor::from_vec(lse, [d.b, d.hq, d.lq].as_slice(), &Device::Cpu)?,
    })
}

/// Reference [`crate::ops::attention_backward`] from the materialised probabilities:
/// `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP - rowsum(P ∘ dP))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q`, with dK/dV summed over the q heads that share a kv head. F64 results.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad_out: &Tensor,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = check_attention("reference::attention_backward", q, k, v, opts)?;
    let want = [d.b, d.hq, d.lq, d.dv];
    if grad_out.dims() != want {
        return Err(moeba_tensor::Error::invalid(
            "reference::attention_backward",
            "grad_out",
            format!("shape {} differs from the output's {:?}", grad_out.shape(), want),
        ));
    }
    let (qv, kv, vv, gv) = (q.to_vec_f64()?, k.to_vec_f64()?, v.to_vec_f64()?, grad_out.to_vec_f64()?);
    let (qd, kd, vd) = ([d.b, d.hq, d.lq, d.dk], [d.b, d.hkv, d.lk, d.dk], [d.b, d.hkv, d.lk, d.dv]);
    let od = want;
    let mut dq = vec![0.0; qv.len()];
    let mut dk = vec![0.0; kv.len()];
    let mut dv = vec![0.0; vv.len()];
    for bi in 0..d.b {
        for h in 0..d.hq {
            let g = h / (d.hq / d.hkv);
            let pr = probs(&qv, &kv, &d, opts, bi, h);
            for i in 0..d.lq {
                // dP row and its P-weighted mean.
                let dp: Vec<f64> = (0..d.lk)
                    .map(|j| (0..d.dv).map(|t| gv[idx(&od, bi, h, i, t)] * vv[idx(&vd, bi, g, j, t)]).sum())
                    .collect();
                let mean: f64 = (0..d.lk).map(|j| pr.p[i * d.lk + j] * dp[j]).sum();
                for j in 0..d.lk {
                    let p = pr.p[i * d.lk + j];
                    for t in 0..d.dv {
                        dv[idx(&vd, bi, g, j, t)] += p * gv[idx(&od, bi, h, i, t)];
                    }
                    let ds = p * (dp[j] - mean);
                    for t in 0..d.dk {
                        dq[idx(&qd, bi, h, i, t)] += opts.scale * ds * kv[idx(&kd, bi, g, j, t)];
                        dk[idx(&kd, bi, g, j, t)] += opts.scale * ds * qv[idx(&qd, bi, h, i, t)];
                    }
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(dq, qd.as_slice(), &Device::Cpu)?,
        Tensor::from_vec(dk, kd.as_slice(), &Device::Cpu)?,
        Tensor::from_vec(dv, vd.as_slice(), &Device::Cpu)?,
    ))
}
