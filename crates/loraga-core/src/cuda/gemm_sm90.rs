//! Host side of the Hopper GEMM engine (`kernels/gemm_sm90.cu`): TMA tensor maps, the persistent
//! launch, and the checks that keep a launch inside what the kernel handles.
//!
//! The engine computes `C = alpha * sum_i op(A_i) op(B_i) + beta * C` over one or two "K sources"
//! (row-major; `Gemm::trans_a` / `trans_b` say how each is stored, as everywhere in loraga),
//! storing C [M, N] as bf16 or f32. Operands are bf16 (any layout, contiguous dimensions multiples
//! of 8), or f32 computed on TF32 tensor cores: wgmma reads TF32 operands K-major only, so an f32
//! operand that is MN-major (or whose K is not a multiple of 4) is first repacked into a K-major
//! scratch buffer with rows padded to 16 bytes (`gemm_pack_k_major_f32`, one extra read and write
//! of that operand), and every f32 problem runs the kernel's nt entry point.

use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use super::gemm::{check_sources, layout_name, misaligned, nothing_to_do};
use super::storage::{CudaSlices, CudaStorage};
use super::tma::{Elem, TmaDesc, tensor_map};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::Gemm;

pub use super::gemm::KSource;

// Must match kernels/gemm_sm90.cu.
const BM: usize = 128;
const BN: usize = 256;
/// A k-tile is 128 bytes of K: 64 bf16 or 32 f32 elements.
const BK_BYTES: usize = 128;
/// One wgmma K step is 32 bytes: k16 for bf16, k8 for TF32.
const MMA_K_BYTES: usize = 32;
const STAGES: usize = 3;
const THREADS: u32 = 384;
/// The operand ring, the bf16 output staging tile, the barriers, and 1024 bytes of alignment slack.
const SMEM_BYTES: usize = STAGES * (BM + BN) * BK_BYTES + BM * BN * 2 + 2 * STAGES * 8 + 1024;

/// Why the engine cannot take a problem, or None if it can. Callers use this to choose a path.
pub fn unsupported(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &CudaStorage) -> Option<String> {
    if !c.device.arch().has_wgmma() {
        return Some(format!("the GEMM engine needs sm_90a (wgmma); this device is {}", c.device.arch()));
    }
    if let Some(why) = check_sources("GEMM engine", sources, m, n, c) {
        return Some(why);
    }
    // TMA needs the contiguous dimension of every bf16 operand in 16-byte rows; f32 operands that
    // are not K-major in 16-byte rows are repacked.
    if sources[0].a.dtype() == DType::BF16 {
        return sources.iter().enumerate().find_map(|(i, s)| misaligned(g, i, s, m, n, 8));
    }
    None
}

