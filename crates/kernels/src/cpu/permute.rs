//! CPU token permutation for MoE: routing plans (stable counting sort by expert), the gather
//! into expert order, and the weighted scatter back to the tokens, with their backwards.
//!
//! The scatter never uses atomics: a token → rows index (a second counting sort, rows in
//! ascending order) lets every output row be summed by one thread in a fixed order.

use std::borrow::Cow;

use moeba_tensor::{DType, Device, Error, Result, Shape, Tensor, WithDType};
use num_traits::Float;

use super::par;
use crate::ops::{index_vec, MoeRoutingPlan};

/// The float types the MoE kernels compute in (f32 for f32/bf16/f16, f64 for f64).
pub trait ComputeFloat: WithDType + Float + Default + Send + Sync {
    /// `out = e^(x - shift)`, returning `Σ out` (f32: the SIMD exp of `cpu::simd`).
    fn exp_sub_sum(x: &[Self], shift: Self, out: &mut [Self]) -> f64;
}

impl ComputeFloat for f32 {
    fn exp_sub_sum(x: &[f32], shift: f32, out: &mut [f32]) -> f64 {
        super::simd::exp_sub_sum_into_f32(x, shift, out)
    }
}

impl ComputeFloat for f64 {
    fn exp_sub_sum(x: &[f64], shift: f64, out: &mut [f64]) -> f64 {
        let mut s = 0.0;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - shift).exp();
            s += *o;
        }
        s
    }
}

/// The logical elements of a float tensor as a row-major slice of `F` (borrowed when already a
/// contiguous CPU tensor of that dtype, converted or gathered otherwise).
pub fn data_as<F: WithDType>(x: &Tensor) -> Result<Cow<'_, [F]>> {
    if x.dtype() == F::DTYPE {
        x.cpu_data::<F>()
    } else {
        Ok(Cow::Owned(x.to_dtype(F::DTYPE)?.to_vec::<F>()?))
    }
}

/// `n` zeros in a fresh allocation whose untouched pages are advised for transparent huge pages
/// (see [`par::advise_huge_pages`]): a large output then costs one page fault per 2 MiB instead
/// of one per 4 KiB when first written (the MoE layer's intermediates are tens of MB and were
/// spending a fifth of the layer's time in the kernel's fault path).
pub(crate) fn zeros_huge<T: Clone + num_traits::Zero>(n: usize) -> Vec<T> {
    let mut v = vec![T::zero(); n];
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, the slice covers exactly `v`'s `n`
    // initialised elements, and `advise_huge_pages` writes nothing.
    let s = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut std::mem::MaybeUninit<T>, n) };
    par::advise_huge_pages(s);
    v
}

/// A CPU tensor of `shape` from `v`, converted to `dtype`.
pub fn from_vec_as<F: WithDType>(v: Vec<F>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

fn u32_tensor(v: Vec<u32>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, &Device::Cpu)
}

fn offsets_tensor(o: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(o.iter().map(|&v| v as i64).collect::<Vec<_>>(), o.len(), &Device::Cpu)
}

fn to_u32(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(op, "indices", format!("{v} does not fit in u32")))
}

/// See [`crate::ops::moe_plan_from_topk`].
pub fn plan_from_topk(
    indices: &Tensor,
    num_experts: usize,
    capacity: Option<usize>,
) -> Result<MoeRoutingPlan> {
    let op = "moe_plan_from_topk";
    let (t, k) = (indices.dims()[0], indices.dims()[1]);
    let ids = index_vec(op, "indices", indices)?;
    let mut counts = vec![0usize; num_experts];
    for (i, &e) in ids.iter().enumerate() {
        if e >= num_experts {
            return Err(Error::invalid(
                op,
                "indices",
                format!(
                    "indices[{}, {}] = {e} is not an expert index below num_experts = {num_experts}",
                    i / k.max(1),
                    i % k.max(1)
                ),
            ));
        }
        counts[e] += 1;
    }
    let kept: Vec<usize> = counts.iter().map(|&c| capacity.map_or(c, |cap| c.min(cap))).collect();
    let dropped = counts.iter().zip(&kept).map(|(c, k)| c - k).sum();
    let mut offsets = vec![0usize; num_experts + 1];
    for e in 0..num_experts {
        offsets[e + 1] = offsets[e] + kept[e];
    }
    let r = offsets[num_experts];
    let mut cursor = offsets.clone();
    let mut row_token = vec![0u32; r];
    let mut row_slot = vec![0u32; r];
    for (flat, &e) in ids.iter().enumerate() {
        let c = cursor[e];
        if c < offsets[e + 1] {
            row_token[c] = to_u32(op, flat / k)?;
            row_slot[c] = to_u32(op, flat)?;
            cursor[e] += 1;
        }
    }
    Ok(MoeRoutingPlan {
        num_tokens: t,
        num_experts,
        expert_offsets: offsets_tensor(&offsets)?,
        row_token: u32_tensor(row_token)?,
        row_slot: u32_tensor(row_slot)?,
        dropped,
    })
}

