//! Fused ops with their own backward kernels: each records ONE node on the tape (through
//! [`CustomOp`](crate::CustomOp)) whose backward calls the matching backward kernel of
//! `moeba_kernels::ops`, instead of a tape of small ops.

pub mod attention;
pub mod conv1d;
pub mod moe;
pub mod selective_scan;
pub mod ssd;