/// `c = alpha * sum_i op(a_i) op(b_i) + beta * c` on the engine, with `g`'s transposes and scales.
pub fn gemm(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &mut CudaStorage) -> Result<()> {
    let (alpha, beta) = (g.alpha, g.beta);
    if nothing_to_do(unsupported(g, sources, m, n, c), m, n)? {
        return Ok(());
    }
    let dev = c.device.clone();
    let stream = dev.stream();
    let f32_operands = sources[0].a.dtype() == DType::F32;
    // f32 operands all run as nt (K-major) after repacking; bf16 ones in their own layout.
    let (ta, tb) = if f32_operands { (false, true) } else { (g.trans_a, g.trans_b) };
    let name = format!("gemm_sm90_{}_{}_{}", layout_name(ta, tb), sources[0].a.dtype(), c.dtype());
    let f = dev.function_with_shared_memory("gemm_sm90", &name, SMEM_BYTES)?;

    let mut maps = Vec::with_capacity(4);
    // Each source's K in 32-byte MMA steps (the kernel's k-tile is four).
    let mut k_steps = [0i32; 2];
    let mut guards = Vec::new();
    let mut scratch = Vec::new(); // repacked f32 operands, freed (stream-ordered) after the launch
    for (i, s) in sources.iter().enumerate() {
        if f32_operands {
            // op(A) [m, k] and op(B)ᵀ [n, k], K-major. (row, k) of op(A) is at r * rs + k * cs.
            let (a_rs, a_cs) = if g.trans_a { (1, m) } else { (s.k, 1) };
            let (b_rs, b_cs) = if g.trans_b { (s.k, 1) } else { (1, n) };
            maps.push(k_major_f32(s.a, m, s.k, (a_rs, a_cs), BM, &mut scratch, &mut guards)?);
            maps.push(k_major_f32(s.b, n, s.k, (b_rs, b_cs), BN, &mut scratch, &mut guards)?);
        } else {
            let (pa, ga) = device_ptr(s.a, stream);
            let (pb, gb) = device_ptr(s.b, stream);
            guards.push(ga);
            guards.push(gb);
            // K-major operands load in boxes of [tile rows, 64 K]; MN-major ones in [64 K, 64 MN].
            let bf = Elem::Bf16;
            maps.push(if g.trans_a {
                tensor_map(pa, s.k, m, m, 64, bf)?
            } else {
                tensor_map(pa, m, s.k, s.k, BM, bf)?
            });
            maps.push(if g.trans_b {
                tensor_map(pb, n, s.k, s.k, BN, bf)?
            } else {
                tensor_map(pb, s.k, n, n, 64, bf)?
            });
        }
        k_steps[i] = (s.k * sources[0].a.dtype().size_in_bytes()).div_ceil(MMA_K_BYTES) as i32;
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
            (tensor_map(x.device_ptr(stream).0, m, n, n, 64, Elem::Bf16)?, EPI_TMA_STORE)
        }
        CudaSlices::F32(x) if (beta == 0.0 || beta == 1.0) && n.is_multiple_of(4) => {
            let mode = if beta == 0.0 { EPI_TMA_STORE } else { EPI_TMA_ADD };
            (tensor_map(x.device_ptr(stream).0, m, n, n, 64, Elem::F32)?, mode)
        }
        _ => (maps[0], EPI_DIRECT),
    };

    // Skinny f32 products (fewer tiles than half the SMs, long K) split K across the idle SMs and
    // add their slices into C; with beta == 0, C is zeroed first. Not when the caller asked for
    // bit-reproducible results: the slices are added in the order they finish.
    let tiles = m.div_ceil(BM) * n.div_ceil(BN);
    let per_tile = BK_BYTES / MMA_K_BYTES;
    let total_k_tiles = k_steps.iter().map(|&s| (s as usize).div_ceil(per_tile)).sum::<usize>();
    let mut k_splits = 1usize;
    if !g.deterministic && epilogue != EPI_DIRECT && c.dtype() == DType::F32 && tiles * 2 <= dev.sm_count() {
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
    launch.arg(&maps[0]).arg(&maps[1]).arg(&k_steps[0]).arg(&maps[2]).arg(&maps[3]).arg(&k_steps[1]).arg(&k_splits);
    launch.arg(&c_map).arg(&epilogue);
    match &mut c.slice {
        CudaSlices::F32(z) => launch.arg(z),
        CudaSlices::BF16(z) => launch.arg(z),
    };
    launch.arg(&mi).arg(&ni).arg(&ldc).arg(&alpha).arg(&beta);
    // SAFETY: the arguments match gemm_sm90_<layout>_<in>_<out>; the tensor maps describe live
    // buffers (the operands, or the scratch copies still owned here) whose sizes `unsupported`
    // checked; the shared memory size matches the kernel's layout.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(gemm_sm90)"))?;
    drop(guards);
    drop(scratch); // stream-ordered: freed after the kernel that reads it
    Ok(())
}

fn device_ptr<'a>(s: &'a CudaStorage, stream: &'a cudarc::driver::CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    match &s.slice {
        CudaSlices::BF16(x) => x.device_ptr(stream),
        CudaSlices::F32(x) => x.device_ptr(stream),
    }
}

/// The tensor map of an f32 operand as the TF32 kernel reads it: K-major [rows, k] in boxes of
/// [box_rows, 32 K]. `(rs, cs)` are the strides of (row, k) in `x`; an operand that is already
/// K-major with 16-byte rows (cs == 1, k a multiple of 4) is used in place, anything else is
/// repacked into a new buffer (pushed on `scratch`) with rows padded to a multiple of 4.
fn k_major_f32<'a>(
    x: &'a CudaStorage,
    rows: usize,
    k: usize,
    (rs, cs): (usize, usize),
    box_rows: usize,
    scratch: &mut Vec<cudarc::driver::CudaSlice<f32>>,
    guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
) -> Result<TmaDesc> {
    let dev = &x.device;
    let stream = dev.stream();
    let (src, guard) = device_ptr(x, stream);
    guards.push(guard);
    if cs == 1 && k.is_multiple_of(4) {
        return tensor_map(src, rows, k, k, box_rows, Elem::F32);
    }
    let ld = k.next_multiple_of(4);
    if ld.div_ceil(32) > 65535 {
        return Err(Error::shape("gemm (TF32 repack)", format!("K = {k} exceeds the repack grid's 2,097,120")));
    }
    let mut dst = super::ops::uninit::<f32>(dev, rows * ld)?;
    let f = dev.function("gemm_sm90", "gemm_pack_k_major_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(32) as u32, ld.div_ceil(32) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let (rs, cs, rows_i, k_i, ld_i) = (rs as i64, cs as i64, rows as i32, k as i32, ld as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&src).arg(&rs).arg(&cs).arg(&rows_i).arg(&k_i).arg(&mut dst).arg(&ld_i);
    // SAFETY: gemm_pack_k_major_f32(src, rs, cs, rows, k, dst, ld): src holds rows x k elements at
    // those strides (sizes checked by `unsupported`), dst holds rows x ld.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(gemm_pack_k_major_f32)"))?;
    let (p, _) = dst.device_ptr(stream);
    let map = tensor_map(p, rows, k, ld, box_rows, Elem::F32)?;
    scratch.push(dst);
    Ok(map)
}

// Must match EPI_* in kernels/gemm_sm90.cu.
const EPI_DIRECT: i32 = 0;
const EPI_TMA_STORE: i32 = 1;
const EPI_TMA_ADD: i32 = 2;
