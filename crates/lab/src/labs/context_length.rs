//! The `context-length` lab.

use crate::{LabError, LabOptions, LabRun, Result};

/// Runs the lab.
pub fn run(opts: &LabOptions) -> Result<LabRun> {
    let _ = opts;
    Err(LabError::Msg("lab `context-length` is not implemented yet".into()))
}
