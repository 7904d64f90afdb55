//! Index ops on the CPU: index_select, gather, scatter_add, where_cond.
//!
//! Each op is generic over the element type (the `with_dtype!` macro picks it at run time), reads its
//! data through [`Tensor::cpu_data`] (borrowed when contiguous) or directly through the input's
//! strides, validates every index before touching memory, and returns a fresh contiguous tensor.

use bytemuck::Zeroable;
use moeba_tensor::{DType, Device, Error, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Outputs with at least this many elements are produced by several rayon tasks.
pub(crate) const PAR_ELEMS: usize = 1 << 16;

/// Runs `$body` with the type alias `$T` bound to the Rust type of the dtype `$dt`.
macro_rules! with_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::BF16 => {
                type $T = moeba_tensor::bf16;
                $body
            }
            DType::F16 => {
                type $T = moeba_tensor::f16;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

/// The whole host buffer behind `x` (to be read through `x`'s layout).
pub(crate) fn storage_slice<'a, T: WithDType>(op: &'static str, x: &'a Tensor) -> Result<&'a [T]> {
    x.storage().as_cpu().and_then(|s| s.as_slice::<T>()).ok_or_else(|| Error::Unsupported {
        op,
        msg: format!("expected a CPU tensor of {}, got {} on {}", T::DTYPE, x.dtype(), x.device()),
    })
}

/// The index tensor's values in row-major order, each checked to lie in `0..size`; an error names
/// the first offending value, the dim and its size.
pub(crate) fn checked_indices(
    op: &'static str,
    arg: &'static str,
    ids: &Tensor,
    dim: usize,
    size: usize,
) -> Result<Vec<usize>> {
    let check = |v: i64| -> Result<usize> {
        if v < 0 || v as u64 >= size as u64 {
            Err(Error::invalid(op, arg, format!("index {v} is out of range for dim {dim} of size {size}")))
        } else {
            Ok(v as usize)
        }
    };
    match ids.dtype() {
        DType::U32 => ids.cpu_data::<u32>()?.iter().map(|&v| check(v as i64)).collect(),
        DType::I64 => ids.cpu_data::<i64>()?.iter().map(|&v| check(v)).collect(),
        dt => Err(Error::UnsupportedDType { op, dtype: dt, hint: "; indices must be u32 or i64".into() }),
    }
}

fn split_at_dim(dims: &[usize], dim: usize) -> (usize, usize, usize) {
    (dims[..dim].iter().product(), dims[dim], dims[dim + 1..].iter().product())
}

/// See [`crate::ops::index_select`].
pub fn index_select(x: &Tensor, dim: usize, ids: &Tensor) -> Result<Tensor> {
    if dim >= x.rank() {
        return Err(Error::DimOutOfRange { op: "index_select", dim, rank: x.rank() });
    }
    let idx = checked_indices("index_select", "ids", ids, dim, x.dims()[dim])?;
    with_dtype!(x.dtype(), T => index_select_t::<T>(x, dim, &idx))
}

fn index_select_t<T: WithDType>(x: &Tensor, dim: usize, idx: &[usize]) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    out_dims[dim] = idx.len();
    let (outer, d, inner) = split_at_dim(x.dims(), dim);
    let mut out = vec![T::zeroed(); outer * idx.len() * inner];
    if !out.is_empty() {
        let xs = x.cpu_data::<T>()?;
        let nidx = idx.len();
        let row = |(r, dst): (usize, &mut [T])| {
            let (o, j) = (r / nidx, r % nidx);
            let s = (o * d + idx[j]) * inner;
            dst.copy_from_slice(&xs[s..s + inner]);
        };
        if out.len() >= PAR_ELEMS {
            out.par_chunks_mut(inner).enumerate().with_min_len((4096 / inner).max(1)).for_each(row);
        } else {
            out.chunks_mut(inner).enumerate().for_each(row);
        }
    }
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

/// Checks the torch rule shared by gather and scatter_add: `idx` has `x`'s rank and, except
/// along `dim`, no larger sizes.
fn check_index_shape(op: &'static str, x: &Tensor, dim: usize, idx: &Tensor) -> Result<()> {
    if dim >= x.rank() {
        return Err(Error::DimOutOfRange { op, dim, rank: x.rank() });
    }
    let ok = idx.rank() == x.rank()
        && idx.dims().iter().zip(x.dims()).enumerate().all(|(d, (&i, &s))| d == dim || i <= s);
    if !ok {
        return Err(Error::bad_shape(
            op,
            idx.shape(),
            format!(
                "the index must have the rank of the input {} and, except along dim {dim}, no larger sizes",
                x.shape()
            ),
        ));
    }
    Ok(())
}

/// Storage offset of `(pos with pos[dim] = 0)` in `layout`, for every position of `shape` in
/// row-major order.
fn base_offsets(layout: &Layout, shape: &Shape, dim: usize) -> Result<Vec<usize>> {
    let mut strides = layout.strides().to_vec();
    strides[dim] = 0;
    Ok(Layout::new(shape.clone(), strides, layout.offset())?.strided_index().collect())
}

/// See [`crate::ops::gather`].
pub fn gather(x: &Tensor, dim: usize, idx: &Tensor) -> Result<Tensor> {
    check_index_shape("gather", x, dim, idx)?;
    let ids = checked_indices("gather", "idx", idx, dim, x.dims()[dim])?;
    with_dtype!(x.dtype(), T => gather_t::<T>(x, dim, idx.shape(), &ids))
}

fn gather_t<T: WithDType>(x: &Tensor, dim: usize, shape: &Shape, ids: &[usize]) -> Result<Tensor> {
    let data = storage_slice::<T>("gather", x)?;
    let step = x.layout().strides()[dim];
    let bases = base_offsets(x.layout(), shape, dim)?;
    let out: Vec<T> = if bases.len() >= PAR_ELEMS {
        bases.par_iter().zip(ids.par_iter()).map(|(&b, &i)| data[b + i * step]).collect()
    } else {
        bases.iter().zip(ids).map(|(&b, &i)| data[b + i * step]).collect()
    };
    Tensor::from_vec(out, shape.clone(), &Device::Cpu)
}

/// Wrapping/IEEE addition for the element types scatter_add accumulates in.
trait Accumulate: WithDType {
    fn acc(self, other: Self) -> Self;
}
impl Accumulate for f32 {
    fn acc(self, o: Self) -> Self {
        self + o
    }
}
impl Accumulate for f64 {
    fn acc(self, o: Self) -> Self {
        self + o
    }
}
impl Accumulate for i64 {
    fn acc(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
}
impl Accumulate for u32 {
    fn acc(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
}

/// See [`crate::ops::scatter_add`].
pub fn scatter_add(x: &Tensor, dim: usize, idx: &Tensor, src: &Tensor) -> Result<Tensor> {
    check_index_shape("scatter_add", x, dim, idx)?;
    if idx.shape() != src.shape() {
        return Err(Error::ShapeMismatch {
            op: "scatter_add",
            lhs: idx.shape().clone(),
            rhs: src.shape().clone(),
        });
    }
    if x.dtype() != src.dtype() {
        return Err(Error::DTypeMismatch { op: "scatter_add", lhs: x.dtype(), rhs: src.dtype() });
    }
    let ids = checked_indices("scatter_add", "idx", idx, dim, x.dims()[dim])?;
    match x.dtype() {
        DType::F32 => scatter_add_t::<f32>(x, dim, &ids, src),
        DType::F64 => scatter_add_t::<f64>(x, dim, &ids, src),
        DType::I64 => scatter_add_t::<i64>(x, dim, &ids, src),
        DType::U32 => scatter_add_t::<u32>(x, dim, &ids, src),
        dt @ (DType::BF16 | DType::F16) => {
            // Accumulate in f32, round once.
            let (xf, sf) = (x.to_dtype(DType::F32)?, src.to_dtype(DType::F32)?);
            scatter_add_t::<f32>(&xf, dim, &ids, &sf)?.to_dtype(dt)
        }
    }
}

fn scatter_add_t<T: Accumulate>(x: &Tensor, dim: usize, ids: &[usize], src: &Tensor) -> Result<Tensor> {
    let mut out = x.cpu_data::<T>()?.into_owned();
    let values = src.cpu_data::<T>()?;
    let dense = Layout::contiguous(x.shape().clone());
    let step = dense.strides()[dim];
    let bases = base_offsets(&dense, src.shape(), dim)?;
    // Sequential, in the row-major order of idx: deterministic sums.
    for ((&b, &i), &v) in bases.iter().zip(ids).zip(values.iter()) {
        let o = &mut out[b + i * step];
        *o = o.acc(v);
    }
    Tensor::from_vec(out, x.shape().clone(), &Device::Cpu)
}

/// See [`crate::ops::where_cond`].
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op: "where_cond", lhs: a.dtype(), rhs: b.dtype() });
    }
    let shape =
        cond.shape().broadcast_with("where_cond", a.shape())?.broadcast_with("where_cond", b.shape())?;
    let mask: Vec<bool> = with_dtype!(cond.dtype(), C => {
        let c = cond.broadcast_as(shape.clone())?;
        let v = c.cpu_data::<C>()?;
        v.iter().map(|&e| e != C::zeroed()).collect()
    });
    with_dtype!(a.dtype(), T => where_t::<T>(&mask, a, b, &shape))
}

fn where_t<T: WithDType>(mask: &[bool], a: &Tensor, b: &Tensor, shape: &Shape) -> Result<Tensor> {
    let av = a.broadcast_as(shape.clone())?;
    let bv = b.broadcast_as(shape.clone())?;
    let (av, bv) = (av.cpu_data::<T>()?, bv.cpu_data::<T>()?);
    let pick = |((&m, &x), &y): ((&bool, &T), &T)| if m { x } else { y };
    let out: Vec<T> = if mask.len() >= PAR_ELEMS {
        mask.par_iter().zip(av.par_iter()).zip(bv.par_iter()).map(pick).collect()
    } else {
        mask.iter().zip(av.iter()).zip(bv.iter()).map(pick).collect()
    };
    Tensor::from_vec(out, shape.clone(), &Device::Cpu)
}
