//! Concatenation on the CPU: contiguous blocks copied with `copy_from_slice`, in parallel for big
//! outputs.
//!
//! With `outer` = the product of the dims before `dim` and `inner` the product after it, output
//! row `o` (of `outer`) is input 0's block `o`, then input 1's block `o`, and so on, where
//! input `i`'s block has `dims_i[dim] * inner` elements.

use moeba_tensor::{DType, Device, Error, Result, Tensor, WithDType};
use rayon::prelude::*;

use super::index::{with_dtype, PAR_ELEMS};

/// See [`crate::ops::concat`] (which has checked that `xs` is non-empty and that dtypes and
/// the dims other than `dim` agree).
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::invalid("concat", "xs", "no tensors given"))?;
    with_dtype!(first.dtype(), T => concat_t::<T>(xs, dim))
}

fn concat_t<T: WithDType>(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let dims0 = xs[0].dims();
    let outer: usize = dims0[..dim].iter().product();
    let inner: usize = dims0[dim + 1..].iter().product();
    let mut out_dims = dims0.to_vec();
    out_dims[dim] = xs.iter().map(|x| x.dims()[dim]).sum();
    let parts = xs.iter().map(|x| x.cpu_data::<T>()).collect::<Result<Vec<_>>>()?;
    let segs: Vec<usize> = xs.iter().map(|x| x.dims()[dim] * inner).collect();
    let row_len: usize = segs.iter().sum();
    let mut out = vec![T::zeroed(); outer * row_len];
    if out.is_empty() {
        return Tensor::from_vec(out, out_dims, &Device::Cpu);
    }
    let fill_row = |(o, row): (usize, &mut [T])| {
        let mut at = 0;
        for (p, &s) in parts.iter().zip(&segs) {
            row[at..at + s].copy_from_slice(&p[o * s..(o + 1) * s]);
            at += s;
        }
    };
    if out.len() < PAR_ELEMS {
        out.chunks_mut(row_len).enumerate().for_each(fill_row);
    } else if outer > 1 {
        out.par_chunks_mut(row_len)
            .enumerate()
            .with_min_len((PAR_ELEMS / 4 / row_len).max(1))
            .for_each(fill_row);
    } else {
        // One output row: copy every input's slice in pieces, in parallel.
        const PIECE: usize = PAR_ELEMS / 2;
        let mut jobs: Vec<(&mut [T], &[T])> = Vec::new();
        let mut rest: &mut [T] = &mut out;
        for (p, &s) in parts.iter().zip(&segs) {
            let (dst, tail) = rest.split_at_mut(s);
            rest = tail;
            jobs.extend(dst.chunks_mut(PIECE).zip(p[..s].chunks(PIECE)));
        }
        jobs.into_par_iter().for_each(|(d, s)| d.copy_from_slice(s));
    }
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}
