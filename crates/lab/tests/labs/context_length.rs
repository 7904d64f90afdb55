//! The `context-length` lab in quick mode.
