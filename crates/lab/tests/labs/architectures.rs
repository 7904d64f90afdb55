//! The `architectures` lab in quick mode.
