//! Matrix products through cuBLAS (`cublasGemmStridedBatchedEx`): f32 and f64 in their own
//! precision (no TF32), bf16 and f16 with f32 accumulation.
//!
//! Row-major `C = A·B` is computed as the column-major `Cᵀ = Bᵀ·Aᵀ`. Each operand's last two dims
//! are used through their strides when one of them is 1 (a row-major matrix or a transposed view);
//! any other layout is copied to contiguous first. Broadcast batch dims become a stride of 0;
//! batch dims that do not merge into one stride are looped over on the host, one strided-batched
//! call per outer index.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use moeba_tensor::cuda::cuda_err;
use moeba_tensor::{DType, Error, Result, Shape, Storage, Tensor};

use super::runtime::{alloc_out, coalesce, kernels, parts, ptr};

/// How a `rows × cols` matrix with strides `(s_row, s_col)` can be handed to cuBLAS:
/// `Some((false, ld))` row-major with leading dim `ld`, `Some((true, ld))` column-major, `None`
/// when neither stride is 1 (copy it first). Size-1 dims may have any stride.
pub fn gemm_layout(rows: usize, cols: usize, s_row: usize, s_col: usize) -> Option<(bool, usize)> {
    if cols == 1 || s_col == 1 {
        let ld = if rows == 1 { cols.max(1) } else { s_row };
        if ld >= cols.max(1) {
            return Some((false, ld));
        }
    }
    if rows == 1 || s_row == 1 {
        let ld = if cols == 1 { rows.max(1) } else { s_col };
        if ld >= rows.max(1) {
            return Some((true, ld));
        }
    }
    None
}

fn last2(t: &Tensor) -> (usize, usize, usize, usize) {
    let (d, s, r) = (t.dims(), t.layout().strides(), t.rank());
    (d[r - 2], d[r - 1], s[r - 2], s[r - 1])
}

/// `t` itself if cuBLAS can read its last two dims, else a contiguous copy.
fn gemm_ready(t: &Tensor) -> Result<Tensor> {
    let (r, c, sr, sc) = last2(t);
    if gemm_layout(r, c, sr, sc).is_some() {
        Ok(t.clone())
    } else {
        super::copy::contiguous(t)
    }
}

fn to_i32(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Unsupported {
        op: "matmul",
        msg: format!("{what} = {v} exceeds cuBLAS's 32-bit limit"),
    })
}

