//! Getting at an op's f32 host data, or the error that says why not. Every op goes through here,
//! so the CUDA and dtype errors read the same everywhere.

use crate::cpu::CpuStorage;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

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

/// `acc += g`, element by element (gradient accumulation); shapes must match.
pub(crate) fn add_assign(acc: &mut Tensor, g: &Tensor, what: &str) -> Result<()> {
    if acc.dims() != g.dims() {
        return Err(Error::shape(
            "gradient accumulation",
            format!("{what}: gradient of shape {:?} added to one of shape {:?}", g.dims(), acc.dims()),
        ));
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
        Storage::Cuda(_) => Err(Error::NotOnCuda("gradient accumulation")),
    }
}
