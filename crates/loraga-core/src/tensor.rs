//! Dense row-major tensors on the CPU or a CUDA device.

use crate::cpu::{CpuElement, CpuStorage};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm};
use crate::shape::Shape;
use crate::storage::Storage;

pub struct Tensor {
    shape: Shape,
    storage: Storage,
}

impl Tensor {
    /// A tensor holding `data`, which must have exactly `shape`'s element count.
    pub fn from_vec<T: CpuElement>(data: Vec<T>, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        Self::from_cpu(T::wrap(data), shape.into(), device)
    }

    /// The same from an already typed host buffer.
    pub fn from_cpu(cpu: CpuStorage, shape: Shape, device: &Device) -> Result<Tensor> {
        if cpu.len() != shape.elem_count() {
            return Err(Error::shape("Tensor::from_vec", format!("{} elements do not fill shape {shape}", cpu.len())));
        }
        Ok(Tensor { storage: Storage::from_cpu(device, cpu)?, shape })
    }

    /// A tensor over existing storage (a kernel's output), which must hold exactly `shape`'s
    /// element count.
    pub fn from_storage(storage: Storage, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let len = match &storage {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        };
        if len != shape.elem_count() {
            return Err(Error::shape("Tensor::from_storage", format!("{len} elements do not fill shape {shape}")));
        }
        Ok(Tensor { storage, shape })
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        Ok(Tensor { storage: Storage::zeros(device, dtype, shape.elem_count())?, shape })
    }

    /// Every element set to `value` (NaN included: tests poison outputs this way).
    pub fn full(shape: impl Into<Shape>, dtype: DType, value: f32, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        Self::from_cpu(CpuStorage::full(dtype, shape.elem_count(), value), shape, device)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// The device buffer of a tensor on a CUDA device: `what`, an operand of `op`, whose other
    /// operands are on CUDA. On the CPU, an error that names both.
    pub fn cuda_storage(&self, op: &'static str, what: &str) -> Result<&crate::cuda::CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => Err(not_on_cuda(op, what)),
        }
    }

    /// The same, mutable.
    pub fn cuda_storage_mut(&mut self, op: &'static str, what: &str) -> Result<&mut crate::cuda::CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => Err(not_on_cuda(op, what)),
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor { storage: Storage::from_cpu(device, self.storage.to_cpu()?)?, shape: self.shape.clone() })
    }

    /// A copy on `device` in `dtype` (through the host: for loading and moving weights, not for
    /// the hot path, where `Tape::cast` converts on the device).
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let cpu = self.storage.to_cpu()?;
        let cpu = if cpu.dtype() == dtype { cpu } else { CpuStorage::from_f32_vec(dtype, cpu.to_f32_vec()) };
        Ok(Tensor { storage: Storage::from_cpu(device, cpu)?, shape: self.shape.clone() })
    }

    /// The elements in their own type; an error if `T` is not the tensor's dtype.
    pub fn to_vec<T: CpuElement>(&self) -> Result<Vec<T>> {
        let cpu = self.storage.to_cpu()?;
        T::unwrap(&cpu).map(|s| s.to_vec()).ok_or_else(|| Error::DType {
            op: "to_vec",
            msg: format!("tensor is {}, asked for {}", self.dtype(), T::DTYPE),
        })
    }

    /// The elements widened to f32, whatever the dtype.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.storage.to_cpu()?.to_f32_vec())
    }

    /// `self @ rhs` for matrices [M, K] x [K, N], in the inputs' dtype.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.gemm_new(rhs, Gemm::default())
    }

    /// `self @ rhs^T` with `rhs` stored [N, K], as PyTorch's `F.linear(x, W)`.
    pub fn matmul_t(&self, rhs: &Tensor) -> Result<Tensor> {
        self.gemm_new(rhs, Gemm { trans_b: true, ..Gemm::default() })
    }

    fn gemm_new(&self, rhs: &Tensor, g: Gemm) -> Result<Tensor> {
        let (r, c) = (self.shape.dims2("matmul", "lhs")?, rhs.shape.dims2("matmul", "rhs")?);
        let m = if g.trans_a { r.1 } else { r.0 };
        let n = if g.trans_b { c.0 } else { c.1 };
        let mut out = Tensor::zeros([m, n], self.dtype(), &self.device())?;
        gemm(&g, self, rhs, &mut out)?;
        Ok(out)
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {}, {})", self.shape, self.dtype(), self.device())
    }
}

fn not_on_cuda(op: &'static str, what: &str) -> Error {
    Error::DeviceMismatch { op, lhs: format!("{what} on the CPU"), rhs: "the op's other tensors on CUDA".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn round_trips_and_dtype_checks() {
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(t.to_vec::<bf16>().unwrap_err().to_string().contains("tensor is f32"));
        let e = Tensor::from_vec(vec![1.0f32; 5], [2, 3], &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("5 elements do not fill shape [2, 3]"), "{e}");
    }

    #[test]
    fn cpu_matmul_matches_by_hand() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0], [3, 2], &Device::Cpu).unwrap();
        assert_eq!(a.matmul(&b).unwrap().to_vec::<f32>().unwrap(), vec![58.0, 64.0, 139.0, 154.0]);
        // x @ W^T with W stored [N, K] = [2, 3]: rows of W are b's columns.
        let w = Tensor::from_vec(vec![7.0f32, 9.0, 11.0, 8.0, 10.0, 12.0], [2, 3], &Device::Cpu).unwrap();
        assert_eq!(a.matmul_t(&w).unwrap().to_vec::<f32>().unwrap(), vec![58.0, 64.0, 139.0, 154.0]);
        let bb = Tensor::from_vec(vec![bf16::from_f32(1.0); 6], [3, 2], &Device::Cpu).unwrap();
        assert!(a.matmul(&bb).unwrap_err().to_string().contains("A is f32 but B is bf16"));
    }
}
