//! Launchers of kernels/copy.cu: strided copies (`contiguous`, `concat`) and dtype casts.

use moeba_tensor::{DType, Error, Layout, Result, Tensor};

use super::elementwise::unary_params;
use super::runtime::{alloc_out, kernels, launch, narrow_index, parts, ptr};

const THREADS: u32 = 256;
const BLOCKS_PER_SM: u32 = 16;

fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I64 => "i64",
        DType::U32 => "u32",
    }
}

/// The copy kernel moving elements of `dtype`'s size.
fn copy_kernel(dtype: DType) -> &'static str {
    match dtype.size_in_bytes() {
        2 => "copy_b2",
        4 => "copy_b4",
        _ => "copy_b8",
    }
}

/// Copies the elements of `x` into `out` at the positions of `y_layout` (a view of `out`'s
/// storage with `x`'s shape).
fn copy_into(op: &'static str, x: &Tensor, out: &Tensor, y_layout: &Layout) -> Result<()> {
    let (_, dev) = parts(op, x)?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(());
    }
    let p = unary_params(op, x.shape(), x.layout(), None, Some(y_layout))?;
    let k = kernels(dev)?;
    let xp = ptr(x)?;
    let yp = ptr(out)? + ((y_layout.offset() - out.layout().offset()) * x.dtype().size_in_bytes()) as u64;
    launch!(k, copy_kernel(x.dtype()), k.grid_1d(n, THREADS, BLOCKS_PER_SM), &p, &xp, &yp)
}

/// See [`crate::ops::contiguous`]: a compact copy of any strided view, for every dtype.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    let (_, dev) = parts("contiguous", x)?;
    let out = alloc_out(dev, x.shape().clone(), x.dtype())?;
    let yl = out.layout().clone();
    copy_into("contiguous", x, &out, &yl)?;
    Ok(out)
}

/// See [`crate::ops::to_dtype`]: every pair of dtypes, converting like the CPU (through f64).
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let (_, dev) = parts("to_dtype", x)?;
    if x.dtype() == dtype {
        return contiguous(x);
    }
    let out = alloc_out(dev, x.shape().clone(), dtype)?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let x = &narrow_index(x)?;
    let p = unary_params("to_dtype", x.shape(), x.layout(), None, None)?;
    let k = kernels(dev)?;
    let (xp, yp) = (ptr(x)?, ptr(&out)?);
    let name = format!("cast_{}_{}", suffix(x.dtype()), suffix(dtype));
    launch!(k, &name, k.grid_1d(n, THREADS, BLOCKS_PER_SM), &p, &xp, &yp)?;
    Ok(out)
}

/// See [`crate::ops::concat`]: each input is copied into its slice of the output.
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::invalid("concat", "xs", "no tensors given"))?;
    let (_, dev) = parts("concat", first)?;
    for x in xs {
        let (_, d) = parts("concat", x)?;
        if d.ordinal() != dev.ordinal() {
            return Err(Error::DeviceMismatch {
                op: "concat",
                lhs: first.device().to_string(),
                rhs: x.device().to_string(),
            });
        }
    }
    let mut dims = first.dims().to_vec();
    dims[dim] = xs.iter().map(|x| x.dims()[dim]).sum();
    let out = alloc_out(dev, dims, first.dtype())?;
    let mut start = 0;
    for x in xs {
        let len = x.dims()[dim];
        let yl = out.layout().narrow(dim, start, len)?;
        copy_into("concat", x, &out, &yl)?;
        start += len;
    }
    Ok(out)
}
