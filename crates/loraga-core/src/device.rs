//! Where a tensor lives.

use crate::cuda::CudaDevice;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub enum Device {
    Cpu,
    Cuda(CudaDevice),
}

impl Device {
    /// CUDA device `ordinal`, or an error that says what is missing (driver, GPU).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(CudaDevice::new(ordinal)?))
    }

    /// CUDA device `ordinal` if there is one, else the CPU, with the reason the GPU is unusable.
    pub fn cuda_or_cpu(ordinal: usize) -> (Device, Option<crate::Error>) {
        match CudaDevice::new(ordinal) {
            Ok(d) => (Device::Cuda(d), None),
            Err(e) => (Device::Cpu, Some(e)),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "{d:?}"),
        }
    }
}
