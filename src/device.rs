//! `--device auto|cpu|cuda|cuda:N`.

use std::str::FromStr;

use anyhow::{bail, Result};
use tch::Device;

use crate::gpu::{self, GpuFacts, Verdict};

/// What the user asked for; [`DeviceArg::resolve`] turns it into a libtorch device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceArg {
    /// The device to run on: `auto` picks the first GPU when libtorch can use one. A GPU that is
    /// present but unusable is named in a warning, and `auto` runs on the CPU.
    pub fn resolve(self) -> Result<Device> {
        self.resolve_with(&gpu::facts(), false)
    }

    /// Like [`resolve`](Self::resolve) for training: a GPU that is present but unusable stops
    /// `auto` (days on the CPU instead of minutes on the GPU is never what was meant).
    pub fn resolve_for_training(self) -> Result<Device> {
        self.resolve_with(&gpu::facts(), true)
    }

    /// The decision, from given facts. Asking for a GPU that is not there is an error, not a
    /// silent fallback.
    pub fn resolve_with(self, facts: &GpuFacts, refuse_unusable: bool) -> Result<Device> {
        let verdict = gpu::diagnose(facts);
        let gpus = match &verdict {
            Verdict::Usable(n) => *n,
            _ => 0,
        };
        match (self, verdict) {
            (DeviceArg::Cpu, _) => Ok(Device::Cpu),
            (DeviceArg::Auto, Verdict::Usable(_)) => Ok(Device::Cuda(0)),
            (DeviceArg::Auto, Verdict::Absent) => Ok(Device::Cpu),
            (DeviceArg::Auto, Verdict::Unusable(why)) if refuse_unusable => bail!(
                "{why}. Training on the CPU instead would take far longer: fix this, or pass --device cpu to train on the CPU anyway"
            ),
            (DeviceArg::Auto, Verdict::Unusable(why)) => {
                crate::errln!("warning: {why}. Running on the CPU.");
                Ok(Device::Cpu)
            }
            (DeviceArg::Cuda(n), _) if n < gpus => Ok(Device::Cuda(n)),
            (DeviceArg::Cuda(n), Verdict::Unusable(why)) => bail!("--device cuda:{n}: {why}"),
            (DeviceArg::Cuda(n), _) if gpus == 0 => {
                bail!("--device cuda:{n}: CUDA is not available on this machine (use --device cpu or auto)")
            }
            (DeviceArg::Cuda(n), _) => {
                bail!("--device cuda:{n}: this machine has {gpus} GPU(s), numbered from 0")
            }
        }
    }
}

/// A short human name: "cpu (2 threads)" or "cuda:0 (NVIDIA H100)".
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => format!("cpu ({} threads)", tch::get_num_threads()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceArg>(), Ok(DeviceArg::Auto));
        assert_eq!("CPU".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(3)));
        assert!("tpu".parse::<DeviceArg>().is_err());
        assert!("cuda:x".parse::<DeviceArg>().is_err());
    }

    fn present_but_unusable() -> GpuFacts {
        GpuFacts {
            nvidia_present: true,
            driver_version: Some("535.104.05".into()),
            driver_cuda: Some((12, 2)),
            libcuda_error: None,
            torch_cuda: Some((13, 0)),
            usable_gpus: 0,
        }
    }

    #[test]
    fn an_unusable_gpu_stops_training_on_auto_and_warns_elsewhere() {
        let f = present_but_unusable();
        let err = DeviceArg::Auto
            .resolve_with(&f, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("supports CUDA up to 12.2") && err.contains("--device cpu"),
            "{err}"
        );
        assert_eq!(
            DeviceArg::Auto.resolve_with(&f, false).unwrap(),
            Device::Cpu
        );
        assert_eq!(DeviceArg::Cpu.resolve_with(&f, true).unwrap(), Device::Cpu);
        let err = DeviceArg::Cuda(0)
            .resolve_with(&f, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--device cuda:0: NVIDIA driver 535.104.05"),
            "{err}"
        );
    }

    #[test]
    fn usable_and_absent_gpus_resolve_quietly() {
        let usable = GpuFacts {
            usable_gpus: 2,
            ..present_but_unusable()
        };
        assert_eq!(
            DeviceArg::Auto.resolve_with(&usable, true).unwrap(),
            Device::Cuda(0)
        );
        assert_eq!(
            DeviceArg::Cuda(1).resolve_with(&usable, true).unwrap(),
            Device::Cuda(1)
        );
        assert!(DeviceArg::Cuda(2).resolve_with(&usable, true).is_err());
        let absent = GpuFacts::default();
        assert_eq!(
            DeviceArg::Auto.resolve_with(&absent, true).unwrap(),
            Device::Cpu
        );
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(DeviceArg::Cpu.resolve().unwrap(), Device::Cpu);
        if !tch::Cuda::is_available() {
            assert_eq!(DeviceArg::Auto.resolve().unwrap(), Device::Cpu);
            let err = DeviceArg::Cuda(0).resolve().unwrap_err().to_string();
            assert!(err.contains("not available"), "{err}");
        }
    }
}
