//! CPU grouped expert GEMM: every expert's contiguous group of rows times that expert's weight.
//!
//! f32 on x86-64 with AVX2+FMA runs on the packed 6×16 micro-kernel of `cpu::matmul::avx2`,
//! reading every operand through its strides (the weight `w[e]ᵀ` is a transposed view, never
//! copied), writing each group's output rows in place. Other dtypes and CPUs use
//! `cpu::matmul::matmul` per expert on views. Empty groups cost nothing (their weight gradient
//! is zero).
//!
//! Scheduling: an expert whose GEMM is at least a quarter of a thread's fair share of the call is run
//! parallel inside (its weight packed once, shared by the threads, row blocks spread over the
//! pool), one such expert after the other. The others run as independent single-threaded GEMMs
//! (each packing its expert's weight once), largest first, several at once: uniform loads become
//! one balanced task per expert with no fork-join inside, and a skewed load (one big expert,
//! many tiny ones) keeps every core busy on both kinds.
//!
//! Measured (2-core Zen 3 VM, AVX2+FMA path, `RAYON_NUM_THREADS=2`, release, f32; grouped vs
//! `ops::matmul` of equal FLOPs, best of 8 paired rounds in one process) while five other builds
//! kept the load average at 4-7, so every figure is 2-4x below a quiet machine's and the ratios
//! scatter by ±0.1 between runs: at the layers (4096 tokens; d 512, ff 1024, E 8, top-2
//! and d 256, ff 256, E 64, top-8; gate_up and down projections, uniform and Zipf-skewed loads)
//! forward 0.87-0.97 and backward 0.83-1.05 of the dense throughput. `cargo xtask bench
//! grouped_gemm` prints the same comparison (variants 0/1 and 2/3) for a quiet-machine run.
//!
//! Outputs are fresh allocations advised for transparent huge pages (`permute::zeros_huge`): the
//! layer's tens of MB of intermediates otherwise cost one page fault per 4 KiB on first write,
//! which took a fifth to a third of the MoE layer's time (`cargo xtask bench moe_layer`,
//! 2 threads, min of 5: E8 forward 309 → 201 ms, forward+backward 684 → 574 ms; E64 160 → 114 ms
//! and 438 → 313 ms, back to back on a loaded machine). [`swiglu_experts_forward`] runs the
//! whole SwiGLU expert (gate_up GEMM, activation, down GEMM) chunk by chunk of experts so the
//! activation reads `h` from the L3 cache, and without a tape never allocates `h` or `a`.

use moeba_tensor::{DType, Device, Error, Result, Tensor};
use rayon::prelude::*;

use super::par;
use super::permute::{data_as, from_vec_as, zeros_huge, SendPtr};
use super::simd::{self, Arg, MapOp};
use crate::ops::BinaryOp;

/// Work (m·n·k) of one expert's GEMM from which it is parallelised inside.
const PAR_GEMM_WORK: usize = 1 << 21;

/// See [`crate::ops::grouped_matmul`]. `offs` are the checked E + 1 offsets.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offs: &[usize]) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if x.dtype() == DType::F32 && super::matmul::avx2::available() {
        return fast::forward(x, w, offs);
    }
    generic_forward(x, w, offs)
}

/// See [`crate::ops::grouped_matmul_backward`].
pub fn grouped_matmul_backward(
    x: &Tensor,
    w: &Tensor,
    offs: &[usize],
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    #[cfg(target_arch = "x86_64")]
    if x.dtype() == DType::F32 && super::matmul::avx2::available() {
        return fast::backward(x, w, offs, grad_out);
    }
    generic_backward(x, w, offs, grad_out)
}

/// Floats of the `(rows, 2f)` pre-activation that one chunk of [`swiglu_experts_forward`] fills
/// before its SwiGLU and down projection run (8 MiB: a quarter of Zen 3's L3).
const SWIGLU_CHUNK_FLOATS: usize = 2 << 20;

