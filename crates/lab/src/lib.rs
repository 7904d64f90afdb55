//! moeba-lab: the five experiments of `moeba lab` that show, with measured figures and plots,
//! why hybrids of Mamba, attention and experts work.
//!
//! | lab | question |
//! |---|---|
//! | `context-length` | how time, memory and cache grow with the context for attention, Mamba-1, Mamba-2 and a hybrid block |
//! | `selective-scan` | does selection (input-dependent Δ, B, C) matter? selective copying against the LTI ablation |
//! | `expert-patterns` | which tokens go to which expert, per layer |
//! | `load-balancing` | which balancing settings collapse, and what balancing costs in loss |
//! | `architectures` | transformer, Mamba, Mamba-2, MoE transformer and Jamba-style hybrid at matched size and time |
//!
//! Each lab writes into its run directory `results.json` (every measured number, the machine,
//! the versions, the config), plots (PNG and SVG) and `report.md` (question, setup, table,
//! pictures, answer). `--quick` sizes finish in under two minutes on a 2-core CPU.
//!
//! May depend on moeba-train and everything below it.

pub mod alloc;
pub mod labs;
pub mod machine;
pub mod plot;
pub mod report;

use std::path::PathBuf;

pub use report::{LabRun, Report};

/// Errors of a lab: bad options, a failed run, an I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A bad lab name or option; the message names it and says what is accepted.
    #[error("{0}")]
    Invalid(String),
    /// A tensor or model error.
    #[error(transparent)]
    Tensor(#[from] moeba_tensor::Error),
    /// A training run failed.
    #[error(transparent)]
    Train(#[from] moeba_train::TrainError),
    /// A config error.
    #[error(transparent)]
    Config(#[from] moeba_train::ConfigError),
    /// A checkpoint (or metrics / plot file) that cannot be read or written.
    #[error(transparent)]
    Checkpoint(#[from] moeba_train::checkpoint::CheckpointError),
    /// Writing the results failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Anything else, as a sentence.
    #[error("{0}")]
    Msg(String),
}

/// A lab's result type.
pub type Result<T> = std::result::Result<T, LabError>;

/// Where the lab's models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabDevice {
    /// The CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU (needs the `cuda` feature and a device; refused with a clear error otherwise).
    Cuda,
}

/// Options shared by every lab (`moeba lab NAME [--out DIR] [--quick] [--device D] [--set k=v]…`).
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The run directory (created; results.json, plots and report.md go here).
    pub out: PathBuf,
    /// Small sizes that finish in under two minutes on a 2-core CPU (what the tests run).
    pub quick: bool,
    /// Where to run.
    pub device: LabDevice,
    /// `key=value` overrides of the lab's own settings (each lab lists its keys; an unknown key
    /// is an error naming it).
    pub overrides: Vec<(String, String)>,
    /// Memory budget in bytes (context-length stops a mixer before the next length would exceed
    /// it). Default 8 GiB.
    pub mem_budget: u64,
    /// Show indicatif progress bars on stderr.
    pub progress: bool,
}

impl LabOptions {
    /// Defaults: `out`, full size, CPU, no overrides, 8 GiB, no progress bars.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        LabOptions {
            out: out.into(),
            quick: false,
            device: LabDevice::Cpu,
            overrides: Vec::new(),
            mem_budget: 8 << 30,
            progress: false,
        }
    }
}

impl LabOptions {
    /// Checks that every `--set` key is one of `allowed` (the lab's settings); an unknown key is
    /// an error naming it and listing the allowed ones.
    pub fn check_keys(&self, lab: &str, allowed: &[&str]) -> Result<()> {
        for (k, _) in &self.overrides {
            if !allowed.contains(&k.as_str()) {
                return Err(LabError::Invalid(format!(
                    "lab `{lab}`: unknown setting `{k}`; its settings are: {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The value of setting `key`: the last `--set key=…` parsed as `T`, else `default`. A value
    /// that does not parse is an error naming the key and the value.
    pub fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T> {
        match self.overrides.iter().rev().find(|(k, _)| k == key) {
            None => Ok(default),
            Some((_, v)) => v.parse().map_err(|_| {
                LabError::Invalid(format!(
                    "--set {key}={v}: cannot read `{v}` as a {}",
                    std::any::type_name::<T>().rsplit("::").next().unwrap_or("value")
                ))
            }),
        }
    }
}

/// The labs, by name.
pub const LAB_NAMES: [&str; 5] =
    ["context-length", "selective-scan", "expert-patterns", "load-balancing", "architectures"];

/// Runs lab `name` with `opts`; returns the finished run (its directory, results and report).
/// An unknown name is an error listing the labs.
pub fn run_lab(name: &str, opts: &LabOptions) -> Result<LabRun> {
    if opts.device == LabDevice::Cuda {
        return Err(LabError::Invalid(
            "--device cuda: moeba's CUDA backend does not run these models yet (issues 8 and 9); use --device cpu"
                .into(),
        ));
    }
    match name {
        "context-length" => labs::context_length::run(opts),
        "selective-scan" => labs::selective_scan::run(opts),
        "expert-patterns" => labs::expert_patterns::run(opts),
        "load-balancing" => labs::load_balancing::run(opts),
        "architectures" => labs::architectures::run(opts),
        other => {
            Err(LabError::Invalid(format!("unknown lab `{other}`; the labs are: {}", LAB_NAMES.join(", "))))
        }
    }
}
