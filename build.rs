//! Compiles `kernels/*.cu` to PTX with nvcc under the `cuda` feature. Without the feature it
//! does nothing, so a plain build needs no CUDA toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // The kernels are not written yet: nothing to compile. The CUDA issue adds the nvcc step.
    println!("cargo::rerun-if-changed=kernels");
}
