//! The Mixture-of-Experts layer, its routing strategies, losses and monitoring.
