//! Getting at an op's device buffers, or the error that says why not: the CUDA side of
//! `data.rs`. The launchers in [`crate::cuda`] check dtypes, lengths and devices among the
//! buffers they are given; here a tensor that is not on a CUDA device at all is refused.

use crate::cuda::CudaStorage;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// The device buffer of `t`, an input named `what` of an op whose other inputs are on CUDA.
pub(crate) fn cuda_storage<'a>(t: &'a Tensor, op: &'static str, what: &str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(not_on_cuda(op, what)),
    }
}

/// The same for an output the op created on the device.
pub(crate) fn cuda_storage_mut<'a>(t: &'a mut Tensor, op: &'static str, what: &str) -> Result<&'a mut CudaStorage> {
    match t.storage_mut() {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(not_on_cuda(op, what)),
    }
}

/// A zero tensor with `t`'s shape, dtype and device: where an op writes a gradient of `t`.
pub(crate) fn zeros_like(t: &Tensor) -> Result<Tensor> {
    Tensor::zeros(t.dims(), t.dtype(), &t.device())
}

fn not_on_cuda(op: &'static str, what: &str) -> Error {
    Error::DeviceMismatch { op, lhs: format!("{what} on the CPU"), rhs: "the op's other tensors on CUDA".into() }
}