/// See [`crate::ops::moe_swiglu_experts_forward`]. `offs` are the checked E + 1 offsets.
///
/// f32 with AVX2+FMA: the experts are taken in chunks of whole experts of about
/// [`SWIGLU_CHUNK_FLOATS`] pre-activation floats; per chunk the gate_up GEMM writes `h`, the
/// SwiGLU reads it back while it is still in the L3 cache, and the down GEMM reads `a`. Without
/// `keep`, `h` and `a` live in two chunk-sized scratch buffers instead of `(R, 2f)` and `(R, f)`
/// tensors (no fresh memory to fault in, no pass over DRAM). Elsewhere: [`grouped_matmul`],
/// [`swiglu`], [`grouped_matmul`] (the reference the fast path is tested against).
pub fn swiglu_experts_forward(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offs: &[usize],
    keep: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    #[cfg(target_arch = "x86_64")]
    if x.dtype() == DType::F32 && super::matmul::avx2::available() {
        return fast::swiglu_experts(x, gate_up, down, offs, keep);
    }
    swiglu_experts_composite(x, gate_up, down, offs, keep)
}

/// [`swiglu_experts_forward`] as three separate ops (grouped GEMM, SwiGLU, grouped GEMM): the
/// reference of the fused path, and the path for every dtype and CPU.
pub fn swiglu_experts_composite(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    offs: &[usize],
    keep: bool,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let h = grouped_matmul(x, gate_up, offs)?;
    let a = swiglu(&h)?;
    let y = grouped_matmul(&a, down, offs)?;
    Ok((y, keep.then_some((h, a))))
}

/// [`grouped_matmul`] on the portable path (per-expert `cpu::matmul::matmul` on views), for
/// every dtype and CPU; tests and benches compare the fast path with it.
pub fn generic_forward(x: &Tensor, w: &Tensor, offs: &[usize]) -> Result<Tensor> {
    let (r, out_f) = (x.dims()[0], w.dims()[1]);
    let mut parts = Vec::new();
    for e in 0..offs.len() - 1 {
        let m = offs[e + 1] - offs[e];
        if m == 0 {
            continue;
        }
        let xe = x.narrow(0, offs[e], m)?;
        let we = w.narrow(0, e, 1)?.squeeze(0)?.t()?;
        parts.push(super::matmul::matmul(&xe, &we)?);
    }
    if parts.is_empty() {
        return Tensor::zeros((r, out_f), x.dtype(), &Device::Cpu);
    }
    crate::ops::concat(&parts.iter().collect::<Vec<_>>(), 0)
}

/// [`grouped_matmul_backward`] on the portable path (see [`generic_forward`]).
pub fn generic_backward(
    x: &Tensor,
    w: &Tensor,
    offs: &[usize],
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (r, inn) = (x.dims()[0], x.dims()[1]);
    let out_f = w.dims()[1];
    let mut dxs = Vec::new();
    let mut dws = Vec::new();
    for e in 0..offs.len() - 1 {
        let m = offs[e + 1] - offs[e];
        let we = w.narrow(0, e, 1)?.squeeze(0)?;
        if m == 0 {
            dws.push(Tensor::zeros((out_f, inn), x.dtype(), &Device::Cpu)?);
            continue;
        }
        let xe = x.narrow(0, offs[e], m)?;
        let ge = grad_out.narrow(0, offs[e], m)?;
        dxs.push(super::matmul::matmul(&ge, &we)?);
        dws.push(super::matmul::matmul(&ge.t()?, &xe)?);
    }
    let dx = if dxs.is_empty() {
        Tensor::zeros((r, inn), x.dtype(), &Device::Cpu)?
    } else {
        crate::ops::concat(&dxs.iter().collect::<Vec<_>>(), 0)?
    };
    let dw = if dws.is_empty() {
        Tensor::zeros(w.dims(), x.dtype(), &Device::Cpu)?
    } else {
        crate::ops::stack(&dws.iter().collect::<Vec<_>>(), 0)?
    };
    Ok((dx, dw))
}

/// One GEMM of a grouped call: `c (m×n, ldc) = a (m×k) · b (k×n)`, strided operands, `c` at
/// element offset `c_off` of the shared output.
#[derive(Clone, Copy)]
struct Job {
    m: usize,
    n: usize,
    k: usize,
    a: (usize, usize, usize),
    b: (usize, usize, usize),
    c_off: usize,
    ldc: usize,
}

