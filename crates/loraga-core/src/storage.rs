//! A tensor's storage: one enum over the backends, in the style of candle. Code that is the same
//! for every backend matches on it; code specific to one lives in `cpu` or `cuda`.

use crate::cpu::CpuStorage;
use crate::cuda::CudaStorage;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;

pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device.clone()),
        }
    }

    pub fn zeros(device: &Device, dtype: DType, n: usize) -> Result<Self> {
        Ok(match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, n)),
            Device::Cuda(d) => Storage::Cuda(CudaStorage::zeros(d, dtype, n)?),
        })
    }

    pub fn from_cpu(device: &Device, cpu: CpuStorage) -> Result<Self> {
        Ok(match device {
            Device::Cpu => Storage::Cpu(cpu),
            Device::Cuda(d) => Storage::Cuda(CudaStorage::from_cpu(d, &cpu)?),
        })
    }

    pub fn to_cpu(&self) -> Result<CpuStorage> {
        match self {
            Storage::Cpu(s) => Ok(s.clone()),
            Storage::Cuda(s) => s.to_cpu(),
        }
    }
}
