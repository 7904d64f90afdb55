//! The counting global allocator of `moeba inspect --measure` and `moeba lab`: moeba-lab's
//! [`moeba_lab::alloc::CountingAlloc`] (the system allocator, plus, while counting is on, the
//! bytes currently allocated and the peak since the last [`reset_peak`]). Registered in
//! `main.rs`; one allocator serves both commands.

pub use moeba_lab::alloc::{peak_bytes, reset_peak, CountingAlloc as Counting};

/// Starts counting (idempotent).
pub fn enable() {
    let _registered = moeba_lab::alloc::enable();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_peak_above_the_start() {
        // `main.rs` registers the allocator for the whole binary, the unit tests included.
        assert!(moeba_lab::alloc::enable(), "the counting allocator is not registered");
        enable();
        reset_peak();
        let start = moeba_lab::alloc::current_bytes();
        let v = std::hint::black_box(vec![1u8; 4 << 20]);
        let mid = moeba_lab::alloc::current_bytes();
        drop(v);
        // Other threads of the test harness may allocate too: bounds, not equalities.
        assert!(mid - start >= 4 << 20, "current grew by {}", mid - start);
        assert!(peak_bytes() >= 4 << 20, "peak {}", peak_bytes());
        reset_peak();
        assert!(peak_bytes() < 1 << 20, "peak after reset {}", peak_bytes());
    }
}
