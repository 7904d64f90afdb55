//! The `expert-patterns` lab in quick mode.
