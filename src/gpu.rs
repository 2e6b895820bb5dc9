//! Whether this libtorch can use the machine's NVIDIA GPU, and if not, why: a GPU that libtorch
//! cannot use (a driver too old for the CUDA build, a missing driver library, a CPU-only build)
//! must never silently turn into a CPU run. The facts are gathered from the system and can be
//! injected, so the decision is tested without a GPU.

use std::path::Path;

/// The libtorch this binary was built against (from the torch wheel's `version.py`).
pub const TORCH_BUILD: &str = env!("TRAINER_TORCH_BUILD");
/// The CUDA version of that build ("" for a CPU build).
pub const TORCH_CUDA: &str = env!("TRAINER_TORCH_CUDA");

/// What the system says about NVIDIA GPUs and this build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuFacts {
    /// An NVIDIA GPU is visible: `/dev/nvidia0`, or an entry in `/proc/driver/nvidia/gpus`.
    pub nvidia_present: bool,
    /// The kernel driver's version (`/proc/driver/nvidia/version`).
    pub driver_version: Option<String>,
    /// The newest CUDA version the installed driver library supports (`cuDriverGetVersion`).
    pub driver_cuda: Option<(u32, u32)>,
    /// Why `libcuda.so.1` could not be loaded or asked, when it could not.
    pub libcuda_error: Option<String>,
    /// The CUDA version this libtorch was built for (`None`: a CPU build).
    pub torch_cuda: Option<(u32, u32)>,
    /// GPUs libtorch can use.
    pub usable_gpus: usize,
}

/// What `--device auto` should make of the facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// libtorch can use this many GPUs.
    Usable(usize),
    /// No NVIDIA GPU: a CPU run, nothing to say.
    Absent,
    /// A GPU is there but libtorch cannot use it: the cause and what to do.
    Unusable(String),
}

/// The oldest Linux driver for each CUDA major version (with CUDA's minor-version compatibility).
pub fn minimum_driver(cuda_major: u32) -> Option<&'static str> {
    match cuda_major {
        13 => Some("580"),
        12 => Some("525"),
        11 => Some("450"),
        _ => None,
    }
}

fn version(v: (u32, u32)) -> String {
    format!("{}.{}", v.0, v.1)
}

/// The torch build variant a driver supporting CUDA `d` can run, among those PyTorch publishes.
pub fn variant_for(d: (u32, u32)) -> Option<&'static str> {
    match d {
        (13, _) => Some("cu130"),
        (12, m) if m >= 8 => Some("cu128"),
        (12, _) => Some("cu126"),
        _ => None,
    }
}

/// The decision, from the facts alone.
pub fn diagnose(f: &GpuFacts) -> Verdict {
    if f.usable_gpus > 0 {
        return Verdict::Usable(f.usable_gpus);
    }
    if !f.nvidia_present {
        return Verdict::Absent;
    }
    let driver = f
        .driver_version
        .as_deref()
        .map(|v| format!("NVIDIA driver {v}"))
        .unwrap_or_else(|| "the NVIDIA driver".into());
    let cause = match (f.torch_cuda, f.driver_cuda) {
        (None, _) => format!(
            "an NVIDIA GPU is present but this libtorch ({TORCH_BUILD}) is a CPU-only build; set up a CUDA build: TRAINER_TORCH_VARIANT=cu130 scripts/setup (or cu128, cu126 for older drivers)"
        ),
        (Some(t), Some(d)) if d.0 < t.0 => format!(
            "{driver} supports CUDA up to {}, but this libtorch ({TORCH_BUILD}) was built for CUDA {}, which needs driver {} or newer; update the driver{}",
            version(d),
            version(t),
            minimum_driver(t.0).unwrap_or("a newer one"),
            variant_for(d)
                .map(|v| format!(", or set up the build for your driver: TRAINER_TORCH_VARIANT={v} scripts/setup"))
                .unwrap_or_default(),
        ),
        (Some(_), None) => format!(
            "an NVIDIA GPU is present but the driver library libcuda.so.1 cannot be used ({}); check the driver installation, and in a container that the GPU and its driver are passed through",
            f.libcuda_error.as_deref().unwrap_or("unknown reason")
        ),
        (Some(t), Some(d)) => format!(
            "{driver} supports CUDA {} and this libtorch was built for CUDA {}, yet libtorch sees no GPU; check CUDA_VISIBLE_DEVICES and the permissions of /dev/nvidia*",
            version(d),
            version(t)
        ),
    };
    Verdict::Unusable(cause)
}

/// Parses "13.0" into (13, 0).
pub fn parse_cuda(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The driver version from the text of `/proc/driver/nvidia/version`
/// ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb ...").
pub fn parse_driver_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version"))?;
    let rest = &line[line.find("Module")? + "Module".len()..];
    rest.split_whitespace().next().map(String::from)
}

