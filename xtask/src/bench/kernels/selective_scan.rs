//! The Mamba-1 selective scan (f32); case dims `[b, d, n, l]`, the inputs of the PyTorch peer's
//! W1 (`../shared/peers/torch_bench.py`: delta = N(0, 0.5²) plus an inverse-softplus dt bias,
//! A = -exp(U(0, ln 16)), D in [0.5, 1.5), softplus, D skip, silu(z) gate; one group of B, C).
//!
//! Variants:
//! - 0: `ops::selective_scan` on channel-last inputs (the layout the Mamba block passes);
//! - 1: the same on `(b, d, l)`-contiguous inputs (the peer's layout);
//! - 2: forward + `ops::selective_scan_backward` (channel-last; outputs out and the gradients of
//!   u, delta, A, B, C, D, z, delta_bias).
//!
//! Reference: `reference::selective_scan` (the plain f64 recurrence, and its hand-written
//! backward). Counted work: 17 flops per state update forward (decay = exp as 12 lane ops, two
//! FMAs, one product), about 2.8x that forward+backward (recompute plus the backward's 10 lane
//! ops and stores per update), judged against the FMA peak.

use anyhow::{bail, Result};
use moeba_kernels::ops::{self, SelectiveScanArgs};
use moeba_kernels::reference;
use moeba_tensor::{DType, Device, Tensor};

use super::{on_device, randn, uniform};
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The selective scan benchmark (see the module docs).
pub struct SelectiveScan;

fn dims(case: &Case) -> Result<[usize; 4]> {
    let mut d = [0; 4];
    for (i, v) in d.iter_mut().enumerate() {
        *v = case.dim("selective_scan", i)?;
    }
    Ok(d)
}

/// Inputs: `[u, delta, z]` channel-last, then `[u, delta, z]` contiguous, `A, B, C, D, bias, gy`.
fn args(inputs: &[Tensor], channel_last: bool) -> Result<SelectiveScanArgs<'_>> {
    let [u, delta, z, uc, deltac, zc, a, b, c, d, bias, _gy] = inputs else {
        bail!("selective_scan: expected 12 inputs, got {}", inputs.len())
    };
    let (u, delta, z) = if channel_last { (u, delta, z) } else { (uc, deltac, zc) };
    Ok(SelectiveScanArgs {
        u,
        delta,
        a,
        b,
        c,
        d: Some(d),
        z: Some(z),
        delta_bias: Some(bias),
        delta_softplus: true,
        initial_state: None,
        seq_idx: None,
    })
}

fn compute(variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let a = args(inputs, variant != 1)?;
    let out = ops::selective_scan(&a)?;
    match variant {
        0 | 1 => Ok(vec![out.out]),
        2 => {
            let g = ops::selective_scan_backward(&a, &out, &inputs[11], None)?;
            let (Some(gd), Some(gz), Some(gb)) = (g.d, g.z, g.delta_bias) else {
                bail!("selective_scan: missing D / z / delta_bias gradients")
            };
            Ok(vec![out.out, g.u, g.delta, g.a, g.b, g.c, gd, gz, gb])
        }
        v => bail!("selective_scan: no variant {v}"),
    }
}

impl Kernel for SelectiveScan {
    fn name(&self) -> &'static str {
        "selective_scan"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "ops::selective_scan, channel-last"),
            Variant::cpu_only(1, "ops::selective_scan, (b, d, l) contiguous"),
            Variant::cpu_only(2, "selective_scan + selective_scan_backward"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 4]] = match size {
            Size::Full => &[[1, 1536, 16, 2048], [1, 1536, 16, 512]],
            Size::Quick => &[[1, 96, 16, 200], [2, 13, 5, 37]],
            Size::Tiny => &[[1, 9, 3, 11], [1, 1, 1, 1]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Compute
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let updates = case.dims.iter().product::<usize>() as f64;
        let per = if variant == 2 { 17.0 * 2.8 } else { 17.0 };
        Cost { flops: Some(per * updates), bytes: None }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [b, d, n, l] = dims(case)?;
        let dt = case.dtype;
        let cl = |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.contiguous()?.transpose(1, 2)?) };
        let u = randn(1, &[b, d, l], dt)?;
        let delta = Tensor::randn(2, [b, d, l].as_slice(), 0.0, 0.5, dt, &Device::Cpu)?;
        let z = randn(7, &[b, d, l], dt)?;
        let a_log = uniform(3, &[d, n], 0.0, 16f64.ln(), DType::F64)?;
        let a: Vec<f64> = a_log.to_vec::<f64>()?.iter().map(|v| -v.exp()).collect();
        let a = Tensor::from_vec(a, (d, n), &Device::Cpu)?.to_dtype(dt)?;
        let dts = uniform(8, &[d], 1e-3f64.ln(), 0.1f64.ln(), DType::F64)?.to_vec::<f64>()?;
        let bias: Vec<f64> = dts.iter().map(|v| v.exp()).map(|x| x + (-(-x).exp_m1()).ln()).collect();
        let bias = Tensor::from_vec(bias, d, &Device::Cpu)?.to_dtype(dt)?;
        let inputs = vec![
            cl(&u)?,
            cl(&delta)?,
            cl(&z)?,
            u,
            delta,
            z,
            a,
            randn(4, &[b, 1, n, l], dt)?,
            randn(5, &[b, 1, n, l], dt)?,
            uniform(6, &[d], 0.5, 1.5, dt)?,
            bias,
            randn(9, &[b, d, l], dt)?,
        ];
        // The views are rebuilt on the device (on_device makes them contiguous).
        let mut dev = on_device(&inputs, device)?;
        for i in 0..3 {
            dev[i] = cl(&dev[i])?;
        }
        Ok(dev)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        compute(variant, inputs)
    }

    fn reference(&self, variant: usize, _case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let a = args(inputs, true)?;
        let rtol = rtol_for(inputs[0].dtype(), 1e-4);
        // Errors are judged against the largest magnitude of each output (long recurrences).
        let expect = |t: &Tensor| -> Result<Expected> {
            let v = t.to_vec_f64()?;
            let m = v.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
            Ok(Expected { scale: Some(vec![m; v.len()]), ..Expected::all(t.dims(), v, rtol, 1e-12) })
        };
        let (out, _) = reference::selective_scan::selective_scan(&a)?;
        if variant != 2 {
            return Ok(vec![expect(&out)?]);
        }
        let g = reference::selective_scan::selective_scan_backward(&a, &inputs[11], None)?;
        let (Some(gd), Some(gz), Some(gb)) = (g.d, g.z, g.delta_bias) else {
            bail!("selective_scan: reference lacks D / z / delta_bias gradients")
        };
        [out, g.u, g.delta, g.a, g.b, g.c, gd, gz, gb].iter().map(expect).collect()
    }

    fn reference_key(&self, variant: usize) -> usize {
        usize::from(variant == 2)
    }
}
