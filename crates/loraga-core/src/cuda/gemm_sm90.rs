//! Host side of the Hopper GEMM engine (`kernels/gemm_sm90.cu`): TMA tensor maps, the persistent
//! launch, and the checks that keep a launch inside what the kernel handles.
//!
//! The engine computes `C = alpha * sum_i op(A_i) op(B_i) + beta * C` over one or two "K sources"
//! (bf16, row-major; `Gemm::trans_a` / `trans_b` say how each is stored, as everywhere in loraga),
//! storing C [M, N] as bf16 or f32.

use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};
use cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::storage::{CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::Gemm;

// Must match kernels/gemm_sm90.cu.
const BM: usize = 128;
const BN: usize = 256;
const BK: usize = 64;
const STAGES: usize = 3;
const THREADS: u32 = 384;
/// The operand ring, the bf16 output staging tile, the barriers, and 1024 bytes of alignment slack.
const SMEM_BYTES: usize = STAGES * (BM + BN) * BK * 2 + BM * BN * 2 + 2 * STAGES * 8 + 1024;

/// A CUtensorMap: 128 opaque bytes the driver fills, handed to the kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TmaDesc([u64; 16]);

// SAFETY: plain bytes with the layout and alignment of the kernel's `TmaDesc` parameter.
unsafe impl DeviceRepr for TmaDesc {}

/// One operand pair of the K loop: op(A) [m, k] and op(B) [k, n], bf16, stored as the GEMM's
/// transpose flags say (A [m, k] or [k, m]; B [k, n] or [n, k]).
pub struct KSource<'a> {
    pub a: &'a CudaStorage,
    pub b: &'a CudaStorage,
    pub k: usize,
}

/// Why the engine cannot take a problem, or None if it can. Callers use this to choose a path.
pub fn unsupported(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &CudaStorage) -> Option<String> {
    if !c.device.arch().has_wgmma() {
        return Some(format!("the GEMM engine needs sm_90a (wgmma); this device is {}", c.device.arch()));
    }
    if sources.is_empty() || sources.len() > 2 {
        return Some(format!("the GEMM engine takes 1 or 2 K sources, got {}", sources.len()));
    }
    for (i, s) in sources.iter().enumerate() {
        if s.a.device != c.device || s.b.device != c.device {
            return Some(format!("K source {i}: operands and C are on different devices"));
        }
        if s.a.dtype() != DType::BF16 || s.b.dtype() != DType::BF16 {
            return Some(format!(
                "K source {i}: the GEMM engine takes bf16 operands, got {} and {}",
                s.a.dtype(),
                s.b.dtype()
            ));
        }
        // TMA needs the contiguous dimension of every operand in 16-byte rows.
        let contiguous = [("K", s.k, !g.trans_a || g.trans_b), ("M", m, g.trans_a), ("N", n, !g.trans_b)];
        for (what, v, applies) in contiguous {
            if applies && !v.is_multiple_of(8) {
                return Some(format!(
                    "K source {i}: {what} = {v} is not a multiple of 8 (with trans_a = {}, trans_b = {} it is an operand's contiguous dimension, and TMA needs 16-byte rows)",
                    g.trans_a, g.trans_b
                ));
            }
        }
        if s.a.len() != m * s.k || s.b.len() != n * s.k {
            return Some(format!(
                "K source {i}: buffers of {} and {} elements do not hold A [{m}, {}] and B [{n}, {}]",
                s.a.len(),
                s.b.len(),
                s.k,
                s.k
            ));
        }
    }
    if c.len() != m * n {
        return Some(format!("C holds {} elements, not [{m}, {n}]", c.len()));
    }
    if m > i32::MAX as usize || n > i32::MAX as usize {
        return Some(format!("[{m}, {n}] exceeds 32-bit dimensions"));
    }
    None
}

