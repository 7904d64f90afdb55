//! `copy`: making a strided view contiguous; case dims `[rows, cols]`.
//!
//! Variants (both copy the same logical matrix):
//! - 0: `ops::contiguous` of a narrowed view (`(rows, cols + 1)` storage, the last column cut
//!   off): contiguous runs of `cols` elements, as a memcpy per row;
//! - 1: `ops::contiguous` of the transposed view of a contiguous `(cols, rows)` matrix: a gather.
//!
//! Reference: the view's values read on the host; the copy must be exact. Counted traffic: 8
//! bytes per f32 element (read + write), the same as the copy-bandwidth ceiling.

use anyhow::{bail, Result};
use moeba_kernels::ops;
use moeba_tensor::{Device, Tensor};

use super::{on_device, randn, rows_cols};
use crate::bench::harness::{Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The copy benchmark (see the module docs).
pub struct Copy;

impl Kernel for Copy {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::any(0, "ops::contiguous, narrowed rows"),
            Variant::any(1, "ops::contiguous, transposed"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 2]] = match size {
            Size::Full => &[[4096, 4096]],
            Size::Quick => &[[512, 1024]],
            Size::Tiny => &[[7, 33]],
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
        let (r, c) = rows_cols("copy", case)?;
        let wide = randn(8, &[r, c + 1], case.dtype)?;
        let xt = wide.narrow(1, 0, c)?.t()?.contiguous()?;
        on_device(&[wide, xt], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [wide, xt] = inputs else { bail!("copy: expected 2 inputs, got {}", inputs.len()) };
        let c = wide.dims()[1] - 1;
        Ok(vec![match variant {
            0 => ops::contiguous(&wide.narrow(1, 0, c)?)?,
            1 => ops::contiguous(&xt.t()?)?,
            v => bail!("copy: no variant {v}"),
        }])
    }

    fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let (_, c) = rows_cols("copy", case)?;
        // Read the contiguous `(rows, cols + 1)` storage by index, not through a strided copy.
        let wide = inputs[0].to_vec_f64()?;
        let values = wide.chunks(c + 1).flat_map(|row| row[..c].iter().copied()).collect();
        Ok(vec![Expected::all(&case.dims, values, 0.0, 0.0)])
    }
}
