//! Matrix multiplication on the CPU.
//!
//! Paths, chosen at run time:
//! - f32 on x86-64 with AVX2+FMA: moeba's own BLIS-style GEMM ([`avx2`]: packed panels, a 6×16
//!   register-blocked micro-kernel, cache blocking for Zen 3, rayon over row blocks);
//! - everything else (f64, f32 without AVX2, aarch64): the `gemm` crate, which takes row and
//!   column strides for every operand;
//! - bf16/f16: converted to f32, multiplied on the f32 path, rounded once at the end.
//!
//! Operands are never copied to make them contiguous: each matrix is read through its (row,
//! column) strides, so `b.t()` costs nothing. Batch dims broadcast; when `b` is shared by the
//! whole batch and `a`'s batch and row dims merge into one stride (e.g. `x (b, t, d) @ w`), the
//! batch is folded into the rows of a single GEMM. Otherwise small matrices run one per rayon
//! task, big ones one after the other with the GEMM parallelised inside.
//!
//! Measured with `RAYON_NUM_THREADS=2 cargo run --release -p moeba-kernels --example
//! matmul_peak` (AMD EPYC Zen 3 VM, 2 cores, AVX2+FMA, no AVX-512), f32 1024×1024×1024, best of
//! 5-7 runs, three runs on an otherwise idle machine (every number halves while other processes
//! hold a core):
//! - register-only FMA loop on 2 threads (the peak): 199-204 GFLOP/s;
//! - [`avx2::sgemm`] into a preallocated C: 172-178 GFLOP/s (84-89 % of the peak);
//! - `ops::matmul` (avx2 path, output allocation included): 165-177 GFLOP/s (81-87 %); with
//!   `b` a transposed view: 153-174 GFLOP/s (77-86 %); peak and `ops::matmul` measured back to
//!   back in paired rounds: best ratio 82-86 %;
//! - the `gemm` crate 0.19, `Parallelism::Rayon(2)`: 168-184 GFLOP/s (83-90 %, one outlier at
//!   131), single-threaded on a two-way row split: 170-177 GFLOP/s.
//!
//! The issue quoted 106 GFLOP/s (58 %) for the `gemm` crate; on an idle machine it is on par
//! with [`avx2`], and both clear the 60 % bar. [`matmul_portable`] keeps the `gemm` crate path
//! callable everywhere for comparison. Blocking sweep (KC, MC) in [`avx2`]'s module docs.

#[cfg(target_arch = "x86_64")]
pub mod avx2;

use moeba_tensor::{DType, Device, Error, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Work (m·n·k) above which one GEMM is spread over the rayon pool.
const PAR_GEMM_WORK: usize = 1 << 20;

/// Which f32 GEMM [`matmul`] runs on this machine, in words (for benchmark tables and reports).
pub fn f32_path() -> &'static str {
    if fast_f32() {
        "avx2+fma (moeba 6x16 packed micro-kernel)"
    } else {
        "gemm crate"
    }
}

fn fast_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// See [`crate::ops::matmul`].
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_impl(a, b, Path::Auto)
}

/// [`matmul`] with explicit cache blocking for the AVX2 f32 path (tests use tiny blocks to reach
/// every loop of the blocked GEMM with small shapes). Other dtypes ignore `blocking`; without
/// AVX2+FMA this is plain [`matmul`].
#[cfg(target_arch = "x86_64")]
pub fn matmul_with_blocking(a: &Tensor, b: &Tensor, blocking: avx2::Blocking) -> Result<Tensor> {
    matmul_impl(a, b, Path::Blocked(blocking))
}

/// [`matmul`] on the portable path only: the `gemm` crate for f32 and f64, whatever the CPU
/// (what aarch64 and pre-AVX2 machines run; tests and benchmarks compare the paths with it).
pub fn matmul_portable(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_impl(a, b, Path::Portable)
}

/// Which GEMM the f32 path runs.
#[derive(Clone, Copy)]
enum Path {
    /// The fastest available: AVX2 blocked when detected, else the `gemm` crate.
    Auto,
    /// The `gemm` crate.
    Portable,
    /// The AVX2 blocked GEMM with these blocks (the `gemm` crate without AVX2).
    #[cfg(target_arch = "x86_64")]
    Blocked(avx2::Blocking),
}

