//! Multi-head latent attention (DeepSeek-V2) and its latent cache.
