//! The contract a benchmarked kernel fulfils ([`Kernel`]) and the pieces it is built from.
//!
//! A kernel is one op (matmul, add, softmax, …) with numbered *variants*: alternative
//! implementations, or the same implementation on differently laid-out inputs, that all compute
//! the same function of the same logical inputs. For every [`Case`] (a shape and a dtype) the
//! harness
//! 1. builds the inputs once with [`Kernel::setup`], on the device being measured;
//! 2. computes the expected outputs with [`Kernel::reference`] (plain host code, usually f64);
//! 3. runs each variant once and compares its outputs with [`Expected::compare`]: a variant
//!    outside the tolerance is reported FAILED and never timed;
//! 4. times the variants that passed (see [`super::timing`]) and turns [`Kernel::cost`] into
//!    GFLOP/s and GB/s.
//!
//! Adding a kernel: implement [`Kernel`] in a new file under `kernels/` and list it in
//! [`super::kernels::all`].

use anyhow::{bail, Result};
use moeba_tensor::{DType, Device, Tensor};

/// How large the benchmark shapes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// The full list: the shapes the results are quoted on.
    Full,
    /// Small shapes and few repeats: a smoke test that runs in seconds (CI).
    Quick,
    /// Tiny shapes for the harness's own unit tests.
    Tiny,
}

/// Which ceiling a kernel's speed is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Arithmetic: the FMA peak (GFLOP/s).
    Compute,
    /// Memory traffic: the copy bandwidth (GB/s).
    Memory,
}

/// One benchmark case: dims the kernel interprets (e.g. `[m, k, n]` for matmul) and a dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// The kernel-specific dims.
    pub dims: Vec<usize>,
    /// The element type of the inputs.
    pub dtype: DType,
}

impl Case {
    /// An f32 case.
    pub fn f32(dims: &[usize]) -> Case {
        Case { dims: dims.to_vec(), dtype: DType::F32 }
    }

    /// The dims joined by `x`, as printed in the table and written to JSON.
    pub fn label(&self) -> String {
        self.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
    }

    /// The `i`-th dim, or an error naming the kernel (cases come from the kernel itself, so this
    /// only fails on a bug in a kernel's case list).
    pub fn dim(&self, kernel: &str, i: usize) -> Result<usize> {
        match self.dims.get(i) {
            Some(&d) => Ok(d),
            None => bail!("{kernel}: case {} has no dim {i}", self.label()),
        }
    }
}

/// One variant of a kernel.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Its number, as selected by `--variant N`.
    pub id: usize,
    /// What it runs, in a few words.
    pub name: &'static str,
    /// Whether it can run on a CUDA device (CPU-only peers such as the `gemm` crate cannot).
    pub cuda: bool,
}

impl Variant {
    /// A variant that runs on every device.
    pub const fn any(id: usize, name: &'static str) -> Variant {
        Variant { id, name, cuda: true }
    }

    /// A variant that runs on the CPU only.
    pub const fn cpu_only(id: usize, name: &'static str) -> Variant {
        Variant { id, name, cuda: false }
    }
}

/// The work of one call: floating-point operations and bytes moved (the minimum traffic: each
/// input read once, each output written once). `None` where the figure means nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Floating-point operations (an FMA counts 2).
    pub flops: Option<f64>,
    /// Bytes read plus bytes written.
    pub bytes: Option<f64>,
}

/// One expected output: values computed by a plain reference, and the tolerance a variant's
/// output must meet.
///
/// Element `i` (of the output in row-major order, or the `i`-th of [`Expected::indices`]) passes
/// when `|got - want| <= atol + rtol * scale`, where `scale` is [`Expected::scale`]`[i]` if given
/// (e.g. `Σ|a||b|` for a dot product, so that cancellation does not make the test impossible)
/// and `|want|` otherwise. NaN or infinity where the reference is finite fails.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The output's dims.
    pub dims: Vec<usize>,
    /// The expected values (all elements, or those at `indices`).
    pub values: Vec<f64>,
    /// Row-major indices into the output that `values` describe (`None`: every element). Lets an
    /// expensive reference check a sample (e.g. some rows of a large matmul).
    pub indices: Option<Vec<usize>>,
    /// Per-element error scale (`None`: `|want|`).
    pub scale: Option<Vec<f64>>,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

/// The outcome of comparing an output with its [`Expected`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Largest `|got - want|`.
    pub max_abs_err: f64,
    /// Largest `|got - want| / (atol + rtol * scale)`: at most 1 passes.
    pub worst_ratio: f64,
    /// Index (row-major, into the output) of the worst element.
    pub worst_index: usize,
    /// Number of elements compared.
    pub checked: usize,
}

impl Comparison {
    /// Whether every compared element was within tolerance.
    pub fn passed(&self) -> bool {
        self.worst_ratio <= 1.0
    }

    /// Merges the comparisons of several outputs (the worst wins).
    pub fn merge(self, other: Comparison) -> Comparison {
        let (worst_ratio, worst_index) = if other.worst_ratio > self.worst_ratio {
            (other.worst_ratio, other.worst_index)
        } else {
            (self.worst_ratio, self.worst_index)
        };
        Comparison {
            max_abs_err: self.max_abs_err.max(other.max_abs_err),
            worst_ratio,
            worst_index,
            checked: self.checked + other.checked,
        }
    }
}

impl Expected {
    /// Every element of an output of `dims`, scaled by `|want|`.
    pub fn all(dims: &[usize], values: Vec<f64>, rtol: f64, atol: f64) -> Expected {
        Expected { dims: dims.to_vec(), values, indices: None, scale: None, rtol, atol }
    }

