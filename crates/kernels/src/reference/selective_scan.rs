//! Plain sequential selective scan (mamba_ssm selective_scan_ref semantics).
