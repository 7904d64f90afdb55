//! Elementwise ops: `add` and the unary functions `exp` and `silu`; case dims `[rows, cols]`.
//!
//! `add` variants (both compute `a + b` for the same logical `b`, a row repeated down the
//! matrix):
//! - 0: `ops::add(a, b)` with `b` materialised, both contiguous: 12 bytes per f32 element;
//! - 1: `ops::add(a, row)` with `row (cols)` broadcast: 8 bytes per element.
//!
//! Unary variants:
//! - 0: `ops::unary` on a contiguous input;
//! - 1: `ops::unary` on the transposed view of a contiguous `(cols, rows)` matrix (strided reads).
//!
//! References: the same function in f64, elementwise.

use anyhow::{bail, Result};
use moeba_kernels::ops::{self, UnaryOp};
use moeba_tensor::{Device, Tensor};

use super::{on_device, randn, rows_cols, uniform};
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

fn elementwise_cases(size: Size) -> Vec<Case> {
    let dims: &[[usize; 2]] = match size {
        Size::Full => &[[4096, 4096], [1024, 1024]],
        Size::Quick => &[[512, 1024], [100, 37]],
        Size::Tiny => &[[7, 33], [1, 5]],
    };
    dims.iter().map(|d| Case::f32(d)).collect()
}

/// `a + b` (see the module docs).
pub struct Add;

impl Kernel for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![Variant::any(0, "ops::add, contiguous"), Variant::any(1, "ops::add, broadcast row")]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        elementwise_cases(size)
    }

    fn bound(&self) -> Bound {
        Bound::Memory
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let (r, c) = rows_cols("add", case).unwrap_or((0, 0));
        let (n, elem) = ((r * c) as f64, case.dtype.size_in_bytes() as f64);
        let bytes = if variant == 1 { elem * (2.0 * n + c as f64) } else { elem * 3.0 * n };
        Cost { flops: Some(n), bytes: Some(bytes) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let (r, c) = rows_cols("add", case)?;
        let a = randn(3, &[r, c], case.dtype)?;
        let row = randn(4, &[c], case.dtype)?;
        let b = row.broadcast_as((r, c))?.contiguous()?;
        on_device(&[a, b, row], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [a, b, row] = inputs else { bail!("add: expected 3 inputs, got {}", inputs.len()) };
        Ok(vec![match variant {
            0 => ops::add(a, b)?,
            1 => ops::add(a, row)?,
            v => bail!("add: no variant {v}"),
        }])
    }

    fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let (a, b) = (inputs[0].to_vec_f64()?, inputs[1].to_vec_f64()?);
        let values = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        // One rounding of the exact sum: half an ulp.
        Ok(vec![Expected::all(&case.dims, values, rtol_for(case.dtype, 1e-6), 0.0)])
    }
}

/// A unary op (see the module docs).
pub struct Unary {
    op: UnaryOp,
    reference: fn(f64) -> f64,
    /// Inputs are drawn uniformly from this range.
    range: (f64, f64),
    rtol: f64,
    atol: f64,
}

impl Unary {
    /// `e^x` on inputs in [-10, 10), ~1 ulp.
    pub fn exp() -> Unary {
        Unary { op: UnaryOp::Exp, reference: f64::exp, range: (-10.0, 10.0), rtol: 1e-6, atol: 0.0 }
    }

    /// `x·σ(x)` on inputs in [-10, 10).
    pub fn silu() -> Unary {
        Unary {
            op: UnaryOp::Silu,
            reference: |x| x / (1.0 + (-x).exp()),
            range: (-10.0, 10.0),
            rtol: 1e-5,
            atol: 1e-7,
        }
    }
}

impl Kernel for Unary {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn variants(&self) -> Vec<Variant> {
        vec![Variant::any(0, "ops::unary, contiguous"), Variant::any(1, "ops::unary, transposed view")]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        elementwise_cases(size)
    }

    fn bound(&self) -> Bound {
        Bound::Memory
    }

    fn cost(&self, _variant: usize, case: &Case) -> Cost {
        let n = case.dims.iter().product::<usize>() as f64;
        Cost { flops: None, bytes: Some(2.0 * n * case.dtype.size_in_bytes() as f64) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let (r, c) = rows_cols(self.name(), case)?;
        let x = uniform(5, &[r, c], self.range.0, self.range.1, case.dtype)?;
        let xt = x.t()?.contiguous()?;
        on_device(&[x, xt], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x, xt] = inputs else { bail!("{}: expected 2 inputs, got {}", self.name(), inputs.len()) };
        Ok(vec![match variant {
            0 => ops::unary(x, self.op)?,
            1 => ops::unary(&xt.t()?, self.op)?,
            v => bail!("{}: no variant {v}", self.name()),
        }])
    }

    fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let values = inputs[0].to_vec_f64()?.into_iter().map(self.reference).collect();
        Ok(vec![Expected::all(&case.dims, values, rtol_for(case.dtype, self.rtol), self.atol)])
    }
}
