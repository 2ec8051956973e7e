//! Launchers of the autograd tape's ops on the device: `kernels/elementwise.cu`,
//! `kernels/rms_norm.cu`, `kernels/rope.cu`, `kernels/embedding.cu`, and the linear layer's
//! GEMMs. They work on [`CudaStorage`]; the tape (`crate::autograd`) checks shapes and calls them
//! when its tensors live on a CUDA device.
//!
//! Conventions, the same for every op:
//! - Activations are f32 or bf16; every kernel computes in f32 registers.
//! - An op's output has the dtype of its main (activation) input.
//! - The gradient with respect to an input has that input's dtype, except for weight-like inputs
//!   (linear's weight, rms_norm's weight, an embedding table), whose gradients are f32: they are
//!   sums over many tokens, and LoRA-GA accumulates them in f32.
//! - Operands whose dtypes must agree and do not are an error that says to cast
//!   (`Tape::cast`); nothing is converted silently, except that a backward pass first brings a
//!   gradient that arrived in the other dtype to its op's output dtype ([`elementwise::as_dtype`]).
//!
//! Output buffers are allocated uninitialised, because every kernel writes every element of its
//! outputs. A test can switch on [`poison_outputs`] so that an element a kernel forgot to write
//! reads as NaN instead of as whatever the allocator's pool held.

pub mod elementwise;
pub mod embedding;
pub mod linear;
pub mod rms_norm;
pub mod rope;

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaSlice, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::storage::{CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Threads per block of every kernel here (each .cu defines THREADS to the same value).
pub(crate) const THREADS: u32 = 256;

static POISON: AtomicBool = AtomicBool::new(false);

/// Fill every output buffer of these ops with NaN (all-ones bytes, a NaN in f32 and in bf16)
/// before its kernel runs, process-wide; for tests, which then see an unwritten element as NaN.
/// Costs one memset per output.
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// `n` unset elements on `dev`: the caller launches a kernel that writes all of them before
/// anything reads them.
pub(crate) fn uninit<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    let stream = dev.stream();
    // SAFETY: the memory is unset; see above for why nobody reads it unwritten.
    let mut slice = unsafe { stream.alloc::<T>(n) }.map_err(Error::cuda("cuMemAllocAsync"))?;
    if POISON.load(Ordering::Relaxed) && n > 0 {
        let bytes = n * std::mem::size_of::<T>();
        let (ptr, _guard) = slice.device_ptr_mut(stream);
        // SAFETY: `ptr` is the live allocation of `bytes` bytes just made on this stream; any
        // byte pattern is a valid f32, bf16 or u32.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
            .map_err(Error::cuda("cuMemsetD8Async"))?;
    }
    Ok(slice)
}

/// An output buffer of `n` elements of `dtype` (see [`uninit`]).
pub(crate) fn output(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    let slice = match dtype {
        DType::F32 => CudaSlices::F32(uninit(dev, n)?),
        DType::BF16 => CudaSlices::BF16(uninit(dev, n)?),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

/// A grid-stride launch over `items` work items: one THREADS-thread block per THREADS items, at
/// least one and at most 16 per SM (the kernels' loops stride over the rest).
pub(crate) fn grid_stride(dev: &CudaDevice, items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(THREADS as usize).clamp(1, dev.sm_count().max(1) * 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Pushes a read-only buffer argument, whatever its dtype (the kernel name fixes the type).
pub(crate) fn arg<'a>(launch: &mut LaunchArgs<'a>, s: &'a CudaStorage) {
    match &s.slice {
        CudaSlices::F32(x) => launch.arg(x),
        CudaSlices::BF16(x) => launch.arg(x),
    };
}

/// Pushes a written buffer argument.
pub(crate) fn arg_mut<'a>(launch: &mut LaunchArgs<'a>, s: &'a mut CudaStorage) {
    match &mut s.slice {
        CudaSlices::F32(x) => launch.arg(x),
        CudaSlices::BF16(x) => launch.arg(x),
    };
}

/// An error unless `s` lives on `dev`, has `dtype` and holds `len` elements. `what` names the
/// operand in the message.
pub(crate) fn expect(
    op: &'static str,
    what: &str,
    s: &CudaStorage,
    dev: &CudaDevice,
    dtype: DType,
    len: usize,
) -> Result<()> {
    if s.device != *dev {
        return Err(Error::DeviceMismatch { op, lhs: format!("{dev:?}"), rhs: format!("{what} on {:?}", s.device) });
    }
    if s.dtype() != dtype {
        return Err(Error::DType {
            op,
            msg: format!("{what} is {} where {dtype} is expected; cast it on the tape first (Tape::cast)", s.dtype()),
        });
    }
    if s.len() != len {
        return Err(Error::shape(op, format!("{what} holds {} elements, expected {len}", s.len())));
    }
    Ok(())
}

/// An error unless an activation x and the weight applied to it have one dtype (mixed precision
/// casts the f32 master weight on the tape first).
pub(crate) fn same_dtype_as_x(op: &'static str, x: &CudaStorage, w: &CudaStorage) -> Result<()> {
    if x.dtype() == w.dtype() {
        return Ok(());
    }
    Err(Error::DType {
        op,
        msg: format!(
            "x is {} but the weight is {}; cast the weight to {} on the tape first (Tape::cast)",
            x.dtype(),
            w.dtype(),
            x.dtype()
        ),
    })
}

/// A dimension as the kernels' 32-bit `int`, or an error naming it.
pub(crate) fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, format!("{what} = {v} exceeds the kernels' 32-bit limit")))
}