/// See [`crate::ops::moe_plan_from_expert_choice`].
pub fn plan_from_expert_choice(token_ids: &Tensor, num_tokens: usize) -> Result<MoeRoutingPlan> {
    let op = "moe_plan_from_expert_choice";
    let (e, c) = (token_ids.dims()[0], token_ids.dims()[1]);
    let ids = index_vec(op, "token_ids", token_ids)?;
    let mut seen = vec![false; num_tokens];
    let mut row_token = Vec::with_capacity(ids.len());
    for (i, &t) in ids.iter().enumerate() {
        if t >= num_tokens {
            return Err(Error::invalid(
                op,
                "token_ids",
                format!(
                    "token_ids[{}, {}] = {t} is not a token index below num_tokens = {num_tokens}",
                    i / c.max(1),
                    i % c.max(1)
                ),
            ));
        }
        seen[t] = true;
        row_token.push(to_u32(op, t)?);
    }
    let offsets: Vec<usize> = (0..=e).map(|i| i * c).collect();
    let row_slot = (0..ids.len()).map(|i| to_u32(op, i)).collect::<Result<Vec<_>>>()?;
    Ok(MoeRoutingPlan {
        num_tokens,
        num_experts: e,
        expert_offsets: offsets_tensor(&offsets)?,
        row_token: u32_tensor(row_token)?,
        row_slot: u32_tensor(row_slot)?,
        dropped: seen.iter().filter(|&&s| !s).count(),
    })
}

/// Token → rows index: rows of token `t` are `rows[starts[t]..starts[t + 1]]`, ascending.
pub fn token_rows(row_token: &[usize], num_tokens: usize) -> (Vec<usize>, Vec<usize>) {
    let mut starts = vec![0usize; num_tokens + 1];
    for &t in row_token {
        starts[t + 1] += 1;
    }
    for i in 0..num_tokens {
        starts[i + 1] += starts[i];
    }
    let mut cursor = starts.clone();
    let mut rows = vec![0usize; row_token.len()];
    for (r, &t) in row_token.iter().enumerate() {
        rows[cursor[t]] = r;
        cursor[t] += 1;
    }
    (starts, rows)
}

/// See [`crate::ops::moe_permute`]: a row gather, for every dtype, no conversion.
pub fn permute(x: &Tensor, plan: &MoeRoutingPlan) -> Result<Tensor> {
    fn run<T: WithDType + num_traits::Zero>(x: &Tensor, toks: &[usize], d: usize) -> Result<Tensor> {
        let xs = x.cpu_data::<T>()?;
        let mut out = zeros_huge::<T>(toks.len() * d);
        if d > 0 {
            par::for_each_rows_mut(&mut out, d, d, |first, chunk| {
                for (i, o) in chunk.chunks_mut(d).enumerate() {
                    let t = toks[first + i];
                    o.copy_from_slice(&xs[t * d..(t + 1) * d]);
                }
            });
        }
        Tensor::from_vec(out, (toks.len(), d), &Device::Cpu)
    }
    let toks = index_vec("moe_permute", "plan.row_token", &plan.row_token)?;
    let d = x.dims()[1];
    match x.dtype() {
        DType::F32 => run::<f32>(x, &toks, d),
        DType::F64 => run::<f64>(x, &toks, d),
        DType::BF16 => run::<half::bf16>(x, &toks, d),
        DType::F16 => run::<half::f16>(x, &toks, d),
        dt => Err(Error::dtype("moe_permute", dt)),
    }
}

