//! Reference matmul ops (see the module docs of `reference`).

use moeba_tensor::{DType, Device, Error, Result, Shape, Tensor};

/// `a (..., m, k) @ b (..., k, n)` with broadcast batch dims, as a plain f64 triple loop over
/// logical indices. Returns an f64 tensor of shape `batch + [m, n]` whatever the input dtype.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ra, rb) = (a.rank(), b.rank());
    let mismatch = || Error::ShapeMismatch { op: "matmul", lhs: a.shape().clone(), rhs: b.shape().clone() };
    if ra < 2 || rb < 2 || a.dims()[ra - 1] != b.dims()[rb - 2] {
        return Err(mismatch());
    }
    let (m, k, n) = (a.dims()[ra - 2], a.dims()[ra - 1], b.dims()[rb - 1]);
    let batch = Shape::new(&a.dims()[..ra - 2])
        .broadcast_with("matmul", &Shape::new(&b.dims()[..rb - 2]))
        .map_err(|_| mismatch())?;
    let with = |tail: [usize; 2]| batch.dims().iter().copied().chain(tail).collect::<Vec<_>>();
    let av = a.broadcast_as(with([m, k]))?.to_vec_f64()?;
    let bv = b.broadcast_as(with([k, n]))?.to_vec_f64()?;
    let nb = batch.elem_count();
    let mut out = vec![0.0f64; nb * m * n];
    for t in 0..nb {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += av[(t * m + i) * k + p] * bv[(t * k + p) * n + j];
                }
                out[(t * m + i) * n + j] = s;
            }
        }
    }
    Tensor::from_vec(out, with([m, n]), &Device::Cpu)?.to_dtype(DType::F64)
}