/// One operand's per-batch storage offsets and in-matrix strides.
struct Operand {
    offsets: Vec<usize>,
    rs: usize,
    cs: usize,
}

/// Offsets of each batch element of `x` (broadcast to `batch`), and its matrix strides.
fn operand(x: &Tensor, batch: &Shape) -> Result<Operand> {
    let r = x.rank();
    let l = x.layout();
    let lead = Layout::new(Shape::new(&l.dims()[..r - 2]), l.strides()[..r - 2].to_vec(), l.offset())?;
    let lead = lead.broadcast_as(batch)?;
    Ok(Operand { offsets: lead.strided_index().collect(), rs: l.strides()[r - 2], cs: l.strides()[r - 1] })
}

/// If `dims`/`strides` (batch dims then the row dim) walk a single arithmetic sequence, its step.
fn merged_stride(dims: &[usize], strides: &[usize]) -> Option<usize> {
    let live: Vec<(usize, usize)> =
        dims.iter().zip(strides).filter(|(&d, _)| d != 1).map(|(&d, &s)| (d, s)).collect();
    let Some(&(_, inner)) = live.last() else { return Some(0) };
    live.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0).then_some(inner)
}

fn matmul_impl(a: &Tensor, b: &Tensor, path: Path) -> Result<Tensor> {
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.dims()[ra - 2], a.dims()[ra - 1]);
    let n = b.dims()[rb - 1];
    if b.dims()[rb - 2] != k {
        return Err(Error::ShapeMismatch { op: "matmul", lhs: a.shape().clone(), rhs: b.shape().clone() });
    }
    let batch = Shape::new(&a.dims()[..ra - 2])
        .broadcast_with("matmul", &Shape::new(&b.dims()[..rb - 2]))
        .map_err(|_| Error::ShapeMismatch { op: "matmul", lhs: a.shape().clone(), rhs: b.shape().clone() })?;
    let mut out_dims = batch.to_vec();
    out_dims.extend([m, n]);

    match a.dtype() {
        DType::F32 => {
            let out = run::<f32>(a, b, &batch, m, n, k, path)?;
            Tensor::from_vec(out, out_dims, &Device::Cpu)
        }
        DType::F64 => {
            let out = run::<f64>(a, b, &batch, m, n, k, path)?;
            Tensor::from_vec(out, out_dims, &Device::Cpu)
        }
        DType::BF16 | DType::F16 => {
            let out = run::<f32>(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?, &batch, m, n, k, path)?;
            Tensor::from_vec(out, out_dims, &Device::Cpu)?.to_dtype(a.dtype())
        }
        dt => Err(Error::dtype("matmul", dt)),
    }
}

/// The element types with a GEMM here.
trait Gemm: WithDType + Default {
    /// `c (m×n row-major, ldc = n) = a · b` for one matrix pair.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: (&[Self], usize, usize, usize),
        b: (&[Self], usize, usize, usize),
        c: &mut [Self],
        path: Path,
        parallel: bool,
    );
}

/// The `gemm` crate on strided operands, `c` row-major with leading dim `n`.
fn gemm_crate<T: WithDType + Default>(
    m: usize,
    n: usize,
    k: usize,
    a: (&[T], usize, usize, usize),
    b: (&[T], usize, usize, usize),
    c: &mut [T],
    parallel: bool,
    one: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(T::default());
        return;
    }
    let (ad, aoff, ars, acs) = a;
    let (bd, boff, brs, bcs) = b;
    assert!(aoff + (m - 1) * ars + (k - 1) * acs < ad.len(), "matmul: lhs out of bounds");
    assert!(boff + (k - 1) * brs + (n - 1) * bcs < bd.len(), "matmul: rhs out of bounds");
    assert!(c.len() >= m * n, "matmul: output too short");
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element the strides reach was bounds-checked above (strides are
    // non-negative, so the extremes are the first and last elements); c holds m×n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            ad.as_ptr().add(aoff),
            acs as isize,
            ars as isize,
            bd.as_ptr().add(boff),
            bcs as isize,
            brs as isize,
            T::default(),
            one,
            false,
            false,
            false,
            par,
        )
    }
}

