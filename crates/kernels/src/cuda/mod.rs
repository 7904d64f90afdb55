//! CUDA launchers for the ops (the `cuda` feature). (Filled in by the CUDA pipeline work.)
