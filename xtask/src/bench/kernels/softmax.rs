//! `softmax` over the last dim of a `(rows, cols)` matrix; case dims `[rows, cols]`.
//!
//! Variants:
//! - 0: `ops::softmax(x, 1)` on a contiguous input;
//! - 1: the same on the transposed view of a contiguous `(cols, rows)` matrix (strided rows).
//!
//! Reference: per row in f64, `e^(x - max) / Σ e^(x - max)`. Counted traffic: 8 bytes per f32
//! element (one read, one write), what a single-pass kernel needs.

use anyhow::{bail, Result};
use moeba_kernels::ops;
use moeba_tensor::{Device, Tensor};

use super::{on_device, rows_cols};
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The softmax benchmark (see the module docs).
pub struct Softmax;

impl Kernel for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![Variant::any(0, "ops::softmax, last dim"), Variant::any(1, "ops::softmax, transposed view")]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 2]] = match size {
            Size::Full => &[[4096, 4096], [16384, 256], [256, 32000]],
            Size::Quick => &[[256, 1000], [33, 4096]],
            Size::Tiny => &[[5, 37], [3, 1]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Memory
    }

    fn cost(&self, _variant: usize, case: &Case) -> Cost {
        let n = case.dims.iter().product::<usize>() as f64;
        Cost { flops: None, bytes: Some(2.0 * n * case.dtype.size_in_bytes() as f64) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let (r, c) = rows_cols("softmax", case)?;
        // Spread wide enough that the max subtraction matters and outputs span many magnitudes.
        let x = Tensor::randn(6, [r, c].as_slice(), 0.0, 3.0, case.dtype, &Device::Cpu)?;
        let xt = x.t()?.contiguous()?;
        on_device(&[x, xt], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x, xt] = inputs else { bail!("softmax: expected 2 inputs, got {}", inputs.len()) };
        Ok(vec![match variant {
            0 => ops::softmax(x, 1)?,
            1 => ops::softmax(&xt.t()?, 1)?,
            v => bail!("softmax: no variant {v}"),
        }])
    }

    fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let (_, c) = rows_cols("softmax", case)?;
        let x = inputs[0].to_vec_f64()?;
        let mut values = Vec::with_capacity(x.len());
        for row in x.chunks(c.max(1)) {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
            let s: f64 = e.iter().sum();
            values.extend(e.iter().map(|v| v / s));
        }
        Ok(vec![Expected::all(&case.dims, values, rtol_for(case.dtype, 1e-5), 1e-12)])
    }
}
