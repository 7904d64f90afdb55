//! A counting global allocator, so that labs can measure peak heap bytes: the system
//! allocator plus (while counting is on) the bytes currently allocated and the peak since the
//! last [`reset_peak`].
//!
//! A binary (the `moeba` command, a lab test binary) registers it with
//! `#[global_allocator] static A: moeba_lab::alloc::CountingAlloc = moeba_lab::alloc::CountingAlloc;`.
//! Counting is off until [`enable`] is called, so a process pays one relaxed atomic load per
//! allocation and nothing else. [`enable`] reports whether the allocator is registered at all:
//! without it, nothing is counted and labs report memory as unmeasured, never as a number.
//!
//! Counts are signed deltas: memory allocated before a measurement and freed during it lowers
//! the current figure, which is exactly how much the live heap went down, so "peak above the
//! start" stays correct.
//!
//! Which threads count: every thread, until a [`measured_pool`] is built; from then on only the
//! threads of such pools (marked as they start). A lab runs its measurements inside one, so that
//! other work in the same process (the other tests of a test binary, a progress-bar thread) does
//! not leak into its figures, while the kernels' rayon workers do count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

/// The system allocator with byte counting (see the module docs).
pub struct CountingAlloc;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Set by the allocator itself while counting: proof that it is the global allocator.
static SEEN: AtomicBool = AtomicBool::new(false);
/// Set once a [`measured_pool`] exists: from then on only marked threads count.
static SCOPED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static BASE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Whether this thread belongs to a [`measured_pool`].
    static MARKED: Cell<bool> = const { Cell::new(false) };
}

/// Whether an allocation on this thread counts (counting on; every thread, or a marked one).
#[inline]
fn counts() -> bool {
    ENABLED.load(Relaxed) && (!SCOPED.load(Relaxed) || MARKED.try_with(Cell::get).unwrap_or(false))
}

#[inline]
fn grow(bytes: isize) {
    let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

#[inline]
fn shrink(bytes: isize) {
    CURRENT.fetch_sub(bytes, Relaxed);
}

#[inline]
fn counted_alloc(bytes: usize) {
    if ENABLED.load(Relaxed) {
        if !SEEN.load(Relaxed) {
            SEEN.store(true, Relaxed);
        }
        if counts() {
            grow(bytes as isize);
        }
    }
}

// SAFETY: every method forwards to `System` with the same arguments and only updates counters.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            counted_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            counted_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (hence by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        if counts() {
            shrink(layout.size() as isize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which we pass on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && counts() {
            let delta = new_size as isize - layout.size() as isize;
            if delta >= 0 {
                counted_alloc(delta as usize);
            } else {
                shrink(-delta);
            }
        }
        p
    }
}

/// Starts counting (idempotent) and returns [`measuring`]: whether [`CountingAlloc`] is the
/// process's global allocator (checked with one small allocation) and this thread is counted.
/// When it is not, [`peak_bytes`] means nothing: report memory as unmeasured.
pub fn enable() -> bool {
    ENABLED.store(true, Relaxed);
    let probe = std::hint::black_box(vec![0u8; 64]);
    drop(probe);
    measuring()
}

/// Whether this thread's allocations are being counted: counting is on, the counting allocator
/// is registered (see [`enable`]) and, once a [`measured_pool`] exists, this thread is one of
/// its threads. Without that, a peak would read 0: report it as unmeasured.
pub fn measuring() -> bool {
    ENABLED.load(Relaxed) && SEEN.load(Relaxed) && counts()
}

/// Bytes allocated minus bytes freed since counting started (may be negative if memory from
/// before was freed).
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

/// Runs `f` and returns its result with the peak heap bytes it added above the level at the
/// start, or `None` when the counting allocator is not registered (unmeasured).
pub fn measure_peak<T>(f: impl FnOnce() -> T) -> (T, Option<u64>) {
    if !enable() {
        return (f(), None);
    }
    reset_peak();
    let out = f();
    (out, Some(peak_bytes() as u64))
}

/// A rayon pool (of `threads` workers; 0: rayon's default, `RAYON_NUM_THREADS` or the cores)
/// whose threads are the only ones counted from now on (see the module docs). Run a measurement
/// with `pool.install(|| measure_peak(…))`.
pub fn measured_pool(threads: usize) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moeba-lab-{i}"))
        .start_handler(|_| MARKED.with(|m| m.set(true)))
        .build()?;
    SCOPED.store(true, Relaxed);
    Ok(pool)
}

/// Serialises measurements within a process: the counters are process-wide, so two measured
/// pools at once would count each other's bytes. Hold the guard for the whole measurement.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static ALLOC: CountingAlloc = CountingAlloc;

    #[test]
    fn pool_threads_alone_count() {
        let pool = measured_pool(2).unwrap();
        assert!(!enable(), "the test thread is not one of the pool's");
        assert!(pool.install(measuring));
        let (v, peak) = pool.install(|| measure_peak(|| std::hint::black_box(vec![1u8; 8 << 20])));
        assert_eq!(v.len(), 8 << 20);
        let peak = peak.unwrap();
        assert!((8 << 20..9 << 20).contains(&peak), "peak {peak}");
        // Allocations outside the pool do not count.
        pool.install(reset_peak);
        let outside = std::hint::black_box(vec![1u8; 16 << 20]);
        assert!(peak_bytes() < 1 << 20, "peak {}", peak_bytes());
        drop(outside);
        // Unmeasured outside the pool: None, never a number.
        assert_eq!(measure_peak(|| 1).1, None);
    }
}
