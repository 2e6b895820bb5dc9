// Link-time settings that make the `trainer` binary (and the test and bench binaries) find
// libtorch and use CUDA without any environment variable.

/// The C++ shim, one file per thing it holds: mixed precision (autocast, fp16 unscaling), the
/// optimizer's kernels (Adam steps, gradients to none), TorchScript saving with extra files and
/// libtorch's build configuration. `src/shim/shim.h` has their shared helpers.
const SHIM_FILES: &[&str] = &[
    "src/shim/amp.cpp",
    "src/shim/adam.cpp",
    "src/shim/torchscript.cpp",
    "src/shim/build_info.cpp",
];
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    for file in SHIM_FILES.iter().chain(&["src/shim/shim.h"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // The C++ shim for what tch does not bind, compiled against the headers of the same torch
    // wheel into one library.
    let include = std::path::Path::new(&lib).join("../include");
    shim_build(&include)
        .files(SHIM_FILES)
        .compile("trainer_shim");
    // CUDA graphs of the training step, when this libtorch has CUDA and its headers are there.
    println!("cargo:rerun-if-changed=src/shim/graph.cpp");
    println!("cargo:rustc-check-cfg=cfg(trainer_graphs)");
    if let Some(dirs) = cuda_includes(std::path::Path::new(&lib)) {
        let mut build = shim_build(&include);
        for dir in dirs {
            build.include(dir);
        }
        build.file("src/shim/graph.cpp").compile("trainer_graph");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-cfg=trainer_graphs");
    }
    // The distributed engine (c10d: TCPStore, Gloo, Reducer). Its Gloo header includes gloo's
    // own headers, which the wheel does not ship: Debian's libgloo-dev has them (scripts/setup
    // installs it). Without them `trainer` is built without several-process training and says so.
    println!("cargo:rerun-if-changed=src/shim/dist.cpp");
    println!("cargo:rustc-check-cfg=cfg(trainer_dist)");
    if std::path::Path::new("/usr/include/gloo/config.h").exists() {
        let mut build = shim_build(&include);
        build
            .define("USE_C10D_GLOO", None)
            .file("src/shim/dist.cpp");
        if let Some(dirs) = nccl_includes(std::path::Path::new(&lib)) {
            build.define("USE_C10D_NCCL", None);
            for dir in dirs {
                build.include(dir);
            }
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
        }
        build.compile("trainer_dist");
        println!("cargo:rustc-cfg=trainer_dist");
    } else {
        println!("cargo:warning=gloo headers not found (apt install libgloo-dev): building without several-process training");
    }
    // The torch build, for `trainer doctor` and the GPU diagnosis: version and CUDA version
    // ("" for a CPU build), from the wheel's version.py beside lib/.
    let version_py = std::path::Path::new(&lib).join("../version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    let text = std::fs::read_to_string(&version_py).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split('\'').nth(1))
            .unwrap_or("")
            .to_string()
    };
    println!(
        "cargo:rustc-env=TRAINER_TORCH_BUILD={}",
        field("__version__")
    );
    println!("cargo:rustc-env=TRAINER_TORCH_CUDA={}", field("cuda:"));
    ort_library(std::path::Path::new(&lib));
    // Applies to every linked target: the binary, unit-test and integration-test executables.
    // The libtorch folder of the torch wheel the build used (a stable per-user cache path).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Nothing references libtorch_cuda directly, so the linker would drop it and CUDA would
    // silently report "not available" on a GPU machine.
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// The include folders of the CUDA runtime's headers, when this libtorch has CUDA 13 and its
/// headers are there: the wheel's CUDA headers, and the CUDA compiler's `crt/` and `nv/` headers
/// that scripts/setup puts in `<venv>/cuda-headers` (pip's nvidia-cuda-crt and nvidia-cuda-cccl).
fn cuda_includes(lib: &std::path::Path) -> Option<Vec<std::path::PathBuf>> {
    let headers = lib.join("../../../../../cuda-headers/nvidia/cu13/include");
    let dirs = vec![
        lib.join("../../nvidia/cu13/include"),
        headers.clone(),
        headers.join("cccl"),
    ];
    let needed = [
        lib.join("libtorch_cuda.so"),
        dirs[0].join("cuda_runtime.h"),
        headers.join("crt/host_config.h"),
        headers.join("cccl/nv/target"),
    ];
    needed.iter().all(|p| p.exists()).then_some(dirs)
}

/// The include folders for c10d's NCCL header: the CUDA ones and the wheel's NCCL headers.
fn nccl_includes(lib: &std::path::Path) -> Option<Vec<std::path::PathBuf>> {
    let mut dirs = cuda_includes(lib)?;
    let nccl = lib.join("../../nvidia/nccl/include");
    nccl.join("nccl.h").exists().then_some(())?;
    dirs.push(nccl);
    Some(dirs)
}

/// A C++ build against the torch wheel's headers, with the flags libtorch was built with.
fn shim_build(include: &std::path::Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1");
    build
}

/// The ONNX Runtime library of the `onnxruntime` wheel installed beside torch (scripts/setup
/// installs both), baked into the binary as TRAINER_ORT_DYLIB: the CPU engine of `infer` and
/// `eval` loads it at run time. Without it they run on libtorch.
fn ort_library(lib: &std::path::Path) {
    // site-packages itself changes when a package is installed or removed.
    println!("cargo:rerun-if-changed={}", lib.join("../..").display());
    let capi = lib.join("../../onnxruntime/capi");
    let Ok(entries) = std::fs::read_dir(&capi) else {
        println!("cargo:warning=onnxruntime wheel not found beside torch (scripts/setup installs it): infer and eval will run on libtorch on CPU");
        return;
    };
    let mut found: Vec<std::path::PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .collect();
    found.sort();
    if let Some(path) = found.last() {
        let path = path.canonicalize().unwrap_or_else(|_| path.clone());
        println!("cargo:rustc-env=TRAINER_ORT_DYLIB={}", path.display());
    }
}
