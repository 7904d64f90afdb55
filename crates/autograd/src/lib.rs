//! moeba-autograd: reverse-mode automatic differentiation over moeba-kernels' ops.
//!
//! May depend on moeba-tensor and moeba-kernels only.
