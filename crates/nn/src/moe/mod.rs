//! The Mixture-of-Experts layer, its routing strategies, losses and monitoring.
//!
//! A [`MoeLayer`] sends each token to a few experts (SwiGLU MLPs) chosen by a router, runs only
//! those, and combines their outputs with the router's weights; an optional shared expert runs
//! on every token. The computation is the dropless MegaBlocks pipeline of `moeba_kernels`
//! (fused top-k gating, a stable counting-sort plan, grouped expert GEMMs, a weighted
//! un-permute), recorded as a handful of fused nodes on the tape.
//!
//! - [`MoeConfig`] (sizes, score function, normalisation, capacity, jitter, bias balancing,
//!   [`RoutingKind`]) with [`MoeConfig::validate`];
//! - [`strategy`]: the routing strategies behind one trait, [`RoutingStrategy`];
//! - [`losses`]: load balancing (Switch/GShard), variance of usage, router z-loss, returned in
//!   [`AuxLosses`] by every forward (no globals);
//! - [`RoutingStats`] and [`CollapseDetector`] for monitoring;
//! - [`BiasBalancer`]: DeepSeek-V3's aux-loss-free balancing bias.
//!
//! ```
//! use moeba_autograd::Var;
//! use moeba_nn::moe::{MoeConfig, MoeContext, MoeLayer};
//! use moeba_nn::ParamStore;
//! use moeba_tensor::{DType, Device, Tensor};
//! let store = ParamStore::new(DType::F32, Device::Cpu, 0);
//! let layer = MoeLayer::new(&store.root().pp("mlp"), &MoeConfig::new(16, 32, 4, 2))?;
//! let x = Var::constant(Tensor::randn(1, (2, 5, 16), 0.0, 1.0, DType::F32, &Device::Cpu)?);
//! let y = layer.forward(&x, &MoeContext::default())?;
//! assert_eq!(y.out.dims(), &[2, 5, 16]);
//! assert_eq!(y.stats.counts.iter().sum::<f64>(), 20.0); // 10 tokens × 2 experts
//! # Ok::<(), moeba_tensor::Error>(())
//! ```

pub mod balancing;
pub mod config;
pub mod experts;
pub mod layer;
pub mod losses;
pub mod stats;
pub mod strategy;

pub use balancing::BiasBalancer;
pub use config::{capacity_for, MoeConfig, RoutingKind};
pub use experts::{MoeWeights, SharedExpertWeights};
pub use layer::{MoeContext, MoeLayer, MoeOutput};
pub use losses::{AuxLosses, LbConvention};
pub use moeba_kernels::ops::MoeScoreFn;
pub use stats::{CollapseDetector, CollapseWarning, CollapsedExpert, RoutingStats};
pub use strategy::{RouteInput, Routed, RouterParamSpec, RoutingStrategy};
