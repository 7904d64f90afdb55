//! moeba-train: data, optimizers, schedules, the training loop and checkpoints.
//!
//! Today it trains moeba's first end-to-end model, a byte-level [`moeba_nn::WindowLm`], on the
//! embedded tiny Shakespeare corpus; the TOML-configured hybrid trainer grows here.
//!
//! May depend on every crate below it (nn, autograd, kernels, tensor).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{generate, load_run, train, ModelOptions, StepLog, TrainError, TrainOptions, TrainSummary};
