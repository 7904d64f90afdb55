//! Reference matmul ops (see the module docs of `reference`).
