//! Where a model runs: the CPU always; CUDA when built with `--features cuda`. GPUs are found
//! through NVML (never through CUDA, so a machine without the driver is simply CPU-only), and
//! `device = "auto"` places a model on the GPU with the most free memory that holds it.

use candle_core::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    /// The GPU with the most free memory that holds the model's weights and a minimum KV pool
    /// (when built with CUDA and NVML reports one), else the CPU.
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

    /// Open the device for a model of `weight_bytes`; asking for CUDA in a CPU-only build is
    /// an error that says so. `auto` asks NVML which GPUs have room (never CUDA itself, so a
    /// machine without the driver gets the CPU without touching CUDA).
    pub fn open(self, weight_bytes: u64) -> Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
            Self::Auto => {
                if !cfg!(feature = "cuda") {
                    return Ok(Device::Cpu);
                }
                let gpus = discover().gpus;
                let need = weight_bytes + MIN_GPU_KV_BYTES;
                match pick_gpu(&gpus, need) {
                    Some(i) => {
                        tracing::info!(
                            "device auto: cuda:{i} (most free memory, {need} bytes needed)"
                        );
                        open_cuda(i as usize).or_else(|e| {
                            tracing::warn!("device auto: {e}; using the CPU");
                            Ok(Device::Cpu)
                        })
                    }
                    None => {
                        if !gpus.is_empty() {
                            tracing::info!(
                                "device auto: no GPU has {need} bytes free; using the CPU"
                            );
                        }
                        Ok(Device::Cpu)
                    }
                }
            }
        }
    }
}

/// The least KV pool `auto` wants beside a model's weights on a GPU.
pub const MIN_GPU_KV_BYTES: u64 = 512 << 20;

/// The GPU `auto` places a model on: of those with `need` bytes free, the one with the most
/// free memory (the lower index on a tie); None when none has room.
pub fn pick_gpu(gpus: &[GpuInfo], need: u64) -> Option<u32> {
    gpus.iter()
        .filter(|g| g.memory_free_bytes >= need)
        .max_by_key(|g| (g.memory_free_bytes, std::cmp::Reverse(g.index)))
        .map(|g| g.index)
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

/// What this machine has to run models on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    pub cpu: CpuInfo,
    pub gpus: Vec<GpuInfo>,
    /// "ok", or why NVML could not be used (no NVIDIA driver is the usual reason); not an error.
    pub nvml: String,
    /// The driver's version, when NVML answered.
    pub driver_version: Option<String>,
    /// Whether this build can run models on CUDA (`--features cuda`).
    pub cuda_build: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuInfo {
    pub model: String,
    /// Logical cores this process may use.
    pub cores: usize,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// Percent of the last sample period a kernel ran, and memory was read or written.
    pub utilization_gpu_percent: Option<u32>,
    pub utilization_memory_percent: Option<u32>,
    pub temperature_c: Option<u32>,
}

/// One `key: value` line of a /proc file, the value's first word parsed.
fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn cpu_info() -> CpuInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    CpuInfo {
        model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total_bytes: proc_field(&meminfo, "MemTotal").unwrap_or(0) * 1024,
        memory_available_bytes: proc_field(&meminfo, "MemAvailable").unwrap_or(0) * 1024,
    }
}

/// The CPU, and every NVIDIA GPU NVML reports. Without the NVIDIA driver (or with NVML
/// failing) the report is CPU only, with the reason in `nvml`; this never fails.
pub fn discover() -> DeviceReport {
    let mut report = DeviceReport {
        cpu: cpu_info(),
        gpus: Vec::new(),
        nvml: String::new(),
        driver_version: None,
        cuda_build: cfg!(feature = "cuda"),
    };
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            report.nvml = format!("not available: {e}");
            return report;
        }
    };
    report.driver_version = nvml.sys_driver_version().ok();
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            report.nvml = format!("no device count: {e}");
            return report;
        }
    };
    for index in 0..count {
        let Ok(d) = nvml.device_by_index(index) else {
            continue;
        };
        let mem = d.memory_info().ok();
        let util = d.utilization_rates().ok();
        report.gpus.push(GpuInfo {
            index,
            name: d.name().unwrap_or_default(),
            uuid: d.uuid().unwrap_or_default(),
            memory_total_bytes: mem.as_ref().map_or(0, |m| m.total),
            memory_used_bytes: mem.as_ref().map_or(0, |m| m.used),
            memory_free_bytes: mem.as_ref().map_or(0, |m| m.free),
            utilization_gpu_percent: util.as_ref().map(|u| u.gpu),
            utilization_memory_percent: util.as_ref().map(|u| u.memory),
            temperature_c: d
                .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                .ok(),
        });
    }
    report.nvml = "ok".into();
    report
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
        assert!(DeviceChoice::Auto.open(1 << 20).is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Cuda(0)
            .open(0)
            .unwrap_err()
            .contains("--features cuda"));
    }

    fn gpu(index: u32, free_gib: u64) -> GpuInfo {
        GpuInfo {
            index,
            name: format!("gpu{index}"),
            uuid: String::new(),
            memory_total_bytes: 80 << 30,
            memory_used_bytes: (80 - free_gib) << 30,
            memory_free_bytes: free_gib << 30,
            utilization_gpu_percent: None,
            utilization_memory_percent: None,
            temperature_c: None,
        }
    }

    #[test]
    fn auto_takes_the_gpu_with_the_most_free_memory_that_fits() {
        let gpus = [gpu(0, 10), gpu(1, 40), gpu(2, 25)];
        assert_eq!(pick_gpu(&gpus, 8 << 30), Some(1));
        // Only one has room.
        assert_eq!(pick_gpu(&gpus, 30 << 30), Some(1));
        assert_eq!(pick_gpu(&[gpu(0, 10), gpu(1, 4)], 6 << 30), Some(0));
        // None has room, or there is no GPU: the CPU.
        assert_eq!(pick_gpu(&gpus, 41 << 30), None);
        assert_eq!(pick_gpu(&[], 1), None);
        // A tie goes to the lower index.
        assert_eq!(pick_gpu(&[gpu(3, 20), gpu(1, 20)], 1), Some(1));
    }

    #[test]
    fn discovery_always_reports_the_cpu_and_never_fails() {
        let r = discover();
        assert!(r.cpu.cores >= 1);
        assert!(r.cpu.memory_total_bytes > 0);
        assert!(r.cpu.memory_available_bytes <= r.cpu.memory_total_bytes);
        // With NVML absent (no driver) the report says why and lists no GPU.
        if r.nvml != "ok" {
            assert!(r.gpus.is_empty());
            assert!(r.nvml.starts_with("not available") || r.nvml.starts_with("no device"));
        }
        for g in &r.gpus {
            assert!(g.memory_free_bytes <= g.memory_total_bytes, "{g:?}");
        }
    }
}
