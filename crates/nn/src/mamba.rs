//! The Mamba-1 block and its inference cache.
