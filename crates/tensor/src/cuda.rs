//! CUDA storage and devices (the `cuda` feature), through cudarc with dynamic loading.
//! (Filled in by the CUDA pipeline work.)
