//! Launchers of kernels/softmax.cu: softmax and log-softmax along one dim.

use moeba_tensor::{Result, Shape, Tensor};

use super::ffi::SoftmaxParams;
use super::runtime::{alloc_out, coalesce, fixed, float_suffix, kernels, launch, parts, ptr};

/// Rows up to this long get one warp each; longer rows get a block.
const WARP_ROW_MAX: usize = 1024;
const BLOCK_THREADS: u32 = 512;

fn run(op: &'static str, x: &Tensor, dim: usize, log: bool) -> Result<Tensor> {
    let (_, dev) = parts(op, x)?;
    let sfx = float_suffix(op, x.dtype())?;
    let out = alloc_out(dev, x.shape().clone(), x.dtype())?;
    let (n_rows, row_len) = (x.elem_count() / x.dims()[dim].max(1), x.dims()[dim]);
    if x.elem_count() == 0 {
        return Ok(out);
    }
    let ys = Shape::from(x.dims()).contiguous_strides();
    let outer: Vec<usize> = (0..x.rank()).filter(|&d| d != dim).collect();
    let pick = |v: &[usize]| outer.iter().map(|&d| v[d]).collect::<Vec<_>>();
    let (od, oxs, oys) = (pick(x.dims()), pick(x.layout().strides()), pick(&ys));
    let c = coalesce(&od, &[&oxs, &oys]);
    let p = SoftmaxParams {
        n_rows: n_rows as i64,
        row_len: row_len as i64,
        outer_rank: c.dims.len() as i32,
        log: log as i32,
        x_stride: x.layout().strides()[dim] as i64,
        y_stride: ys[dim] as i64,
        outer_dims: fixed(op, x.shape(), &c.dims)?,
        x_outer_strides: fixed(op, x.shape(), &c.strides[0])?,
        y_outer_strides: fixed(op, x.shape(), &c.strides[1])?,
    };
    let k = kernels(dev)?;
    let (xp, yp) = (ptr(x)?, ptr(&out)?);
    if row_len <= WARP_ROW_MAX {
        let cfg = k.grid_1d(n_rows * 32, 256, 8);
        launch!(k, &format!("softmax_warp_{sfx}"), cfg, &p, &xp, &yp)?;
    } else {
        let cfg = k.grid_1d(n_rows * BLOCK_THREADS as usize, BLOCK_THREADS, 4);
        launch!(k, &format!("softmax_block_{sfx}"), cfg, &p, &xp, &yp)?;
    }
    Ok(out)
}

/// See [`crate::ops::softmax`].
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    run("softmax", x, dim, false)
}

/// See [`crate::ops::log_softmax`].
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    run("log_softmax", x, dim, true)
}
