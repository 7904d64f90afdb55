//! CPU causal depthwise conv1d.
