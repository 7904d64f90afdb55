//! The `selective-scan` lab.

use crate::{LabError, LabOptions, LabRun, Result};

/// Runs the lab.
pub fn run(opts: &LabOptions) -> Result<LabRun> {
    let _ = opts;
    Err(LabError::Msg("lab `selective-scan` is not implemented yet".into()))
}
