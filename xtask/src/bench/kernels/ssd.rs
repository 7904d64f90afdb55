//! The Mamba-2 chunked SSD scan; case dims `[b, l, h, p, n, chunk]` (one group of B and C, D per
//! head, dt_bias, softplus).
//!
//! Variants:
//! - 0: `ops::ssd`, the forward (outputs y and the final state);
//! - 1: `ops::ssd` then `ops::ssd_backward` (forward + backward; outputs y and the gradients of
//!   x, dt, A, B, C, D, dt_bias).
//!
//! Reference: the plain token-by-token recurrence in f64 (`reference::ssd`) for the forward; for
//! the gradients, backpropagation through that recurrence while it fits in memory (b·h·l·p·n up
//! to 2^22), else the chunked backward run in f64 (itself tested against the recurrence).
//! Counted work: the FLOPs the chunked algorithm's GEMMs execute (`ops::ssd_forward_flops`,
//! `ops::ssd_backward_flops`: the Q × Q products as computed, lower block-triangular), judged
//! against the FMA peak.

use anyhow::{bail, Result};
use moeba_kernels::ops::{self, SsdArgs};
use moeba_kernels::reference;
use moeba_tensor::{DType, Device, Tensor};

use super::{on_device, randn, uniform};
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The SSD benchmark (see the module docs).
pub struct Ssd;

fn dims(case: &Case) -> Result<[usize; 6]> {
    let mut d = [0; 6];
    for (i, v) in d.iter_mut().enumerate() {
        *v = case.dim("ssd", i)?;
    }
    Ok(d)
}

fn args(inputs: &[Tensor], chunk: usize) -> Result<SsdArgs<'_>> {
    let [x, dt, a, b, c, d, bias, _gy, ..] = inputs else {
        bail!("ssd: expected 8 inputs, got {}", inputs.len())
    };
    Ok(SsdArgs {
        x,
        dt,
        a,
        b,
        c,
        d: Some(d),
        dt_bias: Some(bias),
        dt_softplus: true,
        initial_state: None,
        seq_idx: None,
        chunk_size: chunk,
    })
}

/// Forward, or forward + backward: the outputs the variant reports.
fn compute(variant: usize, inputs: &[Tensor], chunk: usize) -> Result<Vec<Tensor>> {
    let a = args(inputs, chunk)?;
    let out = ops::ssd(&a)?;
    match variant {
        0 => Ok(vec![out.y, out.final_state]),
        1 => {
            let g = ops::ssd_backward(&a, &out.saved, &inputs[7], None)?;
            let (Some(gd), Some(gb)) = (g.d, g.dt_bias) else { bail!("ssd: missing D / dt_bias gradients") };
            Ok(vec![out.y, g.x, g.dt, g.a, g.b, g.c, gd, gb])
        }
        v => bail!("ssd: no variant {v}"),
    }
}

impl Kernel for Ssd {
    fn name(&self) -> &'static str {
        "ssd"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "ops::ssd (chunked forward)"),
            Variant::cpu_only(1, "ops::ssd + ssd_backward"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 6]] = match size {
            Size::Full => &[[1, 2048, 24, 64, 128, 256], [1, 512, 24, 64, 128, 256]],
            Size::Quick => &[[1, 300, 4, 16, 32, 64]],
            Size::Tiny => &[[1, 9, 2, 3, 4, 4]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Compute
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let Ok([b, l, h, p, n, q]) = dims(case) else { return Cost::default() };
        let fwd = ops::ssd_forward_flops(b, l, h, p, 1, n, q);
        let flops = if variant == 1 { fwd + ops::ssd_backward_flops(b, l, h, p, 1, n, q) } else { fwd };
        Cost { flops: Some(flops), bytes: None }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [b, l, h, p, n, chunk] = dims(case)?;
        let dt = case.dtype;
        let xs = vec![
            randn(1, &[b, l, h, p], dt)?,
            uniform(2, &[b, l, h], -3.0, 0.0, dt)?,
            uniform(3, &[h], -4.0, -0.5, dt)?,
            randn(4, &[b, l, 1, n], dt)?,
            randn(5, &[b, l, 1, n], dt)?,
            uniform(6, &[h], 0.5, 1.5, dt)?,
            uniform(7, &[h], -0.5, 0.5, dt)?,
            randn(8, &[b, l, h, p], dt)?,
            // The chunk size rides along as a u32 scalar (run() sees only the inputs).
            Tensor::scalar(chunk as u32, &Device::Cpu)?,
        ];
        on_device(&xs, device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let Some(chunk) = inputs.get(8) else { bail!("ssd: expected 9 inputs, got {}", inputs.len()) };
        compute(variant, &inputs[..8], chunk.to_scalar::<u32>()? as usize)
    }

    fn reference(&self, variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let [b, l, h, p, n, q] = dims(case)?;
        let f64s =
            inputs[..8].iter().map(|t| t.to_dtype(DType::F64)).collect::<moeba_tensor::Result<Vec<_>>>()?;
        let a = args(&f64s, q)?;
        let (y, fin) = reference::ssd::ssd(&a)?;
        let rtol = rtol_for(case.dtype, 1e-4);
        let exp = |t: &Tensor| -> Result<Expected> {
            let v = t.to_vec_f64()?;
            // Scale by the largest magnitude: sums of many terms cancel.
            let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            Ok(Expected { scale: Some(vec![m; v.len()]), ..Expected::all(t.dims(), v, rtol, 1e-12) })
        };
        if variant == 0 {
            return Ok(vec![exp(&y)?, exp(&fin)?]);
        }
        let g = if b * h * l * p * n <= 1 << 22 {
            reference::ssd::ssd_backward(&a, &f64s[7], None)?
        } else {
            let out = ops::ssd(&a)?;
            ops::ssd_backward(&a, &out.saved, &f64s[7], None)?
        };
        let (Some(gd), Some(gb)) = (g.d, g.dt_bias) else { bail!("ssd: missing D / dt_bias gradients") };
        [&y, &g.x, &g.dt, &g.a, &g.b, &g.c, &gd, &gb].into_iter().map(exp).collect()
    }

    fn reference_key(&self, variant: usize) -> usize {
        variant
    }
}