    /// Compares `got` (any device, any float dtype) with the expected values. Errors (rather
    /// than failing the comparison) only when the shapes disagree or the data cannot be read.
    pub fn compare(&self, got: &Tensor) -> Result<Comparison> {
        if got.dims() != self.dims.as_slice() {
            bail!("output has shape {:?}, the reference {:?}", got.dims(), self.dims);
        }
        let g = got.to_vec_f64()?;
        let n = self.indices.as_ref().map_or(g.len(), |ix| ix.len());
        if self.values.len() != n || self.scale.as_ref().is_some_and(|s| s.len() != n) {
            bail!("reference holds {} values for {n} compared elements", self.values.len());
        }
        let mut c = Comparison { max_abs_err: 0.0, worst_ratio: 0.0, worst_index: 0, checked: n };
        for i in 0..n {
            let at = self.indices.as_ref().map_or(i, |ix| ix[i]);
            let Some(&gv) = g.get(at) else { bail!("reference index {at} outside the output") };
            let want = self.values[i];
            let scale = self.scale.as_ref().map_or(want.abs(), |s| s[i]);
            let err = (gv - want).abs();
            let allowed = self.atol + self.rtol * scale;
            let ratio = if gv == want {
                0.0
            } else if err.is_nan() || err.is_infinite() {
                f64::INFINITY
            } else if allowed > 0.0 {
                err / allowed
            } else {
                f64::INFINITY
            };
            if err > c.max_abs_err || err.is_nan() {
                c.max_abs_err = if err.is_nan() { f64::INFINITY } else { err };
            }
            if ratio > c.worst_ratio {
                c.worst_ratio = ratio;
                c.worst_index = at;
            }
        }
        Ok(c)
    }
}

/// A benchmarked op: its variants, its cases, how to build inputs, run a variant, compute the
/// expected result, and count the work. See the module docs for how the harness uses it.
pub trait Kernel: Sync {
    /// The op's name: the `KERNEL` argument of `cargo xtask bench` and the `op` column.
    fn name(&self) -> &'static str;

    /// The variants, numbered from 0; variant 0 is what moeba uses.
    fn variants(&self) -> Vec<Variant>;

    /// The cases measured at `size`.
    fn cases(&self, size: Size) -> Vec<Case>;

    /// Which ceiling the op is judged against.
    fn bound(&self) -> Bound;

    /// The work of one call of `variant` on `case`.
    fn cost(&self, variant: usize, case: &Case) -> Cost;

    /// Builds the inputs of `case` on `device` (everything any variant needs; deterministic).
    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>>;

    /// Runs `variant` once on the inputs from [`Kernel::setup`] and returns its outputs.
    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>>;

    /// The expected outputs of `variant` for the inputs (given on the CPU), from a plain
    /// computation. Called once per [`Kernel::reference_key`], so variants that compute the same
    /// function share it.
    fn reference(&self, variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>>;

    /// Variants with equal keys share one [`Kernel::reference`] result (default: all of them).
    fn reference_key(&self, _variant: usize) -> usize {
        0
    }
}

/// Compares a variant's outputs with the expected ones (same count, each within tolerance).
pub fn compare_all(got: &[Tensor], expected: &[Expected]) -> Result<Comparison> {
    if got.len() != expected.len() {
        bail!("{} outputs, the reference has {}", got.len(), expected.len());
    }
    let mut total = Comparison { max_abs_err: 0.0, worst_ratio: 0.0, worst_index: 0, checked: 0 };
    for (g, e) in got.iter().zip(expected) {
        total = total.merge(e.compare(g)?);
    }
    Ok(total)
}

/// Relative tolerance for `dtype`, given the one that fits f32 (f64 is held to a much tighter
/// bound, bf16/f16 to their 8/11-bit mantissas).
pub fn rtol_for(dtype: DType, f32_rtol: f64) -> f64 {
    match dtype {
        DType::F64 => f32_rtol * 1e-8,
        DType::BF16 => f32_rtol.max(1e-2),
        DType::F16 => f32_rtol.max(2e-3),
        _ => f32_rtol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_checks_tolerance_nan_and_shape() -> Result<()> {
        let cpu = Device::Cpu;
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], 3, &cpu)?;
        let ok = Expected::all(&[3], vec![1.0, 2.0, 3.0 + 1e-7], 1e-6, 0.0).compare(&t)?;
        assert!(ok.passed(), "{ok:?}");
        let bad = Expected::all(&[3], vec![1.0, 2.5, 3.0], 1e-6, 0.0).compare(&t)?;
        assert!(!bad.passed());
        assert_eq!(bad.worst_index, 1);
        assert!((bad.max_abs_err - 0.5).abs() < 1e-12);
        let nan = Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0], 3, &cpu)?;
        assert!(!Expected::all(&[3], vec![1.0, 2.0, 3.0], 1.0, 1.0).compare(&nan)?.passed());
        assert!(Expected::all(&[1, 3], vec![1.0, 2.0, 3.0], 1e-6, 0.0).compare(&t).is_err());
        // A sample of indices with an explicit scale.
        let e = Expected {
            dims: vec![3],
            values: vec![3.1],
            indices: Some(vec![2]),
            scale: Some(vec![10.0]),
            rtol: 0.02,
            atol: 0.0,
        };
        let c = e.compare(&t)?;
        assert!(c.passed() && c.checked == 1 && c.worst_index == 2, "{c:?}");
        Ok(())
    }
}
