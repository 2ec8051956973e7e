//! Typed access to device buffers for launchers written once over the element type: a launcher
//! checks its arguments' dtypes, picks `T` from them, and gets each buffer as a `CudaSlice<T>`.
//! Also the raw device pointers that cuBLAS calls take.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::device::CudaDevice;
use super::storage::CudaSlices;
use crate::dtype::WithDType;

/// An element type a [`CudaSlices`] can hold.
pub trait DeviceElem: WithDType {
    fn slice(s: &CudaSlices) -> Option<&CudaSlice<Self>>;
    fn slice_mut(s: &mut CudaSlices) -> Option<&mut CudaSlice<Self>>;
}

impl DeviceElem for f32 {
    fn slice(s: &CudaSlices) -> Option<&CudaSlice<f32>> {
        match s {
            CudaSlices::F32(x) => Some(x),
            CudaSlices::BF16(_) => None,
        }
    }
    fn slice_mut(s: &mut CudaSlices) -> Option<&mut CudaSlice<f32>> {
        match s {
            CudaSlices::F32(x) => Some(x),
            CudaSlices::BF16(_) => None,
        }
    }
}

impl DeviceElem for bf16 {
    fn slice(s: &CudaSlices) -> Option<&CudaSlice<bf16>> {
        match s {
            CudaSlices::BF16(x) => Some(x),
            CudaSlices::F32(_) => None,
        }
    }
    fn slice_mut(s: &mut CudaSlices) -> Option<&mut CudaSlice<bf16>> {
        match s {
            CudaSlices::BF16(x) => Some(x),
            CudaSlices::F32(_) => None,
        }
    }
}

/// The device address of a buffer, for library calls that read it. The guard cudarc returns
/// only records events when event tracking is on, and [`CudaDevice`] switches it off.
pub(crate) fn ptr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    let (p, _guard) = s.device_ptr(dev.stream());
    p
}

/// The same for a buffer the call writes.
pub(crate) fn ptr_mut<T>(s: &mut CudaSlice<T>, dev: &CudaDevice) -> u64 {
    let (p, _guard) = s.device_ptr_mut(dev.stream());
    p
}
