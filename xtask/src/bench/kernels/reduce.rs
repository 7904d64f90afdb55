//! `sum` reductions of a `(rows, cols)` matrix; case dims `[rows, cols]`.
//!
//! Variants (each its own function, hence its own reference):
//! - 0: `ops::sum(x, [1])`: over the last (contiguous) dim, one total per row;
//! - 1: `ops::sum(x, [0])`: over the first (strided) dim, one total per column;
//! - 2: `ops::sum_all(x)`: every element.
//!
//! Reference: f64 sums, with the tolerance scaled by `Σ|x|` of the summed elements (the error
//! bound of any summation order), so a kernel that drops or repeats one element fails.

use anyhow::{bail, Result};
use moeba_kernels::ops;
use moeba_tensor::{Device, Tensor};

use super::{on_device, rows_cols};
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The sum benchmark (see the module docs).
pub struct Sum;

impl Kernel for Sum {
    fn name(&self) -> &'static str {
        "sum"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::any(0, "ops::sum, last dim"),
            Variant::any(1, "ops::sum, first dim"),
            Variant::any(2, "ops::sum_all"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 2]] = match size {
            Size::Full => &[[4096, 4096], [64, 262144]],
            Size::Quick => &[[512, 1024], [3, 10007]],
            Size::Tiny => &[[7, 33], [1, 1]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Memory
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let (r, c) = rows_cols("sum", case).unwrap_or((0, 0));
        let out = match variant {
            0 => r,
            1 => c,
            _ => 1,
        };
        let n = (r * c) as f64;
        Cost { flops: Some(n), bytes: Some((n + out as f64) * case.dtype.size_in_bytes() as f64) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let (r, c) = rows_cols("sum", case)?;
        // A nonzero mean, so that totals grow with the length and rounding errors show.
        let x = Tensor::randn(7, [r, c].as_slice(), 0.5, 1.0, case.dtype, &Device::Cpu)?;
        on_device(&[x], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x] = inputs else { bail!("sum: expected 1 input, got {}", inputs.len()) };
        Ok(vec![match variant {
            0 => ops::sum(x, &[1], false)?,
            1 => ops::sum(x, &[0], false)?,
            2 => ops::sum_all(x)?,
            v => bail!("sum: no variant {v}"),
        }])
    }

    fn reference_key(&self, variant: usize) -> usize {
        variant
    }

    fn reference(&self, variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let (r, c) = rows_cols("sum", case)?;
        let x = inputs[0].to_vec_f64()?;
        let at = |i: usize, j: usize| x[i * c + j];
        let (dims, groups): (Vec<usize>, Vec<Vec<f64>>) = match variant {
            0 => (vec![r], (0..r).map(|i| (0..c).map(|j| at(i, j)).collect()).collect()),
            1 => (vec![c], (0..c).map(|j| (0..r).map(|i| at(i, j)).collect()).collect()),
            2 => (vec![], vec![x.clone()]),
            v => bail!("sum: no variant {v}"),
        };
        let values = groups.iter().map(|g| g.iter().sum()).collect();
        let scale = groups.iter().map(|g| g.iter().map(|v| v.abs()).sum()).collect();
        Ok(vec![Expected {
            dims,
            values,
            indices: None,
            scale: Some(scale),
            rtol: rtol_for(case.dtype, 2e-5),
            atol: 0.0,
        }])
    }
}
