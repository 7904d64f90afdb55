//! CPU fused top-k gating.
