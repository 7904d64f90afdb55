//! The Mamba-2 block and its inference cache.
