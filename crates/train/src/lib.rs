//! moeba-train: the TOML run config, data and tokenizers, the optimizer and schedules, the
//! training loop of the hybrid model, checkpoints, metrics (JSONL and TensorBoard), plots,
//! sampling, and the reports behind `moeba inspect` and `moeba experts`.
//!
//! May depend on every crate below it (nn, autograd, kernels, tensor).

pub mod build;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod experts;
pub mod hf;
pub mod inspect;
pub mod metrics;
pub mod optim;
pub mod plots;
pub mod sampling;
pub mod schedule;
pub mod tensorboard;
pub mod tokenizer;
pub mod trainer;

pub use build::build_model;
pub use config::{ConfigError, ModelConfig, RecomputeLevel, RunConfig, TrainerConfig, DEFAULT_CONFIG};
pub use hf::{load_hf_model, HfDir, HfModel};
pub use metrics::StepLog;
pub use sampling::{
    generate, generate_capped, generate_ids, generate_ids_capped, generate_ids_until, sample_token,
    SampleOptions,
};
pub use tokenizer::Tokenizer;
pub use trainer::{
    evaluate, evaluate_with_stats, load_run, train, train_with, EvalResult, LoadedRun, RunControl,
    TrainError, TrainOptions, TrainSummary,
};
