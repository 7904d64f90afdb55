//! Launcher of kernels/where.cu: `cond ? a : b` with broadcasting over all three inputs.

use moeba_tensor::{DType, Error, Result, Tensor};

use super::ffi::WhereParams;
use super::runtime::{alloc_out, coalesce, fixed, kernels, launch, narrow_index, parts, ptr};

/// See [`crate::ops::where_cond`]: any dtype for `cond` (nonzero = true) and for the values.
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "where_cond";
    let (_, dev) = parts(OP, a)?;
    for t in [cond, b] {
        let (_, d) = parts(OP, t)?;
        if d.ordinal() != dev.ordinal() {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: a.device().to_string(),
                rhs: t.device().to_string(),
            });
        }
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op: OP, lhs: a.dtype(), rhs: b.dtype() });
    }
    let shape = cond.shape().broadcast_with(OP, a.shape())?.broadcast_with(OP, b.shape())?;
    let out = alloc_out(dev, shape.clone(), a.dtype())?;
    let n = shape.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let c = narrow_index(&cond.broadcast_as(shape.clone())?)?;
    let av = narrow_index(&a.broadcast_as(shape.clone())?)?;
    let bv = narrow_index(&b.broadcast_as(shape.clone())?)?;
    let co = coalesce(shape.dims(), &[c.layout().strides(), av.layout().strides(), bv.layout().strides()]);
    let p = WhereParams {
        numel: n as i64,
        rank: co.dims.len() as i32,
        c_contiguous: c.is_contiguous() as i32,
        a_contiguous: av.is_contiguous() as i32,
        b_contiguous: bv.is_contiguous() as i32,
        dims: fixed(OP, &shape, &co.dims)?,
        c_strides: fixed(OP, &shape, &co.strides[0])?,
        a_strides: fixed(OP, &shape, &co.strides[1])?,
        b_strides: fixed(OP, &shape, &co.strides[2])?,
    };
    let cond_name = match cond.dtype() {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I64 => "i64",
        DType::U32 => "u32",
    };
    let name = format!("where_{cond_name}_b{}", a.dtype().size_in_bytes());
    let k = kernels(dev)?;
    let (cp, ap, bp, yp) = (ptr(&c)?, ptr(&av)?, ptr(&bv)?, ptr(&out)?);
    launch!(k, &name, k.grid_1d(n, 256, 16), &p, &cp, &ap, &bp, &yp)?;
    Ok(out)
}
