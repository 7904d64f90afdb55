//! Causal depthwise conv1d: forward, backward and the single-step update.
