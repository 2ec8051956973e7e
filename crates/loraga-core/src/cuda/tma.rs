//! TMA tensor maps, shared by the Hopper kernels that load their tiles with TMA
//! (`kernels/gemm_sm90.cu`, `kernels/rsvd_skinny_wg.cu`; `kernels/wgmma_sm90.cuh` declares the
//! device side).

use cudarc::driver::DeviceRepr;
use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};

use crate::error::{Error, Result};

/// A CUtensorMap: 128 opaque bytes the driver fills, handed to the kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TmaDesc([u64; 16]);

// SAFETY: plain bytes with the layout and alignment of the kernel's `TmaDesc` parameter.
unsafe impl DeviceRepr for TmaDesc {}

#[derive(Clone, Copy)]
pub(crate) enum Elem {
    Bf16,
    F32,
}

/// The tensor map of a row-major [rows, cols] matrix with `ld` elements between rows, moved in
/// boxes of `box_rows` rows x 128 bytes (64 bf16 or 32 f32) with 128-byte swizzle; out-of-bounds
/// parts of a box read as zeros and are not written.
pub(crate) fn tensor_map(
    ptr: u64,
    rows: usize,
    cols: usize,
    ld: usize,
    box_rows: usize,
    elem: Elem,
) -> Result<TmaDesc> {
    let (size, dtype) = match elem {
        Elem::Bf16 => (2, CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16),
        Elem::F32 => (4, CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32),
    };
    let mut map = TmaDesc([0; 16]);
    let dims = [cols as u64, rows as u64];
    let strides = [(ld * size) as u64]; // bytes between rows; the innermost stride is implied
    let boxes = [(128 / size) as u32, box_rows as u32];
    let elem_strides = [1u32, 1];
    // SAFETY: every pointer refers to a local array of the rank the call is told (2).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TmaDesc).cast(),
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(Error::cuda("cuTensorMapEncodeTiled"))?;
    Ok(map)
}