impl Gemm for f32 {
    fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: (&[f32], usize, usize, usize),
        b: (&[f32], usize, usize, usize),
        c: &mut [f32],
        path: Path,
        parallel: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let blocking = match path {
                Path::Auto => Some(avx2::Blocking::DEFAULT),
                Path::Blocked(b) => Some(b),
                Path::Portable => None,
            };
            if let Some(blocking) = blocking.filter(|_| avx2::available()) {
                let a = avx2::MatRef { data: a.0, off: a.1, rs: a.2, cs: a.3 };
                let b = avx2::MatRef { data: b.0, off: b.1, rs: b.2, cs: b.3 };
                avx2::sgemm(m, n, k, a, b, c, n, blocking, parallel);
                return;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = path;
        gemm_crate(m, n, k, a, b, c, parallel, 1.0f32)
    }
}

impl Gemm for f64 {
    fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: (&[f64], usize, usize, usize),
        b: (&[f64], usize, usize, usize),
        c: &mut [f64],
        _path: Path,
        parallel: bool,
    ) {
        gemm_crate(m, n, k, a, b, c, parallel, 1.0f64)
    }
}

fn cpu_slice<T: WithDType>(x: &Tensor) -> Result<&[T]> {
    x.storage().as_cpu().and_then(|s| s.as_slice::<T>()).ok_or_else(|| Error::Unsupported {
        op: "matmul",
        msg: format!("expected a CPU {} tensor", T::DTYPE),
    })
}

fn run<T: Gemm>(
    a: &Tensor,
    b: &Tensor,
    batch: &Shape,
    m: usize,
    n: usize,
    k: usize,
    path: Path,
) -> Result<Vec<T>> {
    let nb = batch.elem_count();
    let mut out = vec![T::default(); nb * m * n];
    if out.is_empty() {
        return Ok(out);
    }
    let (ad, bd) = (cpu_slice::<T>(a)?, cpu_slice::<T>(b)?);
    let (ao, bo) = (operand(a, batch)?, operand(b, batch)?);

    // Fold the batch into the rows when b is the same matrix for every batch element and a's
    // batch and row dims form one stride: one big GEMM instead of many small ones.
    if nb > 1 && bo.offsets.iter().all(|&o| o == bo.offsets[0]) {
        let la = a.layout().broadcast_as(batch.dims().iter().copied().chain([m, k]).collect::<Vec<_>>())?;
        let r = la.dims().len();
        if let Some(rs) = merged_stride(&la.dims()[..r - 1], &la.strides()[..r - 1]) {
            let mm = nb * m;
            let parallel = mm * n * k >= PAR_GEMM_WORK;
            T::gemm(
                mm,
                n,
                k,
                (ad, la.offset(), rs, ao.cs),
                (bd, bo.offsets[0], bo.rs, bo.cs),
                &mut out,
                path,
                parallel,
            );
            return Ok(out);
        }
    }

    let work = m * n * k;
    let one = |(i, c): (usize, &mut [T]), parallel: bool| {
        T::gemm(
            m,
            n,
            k,
            (ad, ao.offsets[i], ao.rs, ao.cs),
            (bd, bo.offsets[i], bo.rs, bo.cs),
            c,
            path,
            parallel,
        )
    };
    if work >= PAR_GEMM_WORK || nb == 1 {
        let parallel = work >= PAR_GEMM_WORK;
        out.chunks_mut(m * n).enumerate().for_each(|x| one(x, parallel));
    } else {
        // Small matrices: one per task, grouped so each task has at least ~PAR_GEMM_WORK/4 work.
        let min_len = (PAR_GEMM_WORK / 4 / work.max(1)).max(1);
        out.par_chunks_mut(m * n).enumerate().with_min_len(min_len).for_each(|x| one(x, false));
    }
    Ok(out)
}
