// Link-time settings that make the `trainer` binary (and the test and bench binaries) find
// libtorch and use CUDA without any environment variable.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // Applies to every linked target: the binary, unit-test and integration-test executables.
    // The libtorch folder of the torch wheel the build used (a stable per-user cache path).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Nothing references libtorch_cuda directly, so the linker would drop it and CUDA would
    // silently report "not available" on a GPU machine.
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
