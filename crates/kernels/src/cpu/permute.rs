//! CPU token permutation for MoE (counting sort by expert, weighted un-permute).
