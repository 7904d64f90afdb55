//! Launchers of kernels/reduce.cu: sum / mean / max / min over any set of dims, and argmax.

use moeba_tensor::{DType, Error, Result, Tensor};

use super::ffi::{self, ReduceParams};
use super::runtime::{alloc_out, coalesce, fixed, float_suffix, kernels, launch, parts, ptr, DeviceKernels};
use crate::ops::ReduceOp;

/// Rows up to this long get one warp each; longer rows get a block.
const WARP_ROW_MAX: usize = 2048;
/// Threads per block of the block-per-row kernels.
const BLOCK_THREADS: u32 = 512;

/// `x` seen as rows: the kept dims (in order) pick a row, the reduced dims walk inside it.
/// Returns the params and the output dims.
fn row_params(
    op: &'static str,
    x: &Tensor,
    red: &[usize],
    keepdim: bool,
) -> Result<(ReduceParams, Vec<usize>)> {
    let (dims, strides) = (x.dims(), x.layout().strides());
    let is_red = |d: usize| red.contains(&d);
    let kept: Vec<usize> = (0..x.rank()).filter(|&d| !is_red(d)).collect();
    let reduced: Vec<usize> = (0..x.rank()).filter(|&d| is_red(d)).collect();
    let pick = |ds: &[usize], v: &[usize]| ds.iter().map(|&d| v[d]).collect::<Vec<_>>();
    let (kd, ks) = (pick(&kept, dims), pick(&kept, strides));
    let (rd, rs) = (pick(&reduced, dims), pick(&reduced, strides));
    let kc = coalesce(&kd, &[&ks]);
    let rc = coalesce(&rd, &[&rs]);
    let n_out: usize = kd.iter().product();
    let n_red: usize = rd.iter().product();
    let red_contiguous = rc.dims.is_empty() || (rc.dims.len() == 1 && rc.strides[0][0] == 1);
    if rc.dims.len() > 1 && rd.iter().product::<usize>() >= super::runtime::WIDE {
        return Err(Error::Unsupported {
            op,
            msg: format!(
                "reducing {} elements per output over non-adjacent dims {red:?} of {}; HINT: permute \
                 the reduced dims next to each other and make the tensor contiguous",
                rd.iter().product::<usize>(),
                x.shape()
            ),
        });
    }
    let out_dims = if keepdim {
        (0..x.rank()).map(|d| if is_red(d) { 1 } else { dims[d] }).collect()
    } else {
        kd.clone()
    };
    let p = ReduceParams {
        n_out: n_out as i64,
        n_red: n_red as i64,
        op: 0,
        out_rank: kc.dims.len() as i32,
        red_rank: rc.dims.len() as i32,
        red_contiguous: red_contiguous as i32,
        out_dims: fixed(op, x.shape(), &kc.dims)?,
        out_strides: fixed(op, x.shape(), &kc.strides[0])?,
        red_dims: fixed(op, x.shape(), &rc.dims)?,
        red_strides: fixed(op, x.shape(), &rc.strides[0])?,
    };
    Ok((p, out_dims))
}

fn rows_launch(k: &DeviceKernels, n_out: usize, warp: bool) -> cudarc::driver::LaunchConfig {
    if warp {
        // 8 warps (rows) per block.
        k.grid_1d(n_out * 32, 256, 8)
    } else {
        let mut cfg = k.grid_1d(n_out * BLOCK_THREADS as usize, BLOCK_THREADS, 4);
        cfg.grid_dim.0 = cfg.grid_dim.0.max(1);
        cfg
    }
}

/// See [`crate::ops::reduce`].
pub fn reduce(x: &Tensor, dims: &[usize], keepdim: bool, op: ReduceOp) -> Result<Tensor> {
    let name = op.name();
    let (_, dev) = parts(name, x)?;
    let sfx = float_suffix(name, x.dtype())?;
    let mut red = dims.to_vec();
    red.sort_unstable();
    red.dedup();
    if red.is_empty() {
        return super::copy::contiguous(x);
    }
    let (mut p, out_dims) = row_params(name, x, &red, keepdim)?;
    p.op = match op {
        ReduceOp::Sum => ffi::MOEBA_REDUCE_SUM,
        ReduceOp::Mean => ffi::MOEBA_REDUCE_MEAN,
        ReduceOp::Max => ffi::MOEBA_REDUCE_MAX,
        ReduceOp::Min => ffi::MOEBA_REDUCE_MIN,
    } as i32;
    let out = alloc_out(dev, out_dims, x.dtype())?;
    let (n_out, n_red) = (p.n_out as usize, p.n_red as usize);
    if n_out == 0 {
        return Ok(out);
    }
    let k = kernels(dev)?;
    let (xp, yp) = (ptr(x)?, ptr(&out)?);
    // Neighbouring outputs adjacent in memory while a row's elements are not: a thread per
    // output, so that the loads of a warp coalesce.
    let inner_kept_stride = if p.out_rank > 0 { p.out_strides[p.out_rank as usize - 1] } else { 0 };
    if p.red_contiguous == 0 && inner_kept_stride == 1 && n_out >= 1024 {
        let cfg = k.grid_1d(n_out, 256, 8);
        launch!(k, &format!("reduce_cols_{sfx}"), cfg, &p, &xp, &yp)?;
    } else if n_red <= WARP_ROW_MAX {
        launch!(k, &format!("reduce_warp_{sfx}"), rows_launch(&k, n_out, true), &p, &xp, &yp)?;
    } else {
        launch!(k, &format!("reduce_block_{sfx}"), rows_launch(&k, n_out, false), &p, &xp, &yp)?;
    }
    Ok(out)
}

/// See [`crate::ops::argmax`].
pub fn argmax(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    let (_, dev) = parts("argmax", x)?;
    let sfx = float_suffix("argmax", x.dtype())?;
    let (p, out_dims) = row_params("argmax", x, &[dim], keepdim)?;
    let (n_out, n_red) = (p.n_out as usize, p.n_red as usize);
    if n_red == 0 && n_out > 0 {
        return Err(Error::bad_shape("argmax", x.shape(), format!("dim {dim} is empty: no maximum to pick")));
    }
    if n_red > u32::MAX as usize {
        return Err(Error::bad_shape("argmax", x.shape(), format!("dim {dim} is too long for u32 indices")));
    }
    let out = alloc_out(dev, out_dims, DType::U32)?;
    if n_out == 0 {
        return Ok(out);
    }
    let k = kernels(dev)?;
    let (xp, yp) = (ptr(x)?, ptr(&out)?);
    if n_red <= WARP_ROW_MAX {
        launch!(k, &format!("argmax_warp_{sfx}"), rows_launch(&k, n_out, true), &p, &xp, &yp)?;
    } else {
        launch!(k, &format!("argmax_block_{sfx}"), rows_launch(&k, n_out, false), &p, &xp, &yp)?;
    }
    Ok(out)
}
