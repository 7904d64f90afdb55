//! Reference index ops (see the module docs of `reference`).
//!
//! Every function walks the output's logical multi-indices one element at a time and reads the
//! inputs through `to_vec_f64` (row-major logical order). Copying ops return the input's dtype
//! (exact for floats and for integers below 2^53); the losses return f64.

use moeba_tensor::{DType, Device, Error, Result, Shape, Tensor};

use super::{ravel, unravel};

/// An index value checked against `size`.
fn checked(op: &'static str, v: f64, size: usize) -> Result<usize> {
    if v < 0.0 || v >= size as f64 {
        return Err(Error::invalid(op, "index", format!("index {v} is out of range for size {size}")));
    }
    Ok(v as usize)
}

fn build(v: Vec<f64>, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// `out[.., j, ..] = x[.., ids[j], ..]` along `dim`.
pub fn index_select(x: &Tensor, dim: usize, ids: &Tensor) -> Result<Tensor> {
    let xv = x.to_vec_f64()?;
    let iv = ids.to_vec_f64()?;
    let mut dims = x.dims().to_vec();
    dims[dim] = iv.len();
    let mut out = Vec::new();
    for e in 0..dims.iter().product() {
        let mut idx = unravel(e, &dims);
        idx[dim] = checked("index_select", iv[idx[dim]], x.dims()[dim])?;
        out.push(xv[ravel(&idx, x.dims())]);
    }
    build(out, dims, x.dtype())
}

/// torch.gather: `out[pos] = x[pos with pos[dim] = idx[pos]]`, output of idx's shape.
pub fn gather(x: &Tensor, dim: usize, idx: &Tensor) -> Result<Tensor> {
    let xv = x.to_vec_f64()?;
    let iv = idx.to_vec_f64()?;
    let mut out = Vec::new();
    for (e, &v) in iv.iter().enumerate() {
        let mut pos = unravel(e, idx.dims());
        pos[dim] = checked("gather", v, x.dims()[dim])?;
        out.push(xv[ravel(&pos, x.dims())]);
    }
    build(out, idx.dims(), x.dtype())
}

/// torch.scatter_add: a copy of `x` with `out[pos with pos[dim] = idx[pos]] += src[pos]`, in
/// the row-major order of `idx`.
pub fn scatter_add(x: &Tensor, dim: usize, idx: &Tensor, src: &Tensor) -> Result<Tensor> {
    let mut out = x.to_vec_f64()?;
    let iv = idx.to_vec_f64()?;
    let sv = src.to_vec_f64()?;
    for (e, &v) in iv.iter().enumerate() {
        let mut pos = unravel(e, idx.dims());
        pos[dim] = checked("scatter_add", v, x.dims()[dim])?;
        out[ravel(&pos, x.dims())] += sv[e];
    }
    build(out, x.dims(), x.dtype())
}

/// `cond ? a : b` with all three broadcast together; `cond` nonzero (or NaN) is true.
pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape =
        cond.shape().broadcast_with("where_cond", a.shape())?.broadcast_with("where_cond", b.shape())?;
    let cv = cond.broadcast_as(shape.clone())?.to_vec_f64()?;
    let av = a.broadcast_as(shape.clone())?.to_vec_f64()?;
    let bv = b.broadcast_as(shape.clone())?.to_vec_f64()?;
    let out = (0..cv.len()).map(|i| if cv[i] != 0.0 { av[i] } else { bv[i] }).collect();
    build(out, shape, a.dtype())
}

/// Joins `xs` along `dim`: output element `pos` comes from the input whose range along `dim`
/// covers `pos[dim]`.
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::invalid("concat", "xs", "no tensors given"))?;
    let vals = xs.iter().map(|x| x.to_vec_f64()).collect::<Result<Vec<_>>>()?;
    let mut dims = first.dims().to_vec();
    dims[dim] = xs.iter().map(|x| x.dims()[dim]).sum();
    let mut out = Vec::new();
    for e in 0..dims.iter().product() {
        let mut pos = unravel(e, &dims);
        let mut which = 0;
        while pos[dim] >= xs[which].dims()[dim] {
            pos[dim] -= xs[which].dims()[dim];
            which += 1;
        }
        out.push(vals[which][ravel(&pos, xs[which].dims())]);
    }
    build(out, dims, first.dtype())
}

/// Per-row `(ln Σ_j e^(x_j), target)` in f64, `None` for ignored rows.
fn rows(logits: &Tensor, targets: &Tensor, ignore_index: Option<i64>) -> Result<Vec<Option<(f64, usize)>>> {
    let (n, v) = (logits.dims()[0], logits.dims()[1]);
    let xv = logits.to_vec_f64()?;
    let tv = targets.to_vec_f64()?;
    (0..n)
        .map(|r| {
            let t = tv[r] as i64;
            if Some(t) == ignore_index {
                return Ok(None);
            }
            if t < 0 || t as usize >= v {
                return Err(Error::invalid("cross_entropy", "targets", format!("target {t} at row {r}")));
            }
            let row = &xv[r * v..(r + 1) * v];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
            Ok(Some((lse, t as usize)))
        })
        .collect()
}

/// Mean over counted rows of `lse(row) - row[target]` (0 when every row is ignored), as an f64
/// rank-0 tensor.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: Option<i64>) -> Result<Tensor> {
    let xv = logits.to_vec_f64()?;
    let v = logits.dims()[1];
    let rs = rows(logits, targets, ignore_index)?;
    let (mut sum, mut count) = (0.0, 0usize);
    for (r, row) in rs.iter().enumerate() {
        if let Some((lse, t)) = row {
            sum += lse - xv[r * v + t];
            count += 1;
        }
    }
    let mean = if count == 0 { 0.0 } else { sum / count as f64 };
    Tensor::from_vec(vec![mean], (), &Device::Cpu)
}

/// `grad * (softmax(row) - onehot(target)) / count` on counted rows, 0 on ignored rows (f64).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<i64>,
    grad: f64,
) -> Result<Tensor> {
    let xv = logits.to_vec_f64()?;
    let v = logits.dims()[1];
    let rs = rows(logits, targets, ignore_index)?;
    let count = rs.iter().filter(|r| r.is_some()).count();
    let mut out = vec![0.0; xv.len()];
    for (r, row) in rs.iter().enumerate() {
        if let Some((lse, t)) = *row {
            for j in 0..v {
                let onehot = if j == t { 1.0 } else { 0.0 };
                out[r * v + j] = grad * ((xv[r * v + j] - lse).exp() - onehot) / count as f64;
            }
        }
    }
    Tensor::from_vec(out, logits.dims(), &Device::Cpu)
}
