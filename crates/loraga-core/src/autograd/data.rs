//! Getting at an op's data: f32 host slices on the CPU, device buffers on CUDA, or the error that
//! says why not. Every op goes through here, so the device and dtype errors read the same
//! everywhere.
//!
//! An op runs where its tensors are: [`on_cuda`] says whether that is a CUDA device (all of
//! them on one) or the CPU (all of them there); anything else is an error, never a copy.

use crate::cpu::CpuStorage;
use crate::cuda::CudaStorage;
use crate::cuda::ops::elementwise as cuda_ew;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// True when every tensor lives on one CUDA device, false when every one is on the CPU.
pub(crate) fn on_cuda(op: &'static str, ts: &[&Tensor]) -> Result<bool> {
    let Some(first) = ts.first() else { return Ok(false) };
    for t in &ts[1..] {
        let same = match (first.storage(), t.storage()) {
            (Storage::Cpu(_), Storage::Cpu(_)) => true,
            (Storage::Cuda(a), Storage::Cuda(b)) => a.device == b.device,
            _ => false,
        };
        if !same {
            return Err(Error::DeviceMismatch { op, lhs: first.device().to_string(), rhs: t.device().to_string() });
        }
    }
    Ok(matches!(first.storage(), Storage::Cuda(_)))
}

/// The tensor's device buffer (callers asked [`on_cuda`] first, so `t` is an input).
pub(crate) fn cuda<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    t.cuda_storage(op, "an input")
}

/// A zero tensor with `t`'s shape, dtype and device: where an op writes a gradient of `t`.
pub(crate) fn zeros_like(t: &Tensor) -> Result<Tensor> {
    Tensor::zeros(t.dims(), t.dtype(), &t.device())
}

/// A tensor of `shape` over a kernel's output.
pub(crate) fn cuda_tensor(s: CudaStorage, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_storage(Storage::Cuda(s), shape.to_vec())
}

/// The tensor's elements as an f32 host slice.
pub(crate) fn f32s<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a [f32]> {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        Storage::Cpu(other) => {
            Err(Error::DType { op, msg: format!("the CPU autograd ops take f32 tensors, got {}", other.dtype()) })
        }
        Storage::Cuda(_) => Err(Error::NotOnCuda(op)),
    }
}

/// A CPU f32 tensor from a vector whose length the caller computed from `shape`.
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)
}

/// An error unless `t` has exactly `want` as its shape.
pub(crate) fn expect_shape(t: &Tensor, want: &[usize], op: &'static str, what: &str) -> Result<()> {
    if t.dims() != want {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {want:?}", t.dims())));
    }
    Ok(())
}

/// The two dimensions of a matrix argument.
pub(crate) fn dims2(t: &Tensor, op: &'static str, what: &str) -> Result<(usize, usize)> {
    t.shape().dims2(op, what)
}

/// `acc += g`, element by element (gradient accumulation); shapes must match. On the CPU both
/// are f32; on CUDA either may be f32 or bf16 (the sum is stored in acc's dtype).
pub(crate) fn add_assign(acc: &mut Tensor, g: &Tensor, what: &str) -> Result<()> {
    if acc.dims() != g.dims() {
        return Err(Error::shape(
            "gradient accumulation",
            format!("{what}: gradient of shape {:?} added to one of shape {:?}", g.dims(), acc.dims()),
        ));
    }
    if on_cuda("gradient accumulation", &[&*acc, g])? {
        let src = cuda(g, "gradient accumulation")?;
        let Storage::Cuda(dst) = acc.storage_mut() else { unreachable!("on_cuda checked acc") };
        return cuda_ew::add_assign(dst, src, what);
    }
    let src = f32s(g, "gradient accumulation")?;
    match acc.storage_mut() {
        Storage::Cpu(CpuStorage::F32(dst)) => {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            Ok(())
        }
        Storage::Cpu(other) => Err(Error::DType {
            op: "gradient accumulation",
            msg: format!("{what}: gradients are accumulated in f32, this one is {}", other.dtype()),
        }),
        Storage::Cuda(_) => unreachable!("on_cuda found both on the CPU"),
    }
}