/// `out[t] = Σ_{rows r of t, ascending} w[r] · y[r]` (`w = 1` when `None`): the forward of
/// [`crate::ops::moe_unpermute`] and the backward of [`crate::ops::moe_permute`].
pub fn unpermute(y: &Tensor, w: Option<&Tensor>, plan: &MoeRoutingPlan) -> Result<Tensor> {
    match y.dtype() {
        DType::F64 => unpermute_impl::<f64>(y, w, plan),
        _ => unpermute_impl::<f32>(y, w, plan),
    }
}

fn unpermute_impl<F: ComputeFloat>(y: &Tensor, w: Option<&Tensor>, plan: &MoeRoutingPlan) -> Result<Tensor> {
    let toks = index_vec("moe_unpermute", "plan.row_token", &plan.row_token)?;
    let (starts, rows) = token_rows(&toks, plan.num_tokens);
    let d = y.dims()[1];
    let ys = data_as::<F>(y)?;
    let ws = w.map(data_as::<F>).transpose()?;
    let t = plan.num_tokens;
    let mut out = zeros_huge::<F>(t * d);
    if d > 0 {
        let per_row = (d * rows.len()).div_ceil(t.max(1)).max(d);
        par::for_each_rows_mut(&mut out, d, per_row, |first, chunk| {
            for (i, o) in chunk.chunks_mut(d).enumerate() {
                let tok = first + i;
                for &r in &rows[starts[tok]..starts[tok + 1]] {
                    let yr = &ys[r * d..(r + 1) * d];
                    match &ws {
                        Some(wv) => {
                            let wr = wv[r];
                            o.iter_mut().zip(yr).for_each(|(a, &b)| *a = *a + wr * b);
                        }
                        None => o.iter_mut().zip(yr).for_each(|(a, &b)| *a = *a + b),
                    }
                }
            }
        });
    }
    from_vec_as(out, (t, d), y.dtype())
}

/// See [`crate::ops::moe_unpermute_backward`].
pub fn unpermute_backward(
    y: &Tensor,
    w: &Tensor,
    plan: &MoeRoutingPlan,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match y.dtype() {
        DType::F64 => unpermute_backward_impl::<f64>(y, w, plan, grad_out),
        _ => unpermute_backward_impl::<f32>(y, w, plan, grad_out),
    }
}

fn unpermute_backward_impl<F: ComputeFloat>(
    y: &Tensor,
    w: &Tensor,
    plan: &MoeRoutingPlan,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let toks = index_vec("moe_unpermute_backward", "plan.row_token", &plan.row_token)?;
    let (r, d) = (y.dims()[0], y.dims()[1]);
    let ys = data_as::<F>(y)?;
    let ws = data_as::<F>(w)?;
    let gs = data_as::<F>(grad_out)?;
    let mut dy = zeros_huge::<F>(r * d);
    let mut dw = vec![F::zero(); r];
    if d > 0 {
        // dw rows are independent of each other: compute them alongside dy, one row per step.
        let dw_ptr = SendPtr(dw.as_mut_ptr());
        par::for_each_rows_mut(&mut dy, d, 2 * d, |first, chunk| {
            for (i, o) in chunk.chunks_mut(d).enumerate() {
                let row = first + i;
                let t = toks[row];
                let g = &gs[t * d..(t + 1) * d];
                let yr = &ys[row * d..(row + 1) * d];
                let wr = ws[row];
                let mut dot = 0.0f64;
                for ((a, &gv), &yv) in o.iter_mut().zip(g).zip(yr) {
                    *a = wr * gv;
                    dot += (gv * yv).to_f64();
                }
                // SAFETY: `row < r` and each row is visited by exactly one task.
                unsafe { *dw_ptr.get().add(row) = F::from(dot).unwrap_or_else(F::nan) };
            }
        });
    }
    Ok((from_vec_as(dy, (r, d), y.dtype())?, from_vec_as(dw, r, y.dtype())?))
}

/// A raw pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used for disjoint writes from tasks that end before the buffer's borrow does.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
