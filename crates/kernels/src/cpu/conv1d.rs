//! CPU causal depthwise conv1d: forward, backward and the single-step update.
//!
//! Two memory orders, chosen from `x`'s strides (see [`crate::ops::causal_conv1d`]):
//! - channel-last (`x` is a `(b, d, l)` view of `(b, l, d)` memory, as the Mamba blocks pass it):
//!   each output row `(b, t)` is `bias + Σ_j w[:, j] ⊙ x[b, t-(k-1)+j, :]`, `k` axpys over the
//!   channels (vectorised), parallel over rows;
//! - channel-first (anything else, gathered to `(b, d, l)`-contiguous): each row `(b, c)` is `k`
//!   axpys over time within each document, parallel over rows.
//!
//! f32 and f64 compute in their own type (bf16/f16 in f32); SiLU on f32 uses the SIMD `exp`.
//! The backward is deterministic: `dx` is a fixed sum per element, and `dweight`/`dbias` are
//! reduced per channel in (batch, time) order by one task per block of channels.

use std::borrow::Cow;

use num_traits::Float;
use rayon::prelude::*;

use moeba_tensor::{DType, Device, Result, Tensor, WithDType};

use super::par;
use super::simd::{self, MapOp};
use crate::ops::Conv1dGrads;

/// The float types the conv computes in.
pub(crate) trait ConvFloat: Float + WithDType + Send + Sync {
    /// `x = silu(x)` elementwise.
    fn silu_inplace(x: &mut [Self]);

    /// `pre = g ⊙ silu'(pre)` elementwise (`g` as long as `pre`).
    fn silu_grad_inplace(pre: &mut [Self], g: &[Self]) {
        for (p, &gv) in pre.iter_mut().zip(g) {
            *p = gv * silu_grad(*p);
        }
    }
}

impl ConvFloat for f32 {
    fn silu_inplace(x: &mut [f32]) {
        simd::map_inplace_f32(MapOp::Silu, x);
    }

    /// The sigmoid by the SIMD map, 256 values at a time, then the derivative in a plain loop
    /// (the default method is the scalar reference; tests compare the two).
    fn silu_grad_inplace(pre: &mut [f32], g: &[f32]) {
        let mut sig = [0f32; 256];
        for (p, gc) in pre.chunks_mut(256).zip(g.chunks(256)) {
            let s = &mut sig[..p.len()];
            simd::map_into_f32(MapOp::Sigmoid, p, s);
            for ((x, &s), &gv) in p.iter_mut().zip(s.iter()).zip(gc) {
                *x = gv * s * (1.0 + *x * (1.0 - s));
            }
        }
    }
}

impl ConvFloat for f64 {
    fn silu_inplace(x: &mut [f64]) {
        x.iter_mut().for_each(|v| *v = *v / (1.0 + (-*v).exp()));
    }
}

#[inline]
fn silu_grad<S: Float>(x: S) -> S {
    let one = S::one();
    let s = one / (one + (-x).exp());
    s * (one + x * (one - s))
}

/// Whether `x (b, d, l)` is channel-last in memory (stride 1 along d, not along l).
pub(crate) fn is_channel_last(x: &Tensor) -> bool {
    let s = x.layout().strides();
    x.rank() == 3 && x.dims()[1] > 1 && s[1] == 1 && !x.is_contiguous()
}

/// Document starts per row: `start[b * l + t]` (all zero without `seq_idx`).
pub(crate) fn segment_starts(seq_idx: Option<&Tensor>, b: usize, l: usize) -> Result<Vec<usize>> {
    let mut start = vec![0usize; b * l];
    let Some(s) = seq_idx else { return Ok(start) };
    let ids: Vec<i64> = match s.dtype() {
        DType::I64 => s.cpu_data::<i64>()?.into_owned(),
        _ => s.cpu_data::<u32>()?.iter().map(|&v| v as i64).collect(),
    };
    for bi in 0..b {
        for t in 1..l {
            let i = bi * l + t;
            start[i] = if ids[i] != ids[i - 1] { t } else { start[i - 1] };
        }
    }
    Ok(start)
}

