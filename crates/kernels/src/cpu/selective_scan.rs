//! CPU fused selective scan (S6).
