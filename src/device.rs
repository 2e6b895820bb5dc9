//! `--device auto|cpu|cuda|cuda:N`.

use std::str::FromStr;

use anyhow::{bail, Result};
use tch::Device;

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
    /// The device to run on: `auto` picks the first GPU when libtorch sees one. Asking for a GPU
    /// that is not there is an error, not a silent fallback.
    pub fn resolve(self) -> Result<Device> {
        let gpus = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        match self {
            DeviceArg::Auto => Ok(if gpus > 0 {
                Device::Cuda(0)
            } else {
                Device::Cpu
            }),
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) if n < gpus => Ok(Device::Cuda(n)),
            DeviceArg::Cuda(n) => {
                if gpus == 0 {
                    bail!("--device cuda:{n}: CUDA is not available on this machine (use --device cpu or auto)")
                }
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
