//! A counting global allocator for `moeba inspect --measure`: the system allocator, plus (while
//! counting is on) the bytes currently allocated and the peak since the last [`reset_peak`].
//!
//! Counting is off until [`enable`] is called, so training pays one relaxed atomic load per
//! allocation and nothing else. Counts are signed deltas: memory allocated before counting
//! started and freed during a measurement lowers the current figure, which is exactly how much
//! the process's live heap went down, so "peak above the start" stays correct.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

/// The system allocator with byte counting (see the module docs).
pub struct Counting;

static ENABLED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static BASE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

#[inline]
fn grow(bytes: isize) {
    let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

#[inline]
fn shrink(bytes: isize) {
    CURRENT.fetch_sub(bytes, Relaxed);
}

// SAFETY: every method forwards to `System` with the same arguments and only updates counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            grow(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            grow(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (hence by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        if ENABLED.load(Relaxed) {
            shrink(layout.size() as isize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which we pass on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            let delta = new_size as isize - layout.size() as isize;
            if delta >= 0 {
                grow(delta);
            } else {
                shrink(-delta);
            }
        }
        p
    }
}

/// Starts counting (idempotent).
pub fn enable() {
    ENABLED.store(true, Relaxed);
}

/// Bytes allocated minus bytes freed since counting started (may be negative if memory from
/// before was freed).
#[cfg(test)]
pub fn current_bytes() -> isize {
    CURRENT.load(Relaxed)
}

/// Starts a measurement: the peak is reset to the bytes allocated now.
pub fn reset_peak() {
    let now = CURRENT.load(Relaxed);
    BASE.store(now, Relaxed);
    PEAK.store(now, Relaxed);
}

/// The most bytes allocated at any moment since [`reset_peak`], above the level at that call.
pub fn peak_bytes() -> usize {
    (PEAK.load(Relaxed) - BASE.load(Relaxed)).max(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_peak_above_the_start() {
        enable();
        reset_peak();
        let start = current_bytes();
        let v = vec![1u8; 4 << 20];
        let mid = current_bytes();
        drop(v);
        // Other threads of the test harness may allocate too: bounds, not equalities.
        assert!(mid - start >= 4 << 20, "current grew by {}", mid - start);
        assert!(peak_bytes() >= 4 << 20, "peak {}", peak_bytes());
        reset_peak();
        assert!(peak_bytes() < 1 << 20, "peak after reset {}", peak_bytes());
    }
}
