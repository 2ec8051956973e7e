//! LoRA's backward products that read dY, V' = s dY B and dB = dYᵀ U', in one pass over dY
//! (`kernels/lora_dy.cu`, whose header gives the layouts and the work split). bf16 operands, r a
//! multiple of 8 up to [`MAX_RANK`], N a multiple of 8, on Hopper (TMA); the results do not
//! depend on the order in which the kernel's blocks finish. [`crate::lora_linear`] uses it where
//! it applies ([`takes`]) and cuBLAS's two GEMMs elsewhere.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::tma::{Elem, tensor_map};
use super::{CudaDevice, CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MODULE: &str = "lora_dy";
const OP: &str = "lora_dy";
/// The widest adapter the kernel takes; wider ones keep cuBLAS's two GEMMs (the kernel's header
/// says why: registers, shared-memory reads and partial sums grow with r).
pub const MAX_RANK: usize = 32;
// Must match kernels/lora_dy.cu: the tile of a step, the ring's depth, the warps that multiply
// (one more loads).
const TM: usize = 128;
const TN: usize = 64;
const STAGES: usize = 4;
const CONSUMERS: usize = 8;
const THREADS: u32 = 32 * (CONSUMERS as u32 + 1);

/// The kernel instance's rank width R for rank r.
fn width(r: usize) -> usize {
    if r <= 16 { 16 } else { 32 }
}

/// Dynamic shared memory of a block whose regions are `bc` chunks wide: the ring (a dY tile and a
/// box of B's rows, 64 columns wide, a stage), two boxes of U''s rows, the dBᵀ accumulator
/// [R][bc·TN + 8] f32, the mbarriers, and slack to align the base to 1024 bytes.
fn shared_bytes(rw: usize, bc: usize) -> usize {
    STAGES * (TM * TN + TN * 64) * 2 + 2 * TM * 64 * 2 + rw * (bc * TN + 8) * 4 + (2 * STAGES + 4) * 8 + 1024
}

/// Whether the kernel runs V' and dB for these operands on `dev`.
pub fn takes(dev: &CudaDevice, dtype: DType, m: usize, n: usize, r: usize) -> bool {
    dtype == DType::BF16
        && dev.arch().has_wgmma()
        && m > 0
        && (1..=MAX_RANK).contains(&r)
        && r.is_multiple_of(8)
        && n.is_multiple_of(8)
        && shared_bytes(width(r), 1) <= dev.shared_memory_per_block_optin()
}

/// [`regions`], remembered: the search takes ~12 µs of host time, and a training step asks for
/// the same few shapes in every LoRA layer's backward. (Emptied past 4096 entries: token counts
/// that vary from batch to batch must not grow it without bound.)
fn regions_cached(m: usize, n: usize, r: usize, sms: usize, optin: usize) -> (usize, usize) {
    type Key = (usize, usize, usize, usize, usize);
    static CHOSEN: Mutex<Option<HashMap<Key, (usize, usize)>>> = Mutex::new(None);
    let mut chosen = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    let map = chosen.get_or_insert_with(HashMap::new);
    if map.len() >= 4096 {
        map.clear();
    }
    *map.entry((m, n, r, sms, optin)).or_insert_with(|| regions(m, n, r, sms, optin))
}

/// The region shape (row tiles `a`, column chunks `b`) for an m x n dY on `sms` SMs, one block
/// each: the fewest block rounds of steps (a dY tile each), charged also for the partial sums
/// written and read back by the summing kernel (a step's worth per 16 KB, spread over the SMs).
fn regions(m: usize, n: usize, r: usize, sms: usize, optin: usize) -> (usize, usize) {
    let (tiles, chunks) = (m.div_ceil(TM), n.div_ceil(TN));
    let step_bytes = (TM * TN * 2) as f64;
    let mut best = (f64::INFINITY, (1, 1));
    for b in (1..=chunks.min(64)).filter(|&b| shared_bytes(width(r), b) <= optin) {
        for a in 1..=tiles.min(64) {
            let (rbs, cbs) = (tiles.div_ceil(a), chunks.div_ceil(b));
            let rounds = (rbs * cbs).div_ceil(sms) as f64;
            let partials = ((cbs * m + rbs * n) * r * 4 * 2) as f64;
            let cost = rounds * (a * b) as f64 + partials / step_bytes / sms as f64;
            if cost < best.0 {
                best = (cost, (a, b));
            }
        }
    }
    best.1
}

/// `v = s dY B` (bf16 [m, r]) and `db = dYᵀ u` (f32 [n, r]) from bf16 dY [m, n], B [n, r] and
/// u [m, r]. Buffers of other lengths or dtypes, and problems [`takes`] refuses, are errors.
pub fn run(
    dy: &CudaStorage,
    b: &CudaStorage,
    u: &CudaStorage,
    (m, n, r): (usize, usize, usize),
    s: f32,
    v: &mut CudaStorage,
    db: &mut CudaStorage,
) -> Result<()> {
    let dev = dy.device.clone();
    if !takes(&dev, dy.dtype(), m, n, r) {
        return Err(Error::shape(
            OP,
            format!(
                "needs bf16 on Hopper, r ≤ {MAX_RANK} and r, n multiples of 8 (m {m}, n {n}, r {r}, {})",
                dy.dtype()
            ),
        ));
    }
    for (what, x, len) in
        [("dY", dy, m * n), ("B", b, n * r), ("U'", u, m * r), ("V'", &*v, m * r), ("dB", &*db, n * r)]
    {
        if x.len() != len {
            return Err(Error::shape(
                OP,
                format!("{what} holds {} elements, expected {len} (m {m}, n {n}, r {r})", x.len()),
            ));
        }
    }
    let stream = dev.stream();
    let rw = width(r);
    let sms = dev.sm_count().max(1);
    let (a, bc) = regions_cached(m, n, r, sms, dev.shared_memory_per_block_optin());
    let (cbs, rbs) = (n.div_ceil(TN).div_ceil(bc), m.div_ceil(TM).div_ceil(a));
    // SAFETY (both): the main kernel writes every element before the summing kernel reads it.
    let v_partials = unsafe { stream.alloc::<f32>(cbs * m * r) }.map_err(Error::cuda("cuMemAllocAsync"))?;
    let db_partials = unsafe { stream.alloc::<f32>(rbs * n * r) }.map_err(Error::cuda("cuMemAllocAsync"))?;

    let (pdy, _g1) = bf16(dy, "dY")?.device_ptr(stream);
    let (pb, _g2) = bf16(b, "B")?.device_ptr(stream);
    let (pu, _g3) = bf16(u, "U'")?.device_ptr(stream);
    // dY in [TM rows, 64 columns] boxes; B's and U''s rows in boxes 64 columns wide (r ≤ 32 of
    // them real: TMA fills the rest with zeros).
    let tdy = tensor_map(pdy, m, n, n, TM, Elem::Bf16)?;
    let tb = tensor_map(pb, n, r, r, TN, Elem::Bf16)?;
    let tu = tensor_map(pu, m, r, r, TM, Elem::Bf16)?;
    let (pv, _g4) = match &mut v.slice {
        CudaSlices::BF16(x) => x.device_ptr_mut(stream),
        CudaSlices::F32(_) => return Err(Error::DType { op: OP, msg: "V' must be bf16".into() }),
    };
    let (pdb, _g5) = match &mut db.slice {
        CudaSlices::F32(x) => x.device_ptr_mut(stream),
        CudaSlices::BF16(_) => return Err(Error::DType { op: OP, msg: "dB must be f32".into() }),
    };
    let (pvp, _g6) = v_partials.device_ptr(stream);
    let (pdp, _g7) = db_partials.device_ptr(stream);

    let smem = shared_bytes(rw, bc);
    let f = dev.function_with_shared_memory(MODULE, &format!("lora_dy_{rw}"), smem)?;
    let cfg = LaunchConfig {
        grid_dim: (cbs as u32, rbs as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (mi, ni, ri, ai, bci) = (m as i32, n as i32, r as i32, a as i32, bc as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&tdy).arg(&tb).arg(&tu).arg(&mi).arg(&ni).arg(&ri).arg(&ai).arg(&bci).arg(&pvp).arg(&pdp);
    // SAFETY: matches lora_dy_<R>(TmaDesc tdy, TmaDesc tb, TmaDesc tu, int m, int n, int r, int a,
    // int bc, float* v_partials, float* db_partials): the maps describe dY (m*n bf16), B (n*r)
    // and U' (m*r) with 16-byte rows (takes: n and r multiples of 8); the partials hold C·m·r and
    // RB·n·r f32 for the grid (C, RB) launched; R = rw ≥ r; THREADS threads and
    // shared_bytes(rw, bc) of dynamic shared memory, as the kernel lays it out.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(lora_dy)"))?;

    let f = dev.function(MODULE, "lora_dy_sum")?;
    let blocks = ((m + n) * r / 4).div_ceil(256).min(8 * sms) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (ci, rbi) = (cbs as i32, rbs as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&pvp).arg(&ci).arg(&pdp).arg(&rbi).arg(&mi).arg(&ni).arg(&ri).arg(&s).arg(&pv).arg(&pdb);
    // SAFETY: matches lora_dy_sum(const float* v_partials, int C, const float* db_partials, int RB,
    // int m, int n, int r, float s, bf16* v, float* db): the partials as above, v holds m*r bf16
    // and db n*r f32 (the caller checked), r a multiple of 8.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(lora_dy_sum)"))?;
    Ok(())
}

fn bf16<'a>(x: &'a CudaStorage, what: &str) -> Result<&'a cudarc::driver::CudaSlice<half::bf16>> {
    match &x.slice {
        CudaSlices::BF16(x) => Ok(x),
        CudaSlices::F32(_) => Err(Error::DType { op: OP, msg: format!("{what} must be bf16") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200_OPTIN: usize = 232_448;
    const A100_OPTIN: usize = 166_912;

    #[test]
    fn regions_fit_the_shared_memory_and_cover_every_tile() {
        for (m, n) in [(1, 8), (100, 72), (4096, 4096), (8192, 11008), (16384, 4096), (300, 264)] {
            for rw in [16, 32] {
                for (sms, optin) in [(132, H200_OPTIN), (108, A100_OPTIN)] {
                    let (a, b) = regions(m, n, rw, sms, optin);
                    assert!(a >= 1 && b >= 1, "{m}x{n} R={rw}: ({a}, {b})");
                    assert!(shared_bytes(rw, b) <= optin, "{m}x{n} R={rw}: {} bytes", shared_bytes(rw, b));
                    assert!(a <= m.div_ceil(TM) && b <= n.div_ceil(TN), "{m}x{n} R={rw}: ({a}, {b}) past the tiles");
                }
            }
        }
    }

    #[test]
    fn the_remembered_choice_is_the_search_result() {
        for (m, n, r) in [(4096, 4096, 16), (8192, 11008, 32), (77, 96, 8)] {
            let want = regions(m, n, r, 132, H200_OPTIN);
            assert_eq!(regions_cached(m, n, r, 132, H200_OPTIN), want);
            assert_eq!(regions_cached(m, n, r, 132, H200_OPTIN), want, "{m}x{n} r={r}, asked again");
        }
    }

    #[test]
    fn large_problems_keep_the_gpu_busy() {
        // The rounds of region steps the blocks run are at least 80% useful tiles.
        for (m, n) in [(4096, 4096), (8192, 11008), (16384, 4096), (4096, 11008)] {
            for rw in [16, 32] {
                let (a, b) = regions(m, n, rw, 132, H200_OPTIN);
                let (tiles, chunks) = (m.div_ceil(TM), n.div_ceil(TN));
                let blocks = tiles.div_ceil(a) * chunks.div_ceil(b);
                let busy = (tiles * chunks) as f64 / (blocks.div_ceil(132) * 132 * a * b) as f64;
                assert!(busy >= 0.8, "{m}x{n} R={rw}: ({a}, {b}) keeps the SMs {busy:.2} busy");
            }
        }
    }
}
