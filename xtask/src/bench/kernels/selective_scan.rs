//! The selective scan (forward, forward+backward), causal conv1d, the Mamba block.
