//! `trainer doctor`: what this binary runs on, in one block to paste into a bug report — the
//! libtorch build, the GPUs and their driver (and whether libtorch can use them, and if not why),
//! the CPU features and thread counts, and the limits in force.

use std::ffi::{c_char, c_int};
use std::fmt::Write as _;

use crate::gpu::{self, GpuFacts, Verdict};

// src/shim/build_info.cpp
extern "C" {
    fn trainer_show_config(out: *mut c_char, len: c_int) -> c_int;
}

/// libtorch's own description of its build (`at::show_config`).
pub fn torch_config() -> String {
    let mut buf = vec![0u8; 16384];
    // SAFETY: the shim writes at most `len` bytes, NUL-terminated.
    unsafe { trainer_show_config(buf.as_mut_ptr().cast(), buf.len() as c_int) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The GPUs as `nvidia-smi` lists them (index, name, memory, driver), when it is there.
fn nvidia_smi() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// CPU model, cores and the instruction-set features libtorch can use for speed.
fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let features: Vec<&str> = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    format!(
        "{}, {} cores; features: {}",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if features.is_empty() {
            "none of avx2, avx512f, avx512_bf16, amx".to_string()
        } else {
            features.join(" ")
        }
    )
}

/// The GPU part: facts and verdict.
pub fn gpu_lines(f: &GpuFacts) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "NVIDIA GPU present: {}{}",
        if f.nvidia_present { "yes" } else { "no" },
        f.driver_version
            .as_deref()
            .map(|v| format!(", driver {v}"))
            .unwrap_or_default()
    );
    if let Some((major, minor)) = f.driver_cuda {
        let _ = writeln!(s, "driver supports CUDA up to {major}.{minor}");
    }
    if let Some(e) = &f.libcuda_error {
        let _ = writeln!(s, "libcuda.so.1: {e}");
    }
    let verdict = match gpu::diagnose(f) {
        Verdict::Usable(n) => format!("libtorch uses {n} GPU(s)"),
        Verdict::Absent => "no GPU: everything runs on the CPU".into(),
        Verdict::Unusable(why) => format!("GPU NOT USABLE: {why}"),
    };
    let _ = writeln!(s, "verdict: {verdict}");
    s
}

/// The whole report.
pub fn report() -> String {
    let facts = gpu::facts();
    let mut s = String::new();
    let _ = writeln!(s, "trainer {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        s,
        "libtorch: {} ({})",
        gpu::TORCH_BUILD,
        if gpu::TORCH_CUDA.is_empty() {
            "CPU build".to_string()
        } else {
            format!("built for CUDA {}", gpu::TORCH_CUDA)
        }
    );
    s += &gpu_lines(&facts);
    s += &gpu_list(&facts);
    let config = torch_config();
    s += &cuda_libraries(&config);
    s += &engines();
    s += &host();
    let _ = writeln!(s, "libtorch build configuration:");
    for line in config.lines().filter(|l| !l.trim().is_empty()) {
        let _ = writeln!(s, "  {}", line.trim_end());
    }
    s
}

/// The GPUs as `nvidia-smi` lists them (when it is there), then those libtorch can use.
fn gpu_list(facts: &GpuFacts) -> String {
    let mut s = String::new();
    if let Some(list) = nvidia_smi() {
        let _ = writeln!(s, "GPUs (nvidia-smi: index, name, memory, driver):");
        for line in list.lines() {
            let _ = writeln!(s, "  {line}");
        }
    }
    for i in 0..facts.usable_gpus {
        let _ = writeln!(s, "cuda:{i}: usable by libtorch");
    }
    s
}

/// The cuDNN and NCCL of a CUDA build, read from its build configuration (nothing for a CPU
/// build).
fn cuda_libraries(config: &str) -> String {
    let mut s = String::new();
    let setting = |key: &str| {
        config
            .split([',', '\n'])
            .find_map(|kv| kv.trim().strip_prefix(key))
            .map(|v| v.trim_start_matches('=').to_string())
    };
    if !gpu::TORCH_CUDA.is_empty() {
        let _ = writeln!(
            s,
            "cuDNN {}, NCCL {}",
            setting("CUDNN_VERSION").unwrap_or_else(|| "not in this build".into()),
            match setting("USE_NCCL").as_deref() {
                Some("1") | Some("ON") => "built in",
                _ => "not in this build",
            }
        );
    }
    s
}

/// The engines beyond libtorch: for several ranks, and for `infer` and `eval` on the CPU.
fn engines() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "several ranks (fit --nproc-per-node, torchrun): {}",
        match crate::dist::ENGINE {
            true => format!(
                "Gloo on CPU, {} for CUDA tensors",
                crate::dist::Group::cuda_backend().to_uppercase()
            ),
            false => "not in this build (apt install libgloo-dev, then rebuild)".into(),
        }
    );
    let _ = writeln!(
        s,
        "CUDA graphs of the training step (fit --cuda-graphs on): {}",
        match crate::train::graph::BUILT {
            true => "in this build".into(),
            false => format!("not in this build ({})", crate::train::graph::NEEDS),
        }
    );
    let _ = writeln!(
        s,
        "CPU engine of infer and eval (fp32): {}",
        match crate::model::onnxruntime::describe() {
            Ok(version) => format!("ONNX Runtime {version}"),
            Err(why) => format!("libtorch ({why})"),
        }
    );
    s
}

/// The CPU, the thread counts, the allocator and the largest image decoded.
fn host() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "CPU: {}", cpu());
    let _ = writeln!(
        s,
        "threads: libtorch {} (intra-op), image decoding {}",
        tch::get_num_threads(),
        rayon::current_num_threads()
    );
    let _ = writeln!(
        s,
        "allocator: {}",
        if std::env::var_os("TRAINER_DEFAULT_MALLOC").is_some() {
            "glibc defaults (TRAINER_DEFAULT_MALLOC is set)"
        } else {
            "freed memory kept for reuse (mallopt at start-up)"
        }
    );
    let _ = writeln!(
        s,
        "largest image decoded: {} pixels (--max-pixels)",
        crate::data::decode::max_pixels()
    );
    s
}
