//! `matmul`: f32 GEMM `a (m, k) @ b (k, n)`; case dims `[m, k, n]`.
//!
//! Variants:
//! - 0: `moeba_kernels::ops::matmul` on contiguous operands (what moeba's layers call);
//! - 1: `ops::matmul` with `b` passed as the transposed view of a contiguous `(n, k)` matrix
//!   (read through its strides, as `x @ w.t()` in a linear layer);
//! - 2: the `gemm` crate called directly (`Parallelism::Rayon` on every thread), a peer row
//!   (CPU, f32 only).
//!
//! Reference: a plain f64 dot product per output element, over every row for small shapes and
//! over 64 evenly spread rows (plus the last) above 512³, with the tolerance scaled by
//! `‖a_i‖·‖b_j‖` (the Cauchy–Schwarz bound of `Σ|a_ip b_pj|`).

use anyhow::{bail, Result};
use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Tensor};
use rayon::prelude::*;

use super::{on_device, randn};
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The matmul benchmark (see the module docs).
pub struct Matmul;

/// Work above which the reference checks a sample of rows instead of all of them.
const FULL_REFERENCE_WORK: usize = 1 << 27;

impl Kernel for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::any(0, "ops::matmul"),
            Variant::any(1, "ops::matmul, b = transposed view"),
            Variant::cpu_only(2, "gemm crate 0.19 (peer)"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 3]] = match size {
            Size::Full => &[[256, 256, 256], [1024, 1024, 1024], [2048, 2048, 2048], [2048, 768, 3072]],
            Size::Quick => &[[128, 128, 128], [256, 256, 256], [100, 70, 130]],
            Size::Tiny => &[[8, 5, 7], [33, 17, 19]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Compute
    }

    fn cost(&self, _variant: usize, case: &Case) -> Cost {
        let [m, k, n] = mkn(case).unwrap_or([0; 3]).map(|d| d as f64);
        let elem = case.dtype.size_in_bytes() as f64;
        Cost { flops: Some(2.0 * m * n * k), bytes: Some(elem * (m * k + k * n + m * n)) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [m, k, n] = mkn(case)?;
        let a = randn(1, &[m, k], case.dtype)?;
        let b = randn(2, &[k, n], case.dtype)?;
        let bt = b.t()?.contiguous()?;
        on_device(&[a, b, bt], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [a, b, bt] = inputs else { bail!("matmul: expected 3 inputs, got {}", inputs.len()) };
        Ok(vec![match variant {
            0 => ops::matmul(a, b)?,
            1 => ops::matmul(a, &bt.t()?)?,
            2 => gemm_crate(a, b)?,
            v => bail!("matmul: no variant {v}"),
        }])
    }

    fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let [m, k, n] = mkn(case)?;
        let av = inputs[0].to_vec_f64()?;
        let bv = inputs[1].to_vec_f64()?;
        let rows: Vec<usize> = if m * k * n <= FULL_REFERENCE_WORK || m <= 65 {
            (0..m).collect()
        } else {
            let mut r: Vec<usize> = (0..64).map(|i| i * m / 64).collect();
            r.push(m - 1);
            r.dedup();
            r
        };
        let col_norm: Vec<f64> =
            (0..n).map(|j| (0..k).map(|p| bv[p * n + j] * bv[p * n + j]).sum::<f64>().sqrt()).collect();
        let per_row: Vec<(Vec<f64>, Vec<f64>)> = rows
            .par_iter()
            .map(|&i| {
                let arow = &av[i * k..(i + 1) * k];
                let mut c = vec![0.0f64; n];
                for (p, &x) in arow.iter().enumerate() {
                    for (cj, &y) in c.iter_mut().zip(&bv[p * n..(p + 1) * n]) {
                        *cj += x * y;
                    }
                }
                let an = arow.iter().map(|x| x * x).sum::<f64>().sqrt();
                (c, col_norm.iter().map(|bn| an * bn).collect())
            })
            .collect();
        let indices = rows.iter().flat_map(|&i| (0..n).map(move |j| i * n + j)).collect();
        let (values, scale): (Vec<Vec<f64>>, Vec<Vec<f64>>) = per_row.into_iter().unzip();
        Ok(vec![Expected {
            dims: vec![m, n],
            values: values.concat(),
            indices: Some(indices),
            scale: Some(scale.concat()),
            rtol: rtol_for(case.dtype, 1e-5),
            atol: 0.0,
        }])
    }
}

fn mkn(case: &Case) -> Result<[usize; 3]> {
    Ok([case.dim("matmul", 0)?, case.dim("matmul", 1)?, case.dim("matmul", 2)?])
}

/// `a @ b` by the `gemm` crate on contiguous f32 CPU operands.
fn gemm_crate(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != DType::F32 || !a.device().is_cpu() || !a.is_contiguous() || !b.is_contiguous() {
        bail!("matmul variant 2 (gemm crate) takes contiguous f32 CPU operands");
    }
    let (m, k, n) = (a.dims()[0], a.dims()[1], b.dims()[1]);
    let (ad, bd) = (a.cpu_data::<f32>()?, b.cpu_data::<f32>()?);
    if ad.len() != m * k || bd.len() != k * n {
        bail!("matmul variant 2: operands of {:?} and {:?} do not chain", a.dims(), b.dims());
    }
    let mut c = vec![0f32; m * n];
    if m > 0 && n > 0 && k > 0 {
        let threads = rayon::current_num_threads().max(1);
        // SAFETY: a is m×k, b is k×n and c is m×n, all row-major and contiguous (checked above),
        // so every element the strides below reach is in bounds.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                ad.as_ptr(),
                1,
                k as isize,
                bd.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
    }
    Ok(Tensor::from_vec(c, (m, n), &Device::Cpu)?)
}
