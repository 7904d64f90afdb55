//! When and how the CPU kernels use rayon: only for large outputs, in contiguous chunks.
//!
//! Small tensors never touch the thread pool: waking it costs a few microseconds, more than a
//! small op takes. Large outputs are cut into contiguous pieces of [`CHUNK_BYTES`] (tens of KB:
//! big enough that per-task overhead vanishes, small enough to balance load and stay in L2),
//! which rayon's work stealing spreads over the threads.
//!
//! Helpers:
//! - [`use_threads`] / [`chunk_len`]: the decision and the chunk size, for code that splits work
//!   itself;
//! - [`for_each_chunk_mut`]: runs a closure on chunks of a mutable slice;
//! - [`collect_uninit`]: builds a `Vec<T>` of `n` elements by writing chunks in parallel, without
//!   zero-filling the allocation first;
//! - [`for_each_block`]: runs a closure on index ranges (rows, columns...) whose cost is given.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

/// Work (in elements touched) below which an op runs on the calling thread.
pub const MIN_PAR_WORK: usize = 32 * 1024;

/// Target size of one parallel piece of output, in bytes.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Whether `work` elements of work are worth spreading over the thread pool.
pub fn use_threads(work: usize) -> bool {
    work >= MIN_PAR_WORK && rayon::current_num_threads() > 1
}

/// Elements of `T` in one chunk of [`CHUNK_BYTES`] (at least 1).
pub fn chunk_len<T>() -> usize {
    (CHUNK_BYTES / std::mem::size_of::<T>().max(1)).max(1)
}

/// Calls `f(start, chunk)` on consecutive chunks of `data` (`start` = the chunk's first index),
/// in parallel when `data` is large, else once with the whole slice.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let n = data.len();
    if !use_threads(n) {
        if n > 0 {
            f(0, data);
        }
        return;
    }
    let c = chunk_len::<T>();
    data.par_chunks_mut(c).enumerate().for_each(|(i, chunk)| f(i * c, chunk));
}

/// A `Vec<T>` of `n` elements whose chunks are written by `f(start, chunk)` (in parallel when
/// large, see [`for_each_chunk_mut`]). The memory is not zeroed first.
///
/// # Safety
/// `f` must write every element of every chunk it is given.
pub unsafe fn collect_uninit<T: Send>(n: usize, f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut v = Vec::<T>::with_capacity(n);
    advise_huge_pages(v.spare_capacity_mut());
    for_each_chunk_mut(&mut v.spare_capacity_mut()[..n], f);
    // SAFETY: the caller guarantees that `f` initialised all `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// Allocations from which [`advise_huge_pages`] asks for transparent huge pages.
pub const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Hints the kernel (Linux: `madvise(MADV_HUGEPAGE)`) to back a large, not yet touched buffer
/// with 2 MiB pages. A fresh multi-MB output otherwise costs one page fault per 4 KiB when
/// first written, which takes longer than the op itself (a 64 MiB add spends ~3/4 of its time
/// in the kernel's fault path). Only the whole 2 MiB-aligned pages inside `buf` are advised;
/// buffers under [`HUGE_PAGE_MIN_BYTES`], other systems, and failures are silently skipped
/// (it is only a hint; the kernel still zero-fills the pages).
pub fn advise_huge_pages<T>(buf: &mut [MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < HUGE_PAGE_MIN_BYTES {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let lo = start.div_ceil(HUGE) * HUGE;
        let hi = (start + bytes) / HUGE * HUGE;
        if hi > lo {
            // SAFETY: `lo..hi` lies inside `buf`, which this process owns; MADV_HUGEPAGE changes
            // no contents and no permissions.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Calls `f(range)` on consecutive ranges covering `0..n`, where each index costs about
/// `work_per_item` elements of work: in parallel blocks of about [`CHUNK_BYTES`]/4 elements of
/// work when the total is large, else once with `0..n`.
pub fn for_each_block(n: usize, work_per_item: usize, f: impl Fn(Range<usize>) + Sync) {
    let w = work_per_item.max(1);
    if n == 0 {
        return;
    }
    if !use_threads(n.saturating_mul(w)) {
        f(0..n);
        return;
    }
    let per = (CHUNK_BYTES / 4 / w).max(1);
    // Keep at least a few blocks per thread for balance.
    let per = per.min(n.div_ceil(4 * rayon::current_num_threads())).max(1);
    let blocks = n.div_ceil(per);
    (0..blocks).into_par_iter().for_each(|b| f(b * per..((b + 1) * per).min(n)));
}

/// Like [`for_each_chunk_mut`] for output made of rows of `row_len` elements that each cost
/// `work_per_row`: calls `f(first_row, rows)` with whole rows only.
pub fn for_each_rows_mut<T: Send>(
    data: &mut [T],
    row_len: usize,
    work_per_row: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if row_len == 0 || data.is_empty() {
        return;
    }
    let rows = data.len() / row_len;
    if !use_threads(rows.saturating_mul(work_per_row.max(1))) {
        f(0, data);
        return;
    }
    let per = (CHUNK_BYTES / 4 / work_per_row.max(1)).max(1);
    let per = per.min(rows.div_ceil(4 * rayon::current_num_threads())).max(1);
    data.par_chunks_mut(per * row_len).enumerate().for_each(|(i, c)| f(i * per, c));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn helpers_cover_every_index_once() {
        for n in [0, 1, 100, MIN_PAR_WORK + 17, 5 * MIN_PAR_WORK] {
            // SAFETY: the closure writes every element of its chunk.
            let v: Vec<usize> = unsafe {
                collect_uninit(n, |s, c| {
                    for (i, o) in c.iter_mut().enumerate() {
                        o.write(s + i);
                    }
                })
            };
            assert!(v.iter().enumerate().all(|(i, &x)| i == x), "collect_uninit {n}");

            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each_block(n, 3, |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "for_each_block {n}");

            let row = 7;
            let mut rows = vec![0usize; n * row];
            for_each_rows_mut(&mut rows, row, 50, |first, c| {
                assert_eq!(c.len() % row, 0);
                for (i, x) in c.iter_mut().enumerate() {
                    *x = first * row + i;
                }
            });
            assert!(rows.iter().enumerate().all(|(i, &x)| i == x), "for_each_rows_mut {n}");
        }
    }
}