/// The newest CUDA version the driver library supports, or why it cannot be asked.
fn driver_cuda() -> Result<(u32, u32), String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; the symbol has the documented signature
    // `CUresult cuDriverGetVersion(int*)`; the handle is left open (the process may use it).
    unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            let err = libc::dlerror();
            return Err(if err.is_null() {
                "libcuda.so.1 not found".into()
            } else {
                std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned()
            });
        }
        let sym = libc::dlsym(handle, c"cuDriverGetVersion".as_ptr());
        if sym.is_null() {
            return Err("libcuda.so.1 has no cuDriverGetVersion".into());
        }
        let get: extern "C" fn(*mut libc::c_int) -> libc::c_int = std::mem::transmute(sym);
        let mut v: libc::c_int = 0;
        match get(&mut v) {
            0 => Ok(((v / 1000) as u32, ((v % 1000) / 10) as u32)),
            rc => Err(format!("cuDriverGetVersion failed with CUDA error {rc}")),
        }
    }
}

/// The facts of this machine.
pub fn facts() -> GpuFacts {
    let nvidia_present = Path::new("/dev/nvidia0").exists()
        || std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut d| d.next().is_some());
    let driver_version = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|t| parse_driver_version(&t));
    let (driver_cuda, libcuda_error) = if nvidia_present {
        match driver_cuda() {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let usable_gpus = if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    GpuFacts {
        nvidia_present,
        driver_version,
        driver_cuda,
        libcuda_error,
        torch_cuda: parse_cuda(TORCH_CUDA),
        usable_gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        present: bool,
        driver: Option<(u32, u32)>,
        torch: Option<(u32, u32)>,
        gpus: usize,
    ) -> GpuFacts {
        GpuFacts {
            nvidia_present: present,
            driver_version: present.then(|| "550.54.14".to_string()),
            driver_cuda: driver,
            libcuda_error: (present && driver.is_none())
                .then(|| "libcuda.so.1: cannot open shared object file".into()),
            torch_cuda: torch,
            usable_gpus: gpus,
        }
    }

    #[test]
    fn a_usable_gpu_is_used() {
        assert_eq!(
            diagnose(&facts(true, Some((13, 0)), Some((13, 0)), 2)),
            Verdict::Usable(2)
        );
    }

    #[test]
    fn no_gpu_is_a_quiet_cpu_run() {
        assert_eq!(
            diagnose(&facts(false, None, Some((13, 0)), 0)),
            Verdict::Absent
        );
        assert_eq!(diagnose(&facts(false, None, None, 0)), Verdict::Absent);
    }

    #[test]
    fn an_old_driver_is_named_with_both_versions_and_the_fix() {
        let Verdict::Unusable(why) = diagnose(&facts(true, Some((12, 4)), Some((13, 0)), 0)) else {
            panic!("not unusable");
        };
        assert!(
            why.contains("NVIDIA driver 550.54.14 supports CUDA up to 12.4"),
            "{why}"
        );
        assert!(
            why.contains("built for CUDA 13.0, which needs driver 580"),
            "{why}"
        );
        assert!(why.contains("TRAINER_TORCH_VARIANT=cu126"), "{why}");
        let Verdict::Unusable(why) = diagnose(&facts(true, Some((12, 9)), Some((13, 0)), 0)) else {
            panic!("not unusable");
        };
        assert!(why.contains("TRAINER_TORCH_VARIANT=cu128"), "{why}");
    }

    #[test]
    fn a_missing_driver_library_and_a_cpu_build_are_named() {
        let Verdict::Unusable(why) = diagnose(&facts(true, None, Some((13, 0)), 0)) else {
            panic!("not unusable");
        };
        assert!(
            why.contains("libcuda.so.1 cannot be used (libcuda.so.1: cannot open"),
            "{why}"
        );
        let Verdict::Unusable(why) = diagnose(&facts(true, Some((13, 0)), None, 0)) else {
            panic!("not unusable");
        };
        assert!(why.contains("CPU-only build"), "{why}");
        let Verdict::Unusable(why) = diagnose(&facts(true, Some((13, 0)), Some((13, 0)), 0)) else {
            panic!("not unusable");
        };
        assert!(why.contains("CUDA_VISIBLE_DEVICES"), "{why}");
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_cuda("13.0"), Some((13, 0)));
        assert_eq!(parse_cuda(""), None);
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\nGCC version:  gcc\n";
        assert_eq!(parse_driver_version(text), Some("550.54.14".into()));
        assert_eq!(parse_driver_version("garbage"), None);
        assert_eq!(minimum_driver(13), Some("580"));
    }

    #[test]
    fn this_build_knows_its_torch() {
        assert!(TORCH_BUILD.starts_with("2."), "{TORCH_BUILD}");
    }
}
