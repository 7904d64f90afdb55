//! With the `cuda` feature: compile ../../kernels/*.cu into one fatbin and run bindgen on
//! ../../kernels/include (see moeba-build). Without it: nothing.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    moeba_build::build_kernels();
}
