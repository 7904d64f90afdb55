//! moeba-train: configuration, data, optimizers, schedules, the training loop and checkpoints.
//!
//! May depend on every crate below it (nn, autograd, kernels, tensor).