/// `c = alpha * sum_i op(a_i) op(b_i) + beta * c` on the engine, with `g`'s transposes and scales.
pub fn gemm(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &mut CudaStorage) -> Result<()> {
    let (alpha, beta) = (g.alpha, g.beta);
    if let Some(why) = unsupported(g, sources, m, n, c) {
        return Err(Error::InvalidArgument(why));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dev = c.device.clone();
    let stream = dev.stream();
    let layout = format!("{}{}", if g.trans_a { "t" } else { "n" }, if g.trans_b { "t" } else { "n" });
    let name = format!("gemm_sm90_{layout}_bf16_{}", c.dtype());
    let f = dev.function_with_shared_memory("gemm_sm90", &name, SMEM_BYTES)?;

    let mut maps = Vec::with_capacity(4);
    let mut k_tiles = [0i32; 2];
    let mut guards = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let (pa, ga) = bf16_ptr(s.a, stream);
        let (pb, gb) = bf16_ptr(s.b, stream);
        guards.push(ga);
        guards.push(gb);
        // K-major operands load in boxes of [tile rows, 64 K]; MN-major ones in [64 K, 64 MN].
        let bf = Elem::Bf16;
        maps.push(if g.trans_a { tensor_map(pa, s.k, m, BK, bf)? } else { tensor_map(pa, m, s.k, BM, bf)? });
        maps.push(if g.trans_b { tensor_map(pb, n, s.k, BN, bf)? } else { tensor_map(pb, s.k, n, BK, bf)? });
        k_tiles[i] = s.k.div_ceil(BK) as i32;
    }
    if sources.len() == 1 {
        // The second source is empty (0 K tiles); its maps are never read but must be valid bytes.
        maps.push(maps[0]);
        maps.push(maps[1]);
    }

    // The epilogue (kernels/gemm_sm90.cu, EPI_*): through TMA where beta allows it and C's rows are
    // 16-byte aligned, else from registers.
    // The read guard records nothing: event tracking is off (one stream per device).
    let (c_map, epilogue) = match &c.slice {
        CudaSlices::BF16(x) if beta == 0.0 && n.is_multiple_of(8) => {
            (tensor_map(x.device_ptr(stream).0, m, n, 64, Elem::Bf16)?, EPI_TMA_STORE)
        }
        CudaSlices::F32(x) if (beta == 0.0 || beta == 1.0) && n.is_multiple_of(4) => {
            let mode = if beta == 0.0 { EPI_TMA_STORE } else { EPI_TMA_ADD };
            (tensor_map(x.device_ptr(stream).0, m, n, 64, Elem::F32)?, mode)
        }
        _ => (maps[0], EPI_DIRECT),
    };

    // Skinny f32 products (fewer tiles than half the SMs, long K) split K across the idle SMs and
    // add their slices into C; with beta == 0, C is zeroed first.
    let tiles = m.div_ceil(BM) * n.div_ceil(BN);
    let total_k_tiles = (k_tiles[0] + k_tiles[1]) as usize;
    let mut k_splits = 1usize;
    if epilogue != EPI_DIRECT && c.dtype() == DType::F32 && tiles * 2 <= dev.sm_count() {
        k_splits = (dev.sm_count() / tiles).min(total_k_tiles / 4).max(1);
    }
    let mut epilogue = epilogue;
    if k_splits > 1 && epilogue == EPI_TMA_STORE {
        match &mut c.slice {
            CudaSlices::F32(x) => stream.memset_zeros(x).map_err(Error::cuda("cuMemsetD8"))?,
            CudaSlices::BF16(_) => unreachable!("split K is only chosen for f32 outputs"),
        }
        epilogue = EPI_TMA_ADD;
    }
    let units = tiles * k_splits;
    let k_splits = k_splits as i32;
    let grid = units.min(dev.sm_count()) as u32;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 };
    let (mi, ni, ldc) = (m as i32, n as i32, n as i64);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&maps[0]).arg(&maps[1]).arg(&k_tiles[0]).arg(&maps[2]).arg(&maps[3]).arg(&k_tiles[1]).arg(&k_splits);
    launch.arg(&c_map).arg(&epilogue);
    match &mut c.slice {
        CudaSlices::F32(z) => launch.arg(z),
        CudaSlices::BF16(z) => launch.arg(z),
    };
    launch.arg(&mi).arg(&ni).arg(&ldc).arg(&alpha).arg(&beta);
    // SAFETY: the arguments match gemm_sm90_<layout>_bf16_<out>; the tensor maps describe live buffers
    // whose sizes `unsupported` checked; the shared memory size matches the kernel's layout.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(gemm_sm90)"))?;
    drop(guards);
    Ok(())
}

fn bf16_ptr<'a>(s: &'a CudaStorage, stream: &'a cudarc::driver::CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    match &s.slice {
        CudaSlices::BF16(x) => x.device_ptr(stream),
        CudaSlices::F32(x) => x.device_ptr(stream),
    }
}

// Must match EPI_* in kernels/gemm_sm90.cu.
const EPI_DIRECT: i32 = 0;
const EPI_TMA_STORE: i32 = 1;
const EPI_TMA_ADD: i32 = 2;

#[derive(Clone, Copy)]
enum Elem {
    Bf16,
    F32,
}

/// The tensor map of a row-major [rows, cols] matrix moved in boxes of `box_rows` rows x 128 bytes
/// (64 bf16 or 32 f32) with 128-byte swizzle; out-of-bounds parts of a box read as zeros and are
/// not written.
fn tensor_map(ptr: u64, rows: usize, cols: usize, box_rows: usize, elem: Elem) -> Result<TmaDesc> {
    let (size, dtype) = match elem {
        Elem::Bf16 => (2, CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16),
        Elem::F32 => (4, CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32),
    };
    let mut map = TmaDesc([0; 16]);
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * size) as u64]; // bytes between rows; the innermost stride is implied
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
