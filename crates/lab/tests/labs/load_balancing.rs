//! The `load-balancing` lab in quick mode.