/// See [`crate::ops::matmul`].
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, dev) = parts("matmul", a)?;
    parts("matmul", b)?;
    let dtype = a.dtype();
    let (data_type, compute) = match dtype {
        DType::F32 => (cudaDataType::CUDA_R_32F, cublasComputeType_t::CUBLAS_COMPUTE_32F),
        DType::F64 => (cudaDataType::CUDA_R_64F, cublasComputeType_t::CUBLAS_COMPUTE_64F),
        DType::BF16 => (cudaDataType::CUDA_R_16BF, cublasComputeType_t::CUBLAS_COMPUTE_32F),
        DType::F16 => (cudaDataType::CUDA_R_16F, cublasComputeType_t::CUBLAS_COMPUTE_32F),
        d => return Err(Error::dtype("matmul", d)),
    };
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.dims()[ra - 2], a.dims()[ra - 1]);
    let n = b.dims()[rb - 1];
    let batch =
        Shape::from(&a.dims()[..ra - 2]).broadcast_with("matmul", &Shape::from(&b.dims()[..rb - 2]))?;
    let mut out_dims = batch.to_vec();
    out_dims.extend([m, n]);
    let out = alloc_out(dev, out_dims, dtype)?;
    if out.elem_count() == 0 {
        return Ok(out);
    }
    if k == 0 {
        if let Storage::Cuda(s) = out.storage() {
            dev.memset_bytes(s, 0)?;
        }
        return Ok(out);
    }
    let a = gemm_ready(a)?;
    let b = gemm_ready(b)?;
    let mut ad = batch.to_vec();
    ad.extend([m, k]);
    let mut bd = batch.to_vec();
    bd.extend([k, n]);
    let a = a.broadcast_as(ad)?;
    let b = b.broadcast_as(bd)?;
    let (_, _, sam, sak) = last2(&a);
    let (_, _, sbk, sbn) = last2(&b);
    let (a_colmajor, lda) =
        gemm_layout(m, k, sam, sak).ok_or_else(|| Error::Msg("matmul: a layout".into()))?;
    let (b_colmajor, ldb) =
        gemm_layout(k, n, sbk, sbn).ok_or_else(|| Error::Msg("matmul: b layout".into()))?;
    let op = |col: bool| if col { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };

    // Batch dims: merge what merges; the innermost goes to cuBLAS, the rest is looped here.
    let nb = batch.rank();
    let c_strides: Vec<usize> =
        Shape::from(batch.dims()).contiguous_strides().iter().map(|s| s * m * n).collect();
    let co = coalesce(batch.dims(), &[&a.layout().strides()[..nb], &b.layout().strides()[..nb], &c_strides]);
    let (count, sa, sb, sc) = match co.dims.last() {
        Some(&d) => {
            let l = co.dims.len() - 1;
            (d, co.strides[0][l], co.strides[1][l], co.strides[2][l])
        }
        None => (1, 0, 0, m * n),
    };
    let outer = &co.dims[..co.dims.len().saturating_sub(1)];
    let n_outer: usize = outer.iter().product();

    let (mi, ni, ki) = (to_i32("m", m)?, to_i32("n", n)?, to_i32("k", k)?);
    let (ldai, ldbi, counti) = (to_i32("lda", lda)?, to_i32("ldb", ldb)?, to_i32("batch", count)?);
    let k_dev = kernels(dev)?;
    let blas = k_dev.blas()?;
    let esize = dtype.size_in_bytes() as u64;
    let (a0, b0, c0) = (ptr(&a)?, ptr(&b)?, ptr(&out)?);
    let (one32, zero32, one64, zero64) = (1f32, 0f32, 1f64, 0f64);
    let (alpha, beta): (*const std::ffi::c_void, *const std::ffi::c_void) = if dtype == DType::F64 {
        (&one64 as *const f64 as *const _, &zero64 as *const f64 as *const _)
    } else {
        (&one32 as *const f32 as *const _, &zero32 as *const f32 as *const _)
    };
    dev.bind_to_thread()?;
    for o in 0..n_outer {
        // Offsets of outer batch index `o` in each operand.
        let (mut rem, mut oa, mut ob, mut oc) = (o, 0usize, 0usize, 0usize);
        for d in (0..outer.len()).rev() {
            let i = rem % outer[d];
            rem /= outer[d];
            oa += i * co.strides[0][d];
            ob += i * co.strides[1][d];
            oc += i * co.strides[2][d];
        }
        // SAFETY: the pointers address live device buffers holding every element the strides
        // reach (checked by the layouts), alpha/beta point at host scalars of the compute type,
        // and the handle is bound to the device's stream, where all of these buffers' frees are
        // queued after this call.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(b_colmajor),
                op(a_colmajor),
                ni,
                mi,
                ki,
                alpha,
                (b0 + ob as u64 * esize) as *const _,
                data_type,
                ldbi,
                sb as i64,
                (a0 + oa as u64 * esize) as *const _,
                data_type,
                ldai,
                sa as i64,
                beta,
                (c0 + oc as u64 * esize) as *mut _,
                data_type,
                ni,
                sc as i64,
                counti,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cublasGemmStridedBatchedEx", e))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::gemm_layout;

    #[test]
    fn layouts() {
        assert_eq!(gemm_layout(3, 4, 4, 1), Some((false, 4)));
        assert_eq!(gemm_layout(3, 4, 1, 3), Some((true, 3)));
        // A narrowed row-major view keeps its parent's leading dim.
        assert_eq!(gemm_layout(3, 2, 4, 1), Some((false, 4)));
        // Neither stride is 1.
        assert_eq!(gemm_layout(3, 4, 8, 2), None);
        // Size-1 dims: any stride.
        assert_eq!(gemm_layout(1, 4, 0, 1), Some((false, 4)));
        assert_eq!(gemm_layout(3, 1, 1, 0), Some((false, 1)));
        // Overlapping rows (a broadcast inside the matrix) cannot be described.
        assert_eq!(gemm_layout(3, 4, 0, 1), None);
    }
}
