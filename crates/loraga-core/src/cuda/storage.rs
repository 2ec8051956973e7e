//! Device buffers: the CUDA side of a tensor's storage.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::device::CudaDevice;
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// A typed device buffer.
pub enum CudaSlices {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
}

pub struct CudaStorage {
    pub slice: CudaSlices,
    pub device: CudaDevice,
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match self.slice {
            CudaSlices::F32(_) => DType::F32,
            CudaSlices::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match &self.slice {
            CudaSlices::F32(s) => s.len(),
            CudaSlices::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A zeroed buffer of `n` elements.
    pub fn zeros(device: &CudaDevice, dtype: DType, n: usize) -> Result<Self> {
        let s = device.stream();
        let slice = match dtype {
            DType::F32 => CudaSlices::F32(s.alloc_zeros(n).map_err(Error::cuda("cuMemAlloc"))?),
            DType::BF16 => CudaSlices::BF16(s.alloc_zeros(n).map_err(Error::cuda("cuMemAlloc"))?),
        };
        Ok(CudaStorage { slice, device: device.clone() })
    }

    pub fn from_cpu(device: &CudaDevice, cpu: &CpuStorage) -> Result<Self> {
        let s = device.stream();
        let slice = match cpu {
            CpuStorage::F32(v) => CudaSlices::F32(s.clone_htod(v).map_err(Error::cuda("cuMemcpyHtoD"))?),
            CpuStorage::BF16(v) => CudaSlices::BF16(s.clone_htod(v).map_err(Error::cuda("cuMemcpyHtoD"))?),
        };
        Ok(CudaStorage { slice, device: device.clone() })
    }

    /// Copies the buffer to the host (this waits for the device's stream).
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        let s = self.device.stream();
        Ok(match &self.slice {
            CudaSlices::F32(d) => CpuStorage::F32(s.clone_dtoh(d).map_err(Error::cuda("cuMemcpyDtoH"))?),
            CudaSlices::BF16(d) => CpuStorage::BF16(s.clone_dtoh(d).map_err(Error::cuda("cuMemcpyDtoH"))?),
        })
    }

    /// Overwrites the buffer with host data of the same dtype and length.
    pub fn copy_from_cpu(&mut self, cpu: &CpuStorage) -> Result<()> {
        let s = self.device.stream().clone();
        match (&mut self.slice, cpu) {
            (CudaSlices::F32(d), CpuStorage::F32(v)) if d.len() == v.len() => {
                s.memcpy_htod(v, d).map_err(Error::cuda("cuMemcpyHtoD"))
            }
            (CudaSlices::BF16(d), CpuStorage::BF16(v)) if d.len() == v.len() => {
                s.memcpy_htod(v, d).map_err(Error::cuda("cuMemcpyHtoD"))
            }
            _ => Err(Error::shape(
                "copy_from_cpu",
                format!("device buffer {} x{} vs host {} x{}", self.dtype(), self.len(), cpu.dtype(), cpu.len()),
            )),
        }
    }
}
