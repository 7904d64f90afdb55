//! Plain top-k gating, permutation and per-expert GEMM (see the module docs of `reference`).
//!
//! Everything runs in f64 over logical indices and returns f64 tensors (indices `U32`, offsets
//! `I64`). The algorithms differ from the fast ones where that helps a test: the top-k is a full
//! sort, the routing plan a stable sort by expert, the scatter a loop over rows.

use moeba_tensor::{DType, Device, Error, Result, Tensor};

use crate::ops::{index_vec, MoeRoutingPlan, MoeScoreFn, TopkGating, TopkGatingOptions};

fn f64_tensor(v: Vec<f64>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, dims, &Device::Cpu)
}

fn plan_parts(plan: &MoeRoutingPlan) -> Result<(Vec<usize>, Vec<usize>)> {
    let toks = index_vec("reference::moe", "row_token", &plan.row_token)?;
    let offs = index_vec("reference::moe", "expert_offsets", &plan.expert_offsets)?;
    Ok((toks, offs))
}

/// Top-k gating by definition: scores, a full sort of `score + bias` (descending, ties to the
/// lower index), the chosen scores renormalised and scaled, counts, mean scores, logsumexp.
pub fn topk_gating(
    logits: &Tensor,
    selection_bias: Option<&Tensor>,
    opts: &TopkGatingOptions,
) -> Result<TopkGating> {
    if logits.rank() != 2 {
        return Err(Error::bad_shape("reference::topk_gating", logits.shape(), "expected (T, E)"));
    }
    let (t, e) = (logits.dims()[0], logits.dims()[1]);
    let k = opts.k;
    let x = logits.to_vec_f64()?;
    let bias = match selection_bias {
        Some(b) => b.to_vec_f64()?,
        None => vec![0.0; e],
    };
    let mut scores = vec![0.0; t * e];
    let mut lse = vec![0.0; t];
    let mut idx = vec![0u32; t * k];
    let mut w = vec![0.0; t * k];
    let mut counts = vec![0.0; e];
    let mut mean = vec![0.0; e];
    for tok in 0..t {
        let row = &x[tok * e..(tok + 1) * e];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        lse[tok] = m + z.ln();
        for j in 0..e {
            scores[tok * e + j] = match opts.score {
                MoeScoreFn::Softmax => (row[j] - lse[tok]).exp(),
                MoeScoreFn::Sigmoid => 1.0 / (1.0 + (-row[j]).exp()),
            };
        }
        let mut order: Vec<usize> = (0..e).collect();
        let key = |j: usize| scores[tok * e + j] + bias[j];
        order.sort_by(|&a, &b| {
            key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        let chosen = &order[..k];
        let sum: f64 = chosen.iter().map(|&j| scores[tok * e + j]).sum();
        for (slot, &j) in chosen.iter().enumerate() {
            idx[tok * k + slot] = j as u32;
            let s = scores[tok * e + j];
            w[tok * k + slot] = opts.scaling * if opts.renormalize { s / (sum + 1e-20) } else { s };
            counts[j] += 1.0;
        }
        for j in 0..e {
            mean[j] += scores[tok * e + j];
        }
    }
    if t > 0 {
        mean.iter_mut().for_each(|v| *v /= t as f64);
    }
    Ok(TopkGating {
        indices: Tensor::from_vec(idx, (t, k), &Device::Cpu)?,
        weights: f64_tensor(w, &[t, k])?,
        scores: f64_tensor(scores, &[t, e])?,
        counts: f64_tensor(counts, &[e])?,
        mean_score: f64_tensor(mean, &[e])?,
        lse: f64_tensor(lse, &[t])?,
    })
}

/// The gradient of [`topk_gating`] with respect to the logits, by the chain rule written out
/// with explicit Jacobians: `∂weights/∂scores`, `∂scores/∂logits` (full E×E), `∂lse/∂logits`.
pub fn topk_gating_backward(
    logits: &Tensor,
    opts: &TopkGatingOptions,
    selection_bias: Option<&Tensor>,
    grad_weights: Option<&Tensor>,
    grad_mean_score: Option<&Tensor>,
    grad_lse: Option<&Tensor>,
) -> Result<Tensor> {
    let fwd = topk_gating(logits, selection_bias, opts)?;
    let (t, e) = (logits.dims()[0], logits.dims()[1]);
    let k = opts.k;
    let x = logits.to_vec_f64()?;
    let s = fwd.scores.to_vec_f64()?;
    let lse = fwd.lse.to_vec_f64()?;
    let idx = index_vec("reference::topk_gating_backward", "indices", &fwd.indices)?;
    let gw = grad_weights.map(|g| g.to_vec_f64()).transpose()?;
    let gm = grad_mean_score.map(|g| g.to_vec_f64()).transpose()?;
    let gl = grad_lse.map(|g| g.to_vec_f64()).transpose()?;
    let mut out = vec![0.0; t * e];
    for tok in 0..t {
        // dL/dscores
        let mut gs = vec![0.0; e];
        if let Some(gm) = &gm {
            for j in 0..e {
                gs[j] += gm[j] / t as f64;
            }
        }
        if let Some(gw) = &gw {
            let chosen = &idx[tok * k..(tok + 1) * k];
            let sum: f64 = chosen.iter().map(|&j| s[tok * e + j]).sum::<f64>() + 1e-20;
            for (a, &ja) in chosen.iter().enumerate() {
                for &jb in chosen {
                    // ∂w_a/∂s_jb
                    let d = if opts.renormalize {
                        let delta = if ja == jb { 1.0 } else { 0.0 };
                        opts.scaling * (delta / sum - s[tok * e + ja] / (sum * sum))
                    } else if ja == jb {
                        opts.scaling
                    } else {
                        0.0
                    };
                    gs[jb] += gw[tok * k + a] * d;
                }
            }
        }
        for i in 0..e {
            let mut acc = 0.0;
            for j in 0..e {
                // ∂s_j/∂x_i
                let d = match opts.score {
                    MoeScoreFn::Softmax => s[tok * e + j] * ((i == j) as u8 as f64 - s[tok * e + i]),
                    MoeScoreFn::Sigmoid => {
                        if i == j {
                            s[tok * e + j] * (1.0 - s[tok * e + j])
                        } else {
                            0.0
                        }
                    }
                };
                acc += gs[j] * d;
            }
            if let Some(gl) = &gl {
                acc += gl[tok] * (x[tok * e + i] - lse[tok]).exp();
            }
            out[tok * e + i] = acc;
        }
    }
    f64_tensor(out, &[t, e])
}

/// The routing plan of a top-k assignment by a stable sort of the (token, slot) pairs by expert,
/// then the first `capacity` rows of each expert kept.
pub fn plan_from_topk(
    indices: &Tensor,
    num_experts: usize,
    capacity: Option<usize>,
) -> Result<MoeRoutingPlan> {
    let (t, k) = (indices.dims()[0], indices.dims()[1]);
    let ids = index_vec("reference::plan_from_topk", "indices", indices)?;
    let mut pairs: Vec<(usize, usize)> = ids.iter().enumerate().map(|(flat, &e)| (e, flat)).collect();
    pairs.sort_by_key(|&(e, _)| e); // stable
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut per = vec![0usize; num_experts];
    let mut dropped = 0;
    for (e, flat) in pairs {
        if capacity.is_some_and(|c| per[e] >= c) {
            dropped += 1;
        } else {
            per[e] += 1;
            kept.push((e, flat));
        }
    }
    let mut offs = vec![0i64; num_experts + 1];
    for e in 0..num_experts {
        offs[e + 1] = offs[e] + per[e] as i64;
    }
    let n = kept.len();
    Ok(MoeRoutingPlan {
        num_tokens: t,
        num_experts,
        expert_offsets: Tensor::from_vec(offs, num_experts + 1, &Device::Cpu)?,
        row_token: Tensor::from_vec(
            kept.iter().map(|&(_, f)| (f / k) as u32).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )?,
        row_slot: Tensor::from_vec(kept.iter().map(|&(_, f)| f as u32).collect::<Vec<_>>(), n, &Device::Cpu)?,
        dropped,
    })
}

/// `out[r] = x[row_token[r]]`.
pub fn permute(x: &Tensor, plan: &MoeRoutingPlan) -> Result<Tensor> {
    let (toks, _) = plan_parts(plan)?;
    let d = x.dims()[1];
    let xv = x.to_vec_f64()?;
    let out: Vec<f64> = toks.iter().flat_map(|&t| xv[t * d..(t + 1) * d].iter().copied()).collect();
    f64_tensor(out, &[toks.len(), d])
}

/// `out[t] += w[r] · y[r]` for r = 0, 1, ... (`w = 1` when `None`).
pub fn unpermute(y: &Tensor, w: Option<&Tensor>, plan: &MoeRoutingPlan) -> Result<Tensor> {
    let (toks, _) = plan_parts(plan)?;
    let d = y.dims()[1];
    let yv = y.to_vec_f64()?;
    let wv = match w {
        Some(w) => w.to_vec_f64()?,
        None => vec![1.0; toks.len()],
    };
    let mut out = vec![0.0; plan.num_tokens * d];
    for (r, &t) in toks.iter().enumerate() {
        for c in 0..d {
            out[t * d + c] += wv[r] * yv[r * d + c];
        }
    }
    f64_tensor(out, &[plan.num_tokens, d])
}

/// `dy[r] = w[r] g[t_r]`, `dw[r] = Σ_c y[r, c] g[t_r, c]`.
pub fn unpermute_backward(
    y: &Tensor,
    w: &Tensor,
    plan: &MoeRoutingPlan,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (toks, _) = plan_parts(plan)?;
    let d = y.dims()[1];
    let (yv, wv, gv) = (y.to_vec_f64()?, w.to_vec_f64()?, grad_out.to_vec_f64()?);
    let r = toks.len();
    let mut dy = vec![0.0; r * d];
    let mut dw = vec![0.0; r];
    for (row, &t) in toks.iter().enumerate() {
        for c in 0..d {
            dy[row * d + c] = wv[row] * gv[t * d + c];
            dw[row] += yv[row * d + c] * gv[t * d + c];
        }
    }
    Ok((f64_tensor(dy, &[r, d])?, f64_tensor(dw, &[r])?))
}

/// `out[r, o] = Σ_i w[e(r), o, i] x[r, i]` with `e(r)` the group holding row r.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, expert_offsets: &Tensor) -> Result<Tensor> {
    let offs = index_vec("reference::grouped_matmul", "expert_offsets", expert_offsets)?;
    let (r, inn) = (x.dims()[0], x.dims()[1]);
    let out_f = w.dims()[1];
    let (xv, wv) = (x.to_vec_f64()?, w.to_vec_f64()?);
    let mut out = vec![0.0; r * out_f];
    for e in 0..offs.len() - 1 {
        for row in offs[e]..offs[e + 1] {
            for o in 0..out_f {
                let mut s = 0.0;
                for i in 0..inn {
                    s += wv[(e * out_f + o) * inn + i] * xv[row * inn + i];
                }
                out[row * out_f + o] = s;
            }
        }
    }
    f64_tensor(out, &[r, out_f])
}

/// `dx[r, i] = Σ_o g[r, o] w[e(r), o, i]`, `dw[e, o, i] = Σ_{r in e} g[r, o] x[r, i]`.
pub fn grouped_matmul_backward(
    x: &Tensor,
    w: &Tensor,
    expert_offsets: &Tensor,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let offs = index_vec("reference::grouped_matmul_backward", "expert_offsets", expert_offsets)?;
    let (r, inn) = (x.dims()[0], x.dims()[1]);
    let (ne, out_f) = (w.dims()[0], w.dims()[1]);
    let (xv, wv, gv) = (x.to_vec_f64()?, w.to_vec_f64()?, grad_out.to_vec_f64()?);
    let mut dx = vec![0.0; r * inn];
    let mut dw = vec![0.0; ne * out_f * inn];
    for e in 0..ne {
        for row in offs[e]..offs[e + 1] {
            for o in 0..out_f {
                let g = gv[row * out_f + o];
                for i in 0..inn {
                    dx[row * inn + i] += g * wv[(e * out_f + o) * inn + i];
                    dw[(e * out_f + o) * inn + i] += g * xv[row * inn + i];
                }
            }
        }
    }
    Ok((f64_tensor(dx, &[r, inn])?, f64_tensor(dw, &[ne, out_f, inn])?))
}

/// The SwiGLU expert on grouped rows, by definition: `down_e(silu(gate_e x) * up_e x)` with
/// `gate_up (E, 2f, d)` = `[gate; up]` and `down (E, d, f)`.
pub fn swiglu_experts(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    expert_offsets: &Tensor,
) -> Result<Tensor> {
    let h = grouped_matmul(x, gate_up, expert_offsets)?.to_vec_f64()?;
    let r = x.dims()[0];
    let f = gate_up.dims()[1] / 2;
    let mut a = vec![0.0; r * f];
    for row in 0..r {
        for j in 0..f {
            let g = h[row * 2 * f + j];
            let u = h[row * 2 * f + f + j];
            a[row * f + j] = g / (1.0 + (-g).exp()) * u;
        }
    }
    let a = f64_tensor(a, &[r, f])?;
    grouped_matmul(&a, &down.to_dtype(DType::F64)?, expert_offsets)
}

/// `silu(h[:, :f]) * h[:, f:]` for `h (R, 2f)`.
pub fn swiglu(h: &Tensor) -> Result<Tensor> {
    let (r, f) = (h.dims()[0], h.dims()[1] / 2);
    let hv = h.to_vec_f64()?;
    let mut out = vec![0.0; r * f];
    for row in 0..r {
        for j in 0..f {
            let (g, u) = (hv[row * 2 * f + j], hv[row * 2 * f + f + j]);
            out[row * f + j] = g / (1.0 + (-g).exp()) * u;
        }
    }
    f64_tensor(out, &[r, f])
}

/// The backward of [`swiglu`] by central differences of each element's function
/// `silu(g)·u` (exact in `u`, O(eps²) in `g`), so it shares no formula with the fast path.
pub fn swiglu_backward(h: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (r, f) = (h.dims()[0], h.dims()[1] / 2);
    let (hv, gv) = (h.to_vec_f64()?, grad.to_vec_f64()?);
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let eps = 1e-5;
    let mut out = vec![0.0; r * 2 * f];
    for row in 0..r {
        for j in 0..f {
            let (g, u, d) = (hv[row * 2 * f + j], hv[row * 2 * f + f + j], gv[row * f + j]);
            out[row * 2 * f + j] = d * u * (silu(g + eps) - silu(g - eps)) / (2.0 * eps);
            out[row * 2 * f + f + j] = d * silu(g);
        }
    }
    f64_tensor(out, &[r, 2 * f])
}
