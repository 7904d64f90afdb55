//! CPU grouped expert GEMM.
