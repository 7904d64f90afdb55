//! The five labs, one file each. Each exposes `run(&LabOptions) -> Result<LabRun>`.

pub mod architectures;
pub mod context_length;
pub mod expert_patterns;
pub mod load_balancing;
pub mod selective_scan;