/// The compute dtype of a float dtype.
fn compute_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x` in the compute dtype, as a row-major slice in channel-last `(b, l, d)` order when
/// `channel_last`, else `(b, d, l)`.
fn rows<'a, S: WithDType>(x: &'a Tensor, channel_last: bool) -> Result<Cow<'a, [S]>> {
    if x.dtype() != S::DTYPE {
        let c = x.to_dtype(S::DTYPE)?;
        let c = if channel_last { c.transpose(1, 2)?.contiguous()? } else { c };
        return Ok(Cow::Owned(c.cpu_data::<S>()?.into_owned()));
    }
    if channel_last {
        x.transpose(1, 2).and_then(|t| t.cpu_data::<S>().map(|c| Cow::Owned(c.into_owned())))
    } else {
        x.cpu_data::<S>()
    }
}

fn vec_of<S: WithDType>(t: Option<&Tensor>) -> Result<Option<Vec<S>>> {
    t.map(|t| Ok(t.to_dtype(S::DTYPE)?.cpu_data::<S>()?.into_owned())).transpose()
}

/// Wraps a computed buffer as the op's output: `(b, d, l)`, a transposed view of `(b, l, d)`
/// memory when `channel_last`; converted back to `dtype`.
pub(crate) fn output<S: WithDType>(
    v: Vec<S>,
    (b, d, l): (usize, usize, usize),
    channel_last: bool,
    dtype: DType,
) -> Result<Tensor> {
    if channel_last {
        Tensor::from_vec(v, (b, l, d), &Device::Cpu)?.to_dtype(dtype)?.transpose(1, 2)
    } else {
        Tensor::from_vec(v, (b, d, l), &Device::Cpu)?.to_dtype(dtype)
    }
}

/// Shapes and settings of one conv call.
#[derive(Clone, Copy)]
struct Dims {
    d: usize,
    l: usize,
    k: usize,
    channel_last: bool,
}

/// The pre-activation conv into `out` (`x`'s internal order).
fn conv_pre<S: ConvFloat>(x: &[S], w: &[S], bias: Option<&[S]>, start: &[usize], dm: Dims, out: &mut [S]) {
    let Dims { d, l, k, channel_last } = dm;
    if channel_last {
        // wt[j * d + c] = w[c, j]
        let mut wt = vec![S::zero(); k * d];
        for c in 0..d {
            for j in 0..k {
                wt[j * d + c] = w[c * k + j];
            }
        }
        par::for_each_rows_mut(out, d, d * k, |first, chunk| {
            for (r, row) in chunk.chunks_mut(d).enumerate() {
                let (bi, t) = ((first + r) / l, (first + r) % l);
                match bias {
                    Some(bv) => row.copy_from_slice(bv),
                    None => row.iter_mut().for_each(|v| *v = S::zero()),
                }
                let s0 = start[bi * l + t];
                for j in 0..k {
                    let Some(src) = (t + j + 1).checked_sub(k) else { continue };
                    if src < s0 {
                        continue;
                    }
                    let xr = &x[(bi * l + src) * d..(bi * l + src + 1) * d];
                    let wr = &wt[j * d..(j + 1) * d];
                    for ((o, &xv), &wv) in row.iter_mut().zip(xr).zip(wr) {
                        *o = *o + xv * wv;
                    }
                }
            }
        });
    } else {
        par::for_each_rows_mut(out, l, l * k, |first, chunk| {
            for (r, row) in chunk.chunks_mut(l).enumerate() {
                let (bi, c) = ((first + r) / d, (first + r) % d);
                let xr = &x[(bi * d + c) * l..(bi * d + c + 1) * l];
                let bval = bias.map_or(S::zero(), |bv| bv[c]);
                row.iter_mut().for_each(|v| *v = bval);
                for_each_segment(&start[bi * l..(bi + 1) * l], |s0, s1| {
                    for j in 0..k {
                        let shift = k - 1 - j;
                        let wv = w[c * k + j];
                        if s0 + shift >= s1 {
                            continue;
                        }
                        for (o, &xv) in row[s0 + shift..s1].iter_mut().zip(&xr[s0..s1 - shift]) {
                            *o = *o + xv * wv;
                        }
                    }
                });
            }
        });
    }
}

/// Calls `f(s0, s1)` for each document `s0..s1` of one row, given its document starts.
fn for_each_segment(start: &[usize], mut f: impl FnMut(usize, usize)) {
    let l = start.len();
    let mut s0 = 0;
    for t in 1..=l {
        if t == l || start[t] == t {
            if t > s0 {
                f(s0, t);
            }
            s0 = t;
        }
    }
}

fn forward_typed<S: ConvFloat>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    seq_idx: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, d, l) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let k = weight.dims()[1];
    let channel_last = is_channel_last(x);
    let dm = Dims { d, l, k, channel_last };
    let xv = rows::<S>(x, channel_last)?;
    let w = vec_of::<S>(Some(weight))?.unwrap_or_default();
    let bv = vec_of::<S>(bias)?;
    let start = segment_starts(seq_idx, b, l)?;
    let mut out = vec![S::zero(); b * d * l];
    conv_pre(&xv, &w, bv.as_deref(), &start, dm, &mut out);
    if silu {
        par::for_each_chunk_mut(&mut out, |_, c| S::silu_inplace(c));
    }
    output(out, (b, d, l), channel_last, x.dtype())
}

/// See [`crate::ops::causal_conv1d`].
pub fn causal_conv1d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    seq_idx: Option<&Tensor>,
) -> Result<Tensor> {
    match compute_dtype(x.dtype()) {
        DType::F64 => forward_typed::<f64>(x, weight, bias, silu, seq_idx),
        _ => forward_typed::<f32>(x, weight, bias, silu, seq_idx),
    }
}

fn backward_typed<S: ConvFloat>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    seq_idx: Option<&Tensor>,
    grad_out: &Tensor,
) -> Result<Conv1dGrads> {
    let (b, d, l) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let k = weight.dims()[1];
    let channel_last = is_channel_last(x);
    let dm = Dims { d, l, k, channel_last };
    let xv = rows::<S>(x, channel_last)?;
    let gv = rows::<S>(grad_out, channel_last)?;
    let w = vec_of::<S>(Some(weight))?.unwrap_or_default();
    let bv = vec_of::<S>(bias)?;
    let start = segment_starts(seq_idx, b, l)?;
    // g = grad_out ⊙ act'(pre)
    let g: Vec<S> = if silu {
        let mut pre = vec![S::zero(); b * d * l];
        conv_pre(&xv, &w, bv.as_deref(), &start, dm, &mut pre);
        par::for_each_chunk_mut(&mut pre, |s, c| S::silu_grad_inplace(c, &gv[s..s + c.len()]));
        pre
    } else {
        gv.into_owned()
    };
    let mut dx = vec![S::zero(); b * d * l];
    let mut dw = vec![S::zero(); d * k];
    let mut db = vec![S::zero(); d];
    if channel_last {
        let mut wt = vec![S::zero(); k * d];
        for c in 0..d {
            for j in 0..k {
                wt[j * d + c] = w[c * k + j];
            }
        }
        // dx[s] = Σ_j w[:, j] ⊙ g[s + (k-1) - j], for the taps that read s.
        par::for_each_rows_mut(&mut dx, d, d * k, |first, chunk| {
            for (r, row) in chunk.chunks_mut(d).enumerate() {
                let (bi, s) = ((first + r) / l, (first + r) % l);
                for j in 0..k {
                    let t = s + k - 1 - j;
                    if t >= l || s < start[bi * l + t] {
                        continue;
                    }
                    let gr = &g[(bi * l + t) * d..(bi * l + t + 1) * d];
                    let wr = &wt[j * d..(j + 1) * d];
                    for ((o, &gv), &wv) in row.iter_mut().zip(gr).zip(wr) {
                        *o = *o + gv * wv;
                    }
                }
            }
        });
        // dw, db: one task per block of channels, walking (batch, time) in order.
        const BLOCK: usize = 64;
        let blocks: Vec<(usize, Vec<S>, Vec<S>)> = (0..d.div_ceil(BLOCK))
            .into_par_iter()
            .map(|blk| {
                let (c0, c1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(d));
                let w_ = c1 - c0;
                let mut dwt = vec![S::zero(); k * w_];
                let mut dbb = vec![S::zero(); w_];
                for bi in 0..b {
                    for t in 0..l {
                        let gr = &g[(bi * l + t) * d + c0..(bi * l + t) * d + c1];
                        for (o, &gv) in dbb.iter_mut().zip(gr) {
                            *o = *o + gv;
                        }
                        for j in 0..k {
                            let Some(src) = (t + j + 1).checked_sub(k) else { continue };
                            if src < start[bi * l + t] {
                                continue;
                            }
                            let xr = &xv[(bi * l + src) * d + c0..(bi * l + src) * d + c1];
                            for ((o, &gv), &xv) in dwt[j * w_..(j + 1) * w_].iter_mut().zip(gr).zip(xr) {
                                *o = *o + gv * xv;
                            }
                        }
                    }
                }
                (c0, dwt, dbb)
            })
            .collect();
        for (c0, dwt, dbb) in blocks {
            let w_ = dbb.len();
            for i in 0..w_ {
                db[c0 + i] = dbb[i];
                for j in 0..k {
                    dw[(c0 + i) * k + j] = dwt[j * w_ + i];
                }
            }
        }
    } else {
        // Per (b, c) row: dx over each document; dw/db per channel summed over the batch in order.
        par::for_each_rows_mut(&mut dx, l, l * k, |first, chunk| {
            for (r, row) in chunk.chunks_mut(l).enumerate() {
                let (bi, c) = ((first + r) / d, (first + r) % d);
                let gr = &g[(bi * d + c) * l..(bi * d + c + 1) * l];
                for_each_segment(&start[bi * l..(bi + 1) * l], |s0, s1| {
                    for j in 0..k {
                        let shift = k - 1 - j;
                        if s0 + shift >= s1 {
                            continue;
                        }
                        let wv = w[c * k + j];
                        for (o, &gv) in row[s0..s1 - shift].iter_mut().zip(&gr[s0 + shift..s1]) {
                            *o = *o + gv * wv;
                        }
                    }
                });
            }
        });
        let per: Vec<(Vec<S>, S)> = (0..d)
            .into_par_iter()
            .map(|c| {
                let mut dwc = vec![S::zero(); k];
                let mut dbc = S::zero();
                for bi in 0..b {
                    let gr = &g[(bi * d + c) * l..(bi * d + c + 1) * l];
                    let xr = &xv[(bi * d + c) * l..(bi * d + c + 1) * l];
                    dbc = gr.iter().fold(dbc, |a, &v| a + v);
                    for_each_segment(&start[bi * l..(bi + 1) * l], |s0, s1| {
                        for j in 0..k {
                            let shift = k - 1 - j;
                            if s0 + shift >= s1 {
                                continue;
                            }
                            dwc[j] = gr[s0 + shift..s1]
                                .iter()
                                .zip(&xr[s0..s1 - shift])
                                .fold(dwc[j], |a, (&gv, &xv)| a + gv * xv);
                        }
                    });
                }
                (dwc, dbc)
            })
            .collect();
        for (c, (dwc, dbc)) in per.into_iter().enumerate() {
            dw[c * k..(c + 1) * k].copy_from_slice(&dwc);
            db[c] = dbc;
        }
    }
    let dt = x.dtype();
    Ok(Conv1dGrads {
        x: output(dx, (b, d, l), channel_last, dt)?,
        weight: Tensor::from_vec(dw, (d, k), &Device::Cpu)?.to_dtype(weight.dtype())?,
        bias: bias.map(|bt| Tensor::from_vec(db, d, &Device::Cpu)?.to_dtype(bt.dtype())).transpose()?,
    })
}

/// See [`crate::ops::causal_conv1d_backward`].
pub fn causal_conv1d_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    seq_idx: Option<&Tensor>,
    grad_out: &Tensor,
) -> Result<Conv1dGrads> {
    match compute_dtype(x.dtype()) {
        DType::F64 => backward_typed::<f64>(x, weight, bias, silu, seq_idx, grad_out),
        _ => backward_typed::<f32>(x, weight, bias, silu, seq_idx, grad_out),
    }
}

fn update_typed<S: ConvFloat>(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, d) = (x.dims()[0], x.dims()[1]);
    let k = weight.dims()[1];
    let xv = vec_of::<S>(Some(x))?.unwrap_or_default();
    let mut state = vec_of::<S>(Some(conv_state))?.unwrap_or_default();
    let w = vec_of::<S>(Some(weight))?.unwrap_or_default();
    let bv = vec_of::<S>(bias)?;
    let mut out = vec![S::zero(); b * d];
    for bi in 0..b {
        for c in 0..d {
            let row = &mut state[(bi * d + c) * k..(bi * d + c + 1) * k];
            row.copy_within(1.., 0);
            row[k - 1] = xv[bi * d + c];
            let wr = &w[c * k..(c + 1) * k];
            let bval = bv.as_ref().map_or(S::zero(), |v| v[c]);
            out[bi * d + c] = row.iter().zip(wr).fold(bval, |a, (&s, &wv)| a + s * wv);
        }
    }
    if silu {
        S::silu_inplace(&mut out);
    }
    let dt = x.dtype();
    Ok((
        Tensor::from_vec(out, (b, d), &Device::Cpu)?.to_dtype(dt)?,
        Tensor::from_vec(state, (b, d, k), &Device::Cpu)?.to_dtype(conv_state.dtype())?,
    ))
}

/// See [`crate::ops::causal_conv1d_update`].
pub fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<(Tensor, Tensor)> {
    match compute_dtype(x.dtype()) {
        DType::F64 => update_typed::<f64>(x, conv_state, weight, bias, silu),
        _ => update_typed::<f32>(x, conv_state, weight, bias, silu),
    }
}
