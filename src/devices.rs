//! Where a model runs. CPU always; CUDA when built with `--features cuda` (discovery through
//! NVML and placement by free memory come with the devices work).

use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    /// The best available device: a CUDA GPU when built with CUDA and one is present, else CPU.
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{other:?} is not one of cpu, cuda:N, auto")),
        }
    }

    /// Open the device; asking for CUDA in a CPU-only build is an error that says so.
    pub fn open(self) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
            Self::Auto => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device, String> {
    Device::new_cuda(n).map_err(|e| format!("cuda:{n}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device, String> {
    Err(format!(
        "cuda:{n} requested, but this aios was built without CUDA (build with --features cuda)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(DeviceChoice::parse("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(DeviceChoice::parse("cuda:1"), Ok(DeviceChoice::Cuda(1)));
        assert_eq!(DeviceChoice::parse("auto"), Ok(DeviceChoice::Auto));
        assert!(DeviceChoice::parse("cuda:x").is_err());
        assert!(DeviceChoice::Auto.open().is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Cuda(0)
            .open()
            .unwrap_err()
            .contains("--features cuda"));
    }
}
