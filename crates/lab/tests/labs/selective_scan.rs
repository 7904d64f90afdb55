//! The `selective-scan` lab in quick mode.
