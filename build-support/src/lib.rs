//! moeba-build: the build-dependency of moeba-kernels behind its `cuda` feature.
//! (Filled in by the CUDA pipeline work.)

/// Compiles the CUDA kernels and generates their bindings.
pub fn build_kernels() {}
