//! Strided → contiguous copies on the CPU: [`moeba_tensor::gather_into`] on pieces of the
//! outermost dim, in parallel above the size threshold of [`super::par`].

use moeba_tensor::{gather_into, CpuStorage, Error, Layout, Result, Tensor, WithDType};

use super::par;

/// See [`crate::ops::contiguous`].
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    let storage = x.storage().as_cpu().ok_or_else(|| Error::Unsupported {
        op: "contiguous",
        msg: format!("cpu::copy::contiguous called with a tensor on {}", x.device()),
    })?;
    fn wrap<T: WithDType>(v: Vec<T>) -> CpuStorage {
        T::into_cpu_storage(v)
    }
    let out = moeba_tensor::map_cpu_storage!(storage, v => wrap(copy(v, x.layout())));
    Tensor::from_cpu_storage(out, x.shape().clone())
}

/// The logical elements of `layout` in `src`, row-major; rows of the outermost dim are copied
/// in parallel blocks when the tensor is large.
fn copy<T: WithDType>(src: &[T], layout: &Layout) -> Vec<T> {
    let n = layout.elem_count();
    let mut out = Vec::with_capacity(n);
    let buf = &mut out.spare_capacity_mut()[..n];
    par::advise_huge_pages(buf);
    let rows = layout.dims().first().copied().unwrap_or(1);
    if rows < 2 || !par::use_threads(n) {
        gather_into(src, layout, buf);
    } else {
        let row_len = n / rows;
        par::for_each_rows_mut(buf, row_len, row_len, |first, chunk| {
            let piece = layout.narrow(0, first, chunk.len() / row_len).expect("rows within the layout");
            gather_into(src, &piece, chunk);
        });
    }
    // SAFETY: gather_into initialised all n elements (every row block is covered exactly once).
    unsafe { out.set_len(n) };
    out
}