/// Runs the jobs over `a_data`, `b_data` into `c`: big jobs one after another (parallel inside),
/// the small ones as parallel single-threaded tasks. The jobs' outputs must be disjoint.
#[cfg(target_arch = "x86_64")]
fn run_jobs(jobs: &[Job], a_data: &[f32], b_data: &[f32], c: &mut [f32]) {
    use super::matmul::avx2::{sgemm, Blocking, MatRef};
    let threads = rayon::current_num_threads().max(1);
    let cptr = SendPtr(c.as_mut_ptr());
    let clen = c.len();
    let one = |j: &Job, parallel: bool| {
        if j.m == 0 || j.n == 0 {
            return;
        }
        let len = (j.m - 1) * j.ldc + j.n;
        assert!(j.c_off + len <= clen, "grouped_matmul: output tile out of bounds");
        // SAFETY: the tile lies inside `c` (checked above) and the jobs' tiles are disjoint (the
        // callers build one tile per expert group), so no two tasks alias.
        let ct = unsafe { std::slice::from_raw_parts_mut(cptr.get().add(j.c_off), len) };
        let a = MatRef { data: a_data, off: j.a.0, rs: j.a.1, cs: j.a.2 };
        let b = MatRef { data: b_data, off: j.b.0, rs: j.b.1, cs: j.b.2 };
        sgemm(j.m, j.n, j.k, a, b, ct, j.ldc, Blocking::DEFAULT, parallel);
    };
    let work = |j: &Job| j.m * j.n * j.k.max(1);
    // A job is parallelised inside when it is too big to balance as one task: at least a quarter
    // of a thread's fair share of the call (and big enough for the pool at all). The rest run as
    // single-threaded tasks, largest first, so the pool balances them.
    let total: usize = jobs.iter().map(work).sum();
    let big_from = (total / (4 * threads)).max(PAR_GEMM_WORK);
    let (big, small): (Vec<&Job>, Vec<&Job>) = jobs.iter().partition(|j| threads > 1 && work(j) >= big_from);
    for j in big {
        one(j, true);
    }
    let small_total: usize = small.iter().map(|j| work(j)).sum();
    if threads > 1 && small.len() > 1 && small_total >= PAR_GEMM_WORK / 2 {
        // Largest first, so the tail of the schedule is made of small tasks.
        let mut small = small;
        small.sort_by_key(|j| std::cmp::Reverse(work(j)));
        small.par_iter().with_max_len(1).for_each(|j| one(j, false));
    } else {
        for j in small {
            one(j, false);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fast {
    use super::*;

    fn f32_parts(x: &Tensor) -> Result<(&[f32], &[usize], usize)> {
        let s = x.storage().as_cpu().and_then(|s| s.as_slice::<f32>()).ok_or_else(|| Error::Unsupported {
            op: "grouped_matmul",
            msg: "expected a CPU f32 tensor".into(),
        })?;
        Ok((s, x.layout().strides(), x.layout().offset()))
    }

    /// `out[rows_e] = x[rows_e] · w[e]ᵀ`.
    pub fn forward(x: &Tensor, w: &Tensor, offs: &[usize]) -> Result<Tensor> {
        let (r, out_f) = (x.dims()[0], w.dims()[1]);
        let inn = x.dims()[1];
        let (xd, xs, xo) = f32_parts(x)?;
        let (wd, ws, wo) = f32_parts(w)?;
        let mut out = zeros_huge::<f32>(r * out_f);
        let jobs: Vec<Job> = (0..offs.len() - 1)
            .map(|e| Job {
                m: offs[e + 1] - offs[e],
                n: out_f,
                k: inn,
                a: (xo + offs[e] * xs[0], xs[0], xs[1]),
                // b(p, j) = w[e, j, p]
                b: (wo + e * ws[0], ws[2], ws[1]),
                c_off: offs[e] * out_f,
                ldc: out_f,
            })
            .filter(|j| j.m > 0)
            .collect();
        run_jobs(&jobs, xd, wd, &mut out);
        Tensor::from_vec(out, (r, out_f), &Device::Cpu)
    }

    /// `dx[rows_e] = g[rows_e] · w[e]` and `dw[e] = g[rows_e]ᵀ · x[rows_e]`.
    pub fn backward(x: &Tensor, w: &Tensor, offs: &[usize], g: &Tensor) -> Result<(Tensor, Tensor)> {
        let (r, inn) = (x.dims()[0], x.dims()[1]);
        let (e_n, out_f) = (w.dims()[0], w.dims()[1]);
        let (xd, xs, xo) = f32_parts(x)?;
        let (wd, ws, wo) = f32_parts(w)?;
        let (gd, gs, go) = f32_parts(g)?;
        let mut dx = zeros_huge::<f32>(r * inn);
        let dx_jobs: Vec<Job> = (0..e_n)
            .map(|e| Job {
                m: offs[e + 1] - offs[e],
                n: inn,
                k: out_f,
                a: (go + offs[e] * gs[0], gs[0], gs[1]),
                b: (wo + e * ws[0], ws[1], ws[2]),
                c_off: offs[e] * inn,
                ldc: inn,
            })
            .filter(|j| j.m > 0)
            .collect();
        run_jobs(&dx_jobs, gd, wd, &mut dx);
        // dw[e] (out × in) = gᵀ (out × m_e) · x (m_e × in); an empty group gives k = 0: zeros.
        let mut dw = zeros_huge::<f32>(e_n * out_f * inn);
        let dw_jobs: Vec<Job> = (0..e_n)
            .map(|e| Job {
                m: out_f,
                n: inn,
                k: offs[e + 1] - offs[e],
                a: (go + offs[e] * gs[0], gs[1], gs[0]),
                b: (xo + offs[e] * xs[0], xs[0], xs[1]),
                c_off: e * out_f * inn,
                ldc: inn,
            })
            .filter(|j| j.k > 0)
            .collect();
        run_jobs(&dw_jobs, gd, xd, &mut dw);
        Ok((
            Tensor::from_vec(dx, (r, inn), &Device::Cpu)?,
            Tensor::from_vec(dw, (e_n, out_f, inn), &Device::Cpu)?,
        ))
    }

    /// The fused SwiGLU experts (see [`super::swiglu_experts_forward`]).
    pub fn swiglu_experts(
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        offs: &[usize],
        keep: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (r, d_in) = (x.dims()[0], x.dims()[1]);
        let (e_n, f2) = (gate_up.dims()[0], gate_up.dims()[1]);
        let (f, d_out) = (f2 / 2, down.dims()[1]);
        let (xd, xs, xo) = f32_parts(x)?;
        let (gd, gs, go) = f32_parts(gate_up)?;
        let (dd, ds, dof) = f32_parts(down)?;
        // Chunks of whole experts (a weight is packed once per call, as in `grouped_matmul`).
        let mut chunks = Vec::new();
        let mut start = 0;
        for e in 0..e_n {
            if (offs[e + 1] - offs[start]) * f2 >= SWIGLU_CHUNK_FLOATS || e + 1 == e_n {
                chunks.push((start, e + 1));
                start = e + 1;
            }
        }
        let max_rows = chunks.iter().map(|&(e0, e1)| offs[e1] - offs[e0]).max().unwrap_or(0);
        let (mut h, mut a) = if keep {
            (zeros_huge::<f32>(r * f2), zeros_huge::<f32>(r * f))
        } else {
            (zeros_huge::<f32>(max_rows * f2), zeros_huge::<f32>(max_rows * f))
        };
        let mut y = zeros_huge::<f32>(r * d_out);
        for &(e0, e1) in &chunks {
            let (row0, rows) = (offs[e0], offs[e1] - offs[e0]);
            if rows == 0 {
                continue;
            }
            let base = if keep { row0 } else { 0 };
            let hc = &mut h[base * f2..(base + rows) * f2];
            let up: Vec<Job> = (e0..e1)
                .map(|e| Job {
                    m: offs[e + 1] - offs[e],
                    n: f2,
                    k: d_in,
                    a: (xo + offs[e] * xs[0], xs[0], xs[1]),
                    // b(p, j) = gate_up[e, j, p]
                    b: (go + e * gs[0], gs[2], gs[1]),
                    c_off: (offs[e] - row0) * f2,
                    ldc: f2,
                })
                .filter(|j| j.m > 0)
                .collect();
            run_jobs(&up, xd, gd, hc);
            let ac = &mut a[base * f..(base + rows) * f];
            swiglu_rows_f32(hc, ac, f);
            let dn: Vec<Job> = (e0..e1)
                .map(|e| Job {
                    m: offs[e + 1] - offs[e],
                    n: d_out,
                    k: f,
                    a: ((offs[e] - row0) * f, f, 1),
                    // b(p, j) = down[e, j, p]
                    b: (dof + e * ds[0], ds[2], ds[1]),
                    c_off: offs[e] * d_out,
                    ldc: d_out,
                })
                .filter(|j| j.m > 0)
                .collect();
            run_jobs(&dn, ac, dd, &mut y);
        }
        let y = Tensor::from_vec(y, (r, d_out), &Device::Cpu)?;
        if !keep {
            return Ok((y, None));
        }
        let h = Tensor::from_vec(h, (r, f2), &Device::Cpu)?;
        let a = Tensor::from_vec(a, (r, f), &Device::Cpu)?;
        Ok((y, Some((h, a))))
    }
}

/// `a[i] = silu(h[i, :f]) · h[i, f:]` for the rows of `a` (`f` floats each), rows in parallel.
fn swiglu_rows_f32(h: &[f32], a: &mut [f32], f: usize) {
    if f == 0 {
        return;
    }
    par::for_each_rows_mut(a, f, 8 * f, |first, chunk| {
        for (i, o) in chunk.chunks_mut(f).enumerate() {
            let row = &h[(first + i) * 2 * f..(first + i + 1) * 2 * f];
            simd::map_into_f32(MapOp::Silu, &row[..f], o);
            simd::binary_assign_f32(BinaryOp::Mul, o, Arg::Slice(&row[f..]));
        }
    });
}

/// See [`crate::ops::moe_swiglu`]: rows in parallel; f32 uses the SIMD SiLU of `cpu::simd`.
pub fn swiglu(h: &Tensor) -> Result<Tensor> {
    let (r, f) = (h.dims()[0], h.dims()[1] / 2);
    match h.dtype() {
        DType::F64 => {
            let hv = data_as::<f64>(h)?;
            let mut out = zeros_huge::<f64>(r * f);
            par::for_each_rows_mut(&mut out, f.max(1), 8 * f, |first, chunk| {
                for (i, o) in chunk.chunks_mut(f).enumerate() {
                    let row = &hv[(first + i) * 2 * f..(first + i + 1) * 2 * f];
                    for ((o, &g), &u) in o.iter_mut().zip(&row[..f]).zip(&row[f..]) {
                        *o = g / (1.0 + (-g).exp()) * u;
                    }
                }
            });
            Tensor::from_vec(out, (r, f), &Device::Cpu)
        }
        dt => {
            let hv = data_as::<f32>(h)?;
            let mut out = zeros_huge::<f32>(r * f);
            swiglu_rows_f32(&hv, &mut out, f);
            from_vec_as(out, (r, f), dt)
        }
    }
}

/// See [`crate::ops::moe_swiglu_backward`].
pub fn swiglu_backward(h: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (r, f) = (h.dims()[0], h.dims()[1] / 2);
    match h.dtype() {
        DType::F64 => {
            let (hv, gv) = (data_as::<f64>(h)?, data_as::<f64>(grad)?);
            let mut out = zeros_huge::<f64>(r * 2 * f);
            par::for_each_rows_mut(&mut out, (2 * f).max(1), 16 * f, |first, chunk| {
                for (i, o) in chunk.chunks_mut(2 * f).enumerate() {
                    let row = first + i;
                    let hr = &hv[row * 2 * f..(row + 1) * 2 * f];
                    let gr = &gv[row * f..(row + 1) * f];
                    let (og, ou) = o.split_at_mut(f);
                    for j in 0..f {
                        let (g, u, d) = (hr[j], hr[f + j], gr[j]);
                        let s = 1.0 / (1.0 + (-g).exp());
                        og[j] = d * u * s * (1.0 + g * (1.0 - s));
                        ou[j] = d * g * s;
                    }
                }
            });
            Tensor::from_vec(out, (r, 2 * f), &Device::Cpu)
        }
        dt => {
            let (hv, gv) = (data_as::<f32>(h)?, data_as::<f32>(grad)?);
            let mut out = zeros_huge::<f32>(r * 2 * f);
            par::for_each_rows_mut(&mut out, (2 * f).max(1), 16 * f, |first, chunk| {
                for (i, o) in chunk.chunks_mut(2 * f).enumerate() {
                    let row = first + i;
                    let hr = &hv[row * 2 * f..(row + 1) * 2 * f];
                    let gr = &gv[row * f..(row + 1) * f];
                    let (og, ou) = o.split_at_mut(f);
                    // σ(gate) into the gate half, then both halves from it (auto-vectorised).
                    simd::map_into_f32(MapOp::Sigmoid, &hr[..f], og);
                    for j in 0..f {
                        let (g, u, d, s) = (hr[j], hr[f + j], gr[j], og[j]);
                        og[j] = d * u * s * (1.0 + g * (1.0 - s));
                        ou[j] = d * g * s;
                    }
                }
            });
            from_vec_as(out, (r, 2 * f), dt)
        }
    }
}
