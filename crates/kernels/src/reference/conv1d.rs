//! Plain causal depthwise conv1d.
