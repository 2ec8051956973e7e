//! Host side of the GEMM engine for GPUs without wgmma (`kernels/gemm_sm80.cu`: mma.sync fed by
//! cp.async): the checks that keep a launch inside what the kernel handles, and the launch.
//!
//! Same problem as the Hopper engine (gemm_sm90.rs): `C = alpha * sum_i op(A_i) op(B_i) + beta * C`
//! over one or two K sources, operands bf16 or f32 (computed as TF32), C [M, N] bf16 or f32, any
//! transposes. It runs on sm_80 and every later GPU (Hopper included, which is how the tests
//! exercise it on an H200). Every operand's contiguous dimension must be a multiple of 16 bytes
//! (8 bf16, 4 f32 elements): the kernel moves 16-byte chunks.

use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use super::gemm::{KSource, check_sources, layout_name, misaligned, nothing_to_do};
use super::storage::{CudaSlices, CudaStorage};
use crate::error::{Error, Result};
use crate::gemm::Gemm;

// Must match kernels/gemm_sm80.cu.
const BM: usize = 128;
const BN: usize = 128;
const BK_BYTES: usize = 64;
const STAGES: usize = 4;
const THREADS: u32 = 256;

/// Shared memory of the kernel: STAGES copies of the A and B tiles, each stored in its operand's
/// memory order with the padding of `Tile` in the kernel (K-major rows + 16 bytes, MN-major rows
/// + 8 elements).
fn smem_bytes(elem: usize, a_mn: bool, b_mn: bool) -> usize {
    let bk = BK_BYTES / elem;
    let tile = |mn: bool, rows: usize| if mn { bk * (rows + 8) } else { rows * (bk + 16 / elem) };
    STAGES * (tile(a_mn, BM) + tile(b_mn, BN)) * elem
}

/// Why the engine cannot take a problem, or None if it can.
pub fn unsupported(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &CudaStorage) -> Option<String> {
    let arch = c.device.arch();
    if !arch.has_mma_sync() {
        return Some(format!(
            "the sm_80 GEMM engine needs mma.sync with bf16/tf32 (sm_80 or later); this device is {arch}"
        ));
    }
    if let Some(why) = check_sources("sm_80 GEMM engine", sources, m, n, c) {
        return Some(why);
    }
    let elems = 16 / sources[0].a.dtype().size_in_bytes();
    sources.iter().enumerate().find_map(|(i, s)| misaligned(g, i, s, m, n, elems))
}

/// `c = alpha * sum_i op(a_i) op(b_i) + beta * c` on the sm_80 engine, with `g`'s transposes and
/// scales.
pub fn gemm(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &mut CudaStorage) -> Result<()> {
    if nothing_to_do(unsupported(g, sources, m, n, c), m, n)? {
        return Ok(());
    }
    let dev = c.device.clone();
    let stream = dev.stream();
    let dtype = sources[0].a.dtype();
    let name = format!("gemm_sm80_{}_{dtype}_{}", layout_name(g.trans_a, g.trans_b), c.dtype());
    let smem = smem_bytes(dtype.size_in_bytes(), g.trans_a, !g.trans_b);
    let f = dev.function_with_shared_memory("gemm_sm80", &name, smem)?;

    // Per source: A, B, their leading dimensions (A [m, k] or [k, m]; B [k, n] or [n, k]) and K.
    // A missing second source is empty (K = 0): never read.
    let mut ptrs = Vec::with_capacity(4);
    let mut guards = Vec::new();
    let mut dims = Vec::with_capacity(2);
    for s in sources {
        for x in [s.a, s.b] {
            let (p, guard) = match &x.slice {
                CudaSlices::BF16(v) => v.device_ptr(stream),
                CudaSlices::F32(v) => v.device_ptr(stream),
            };
            ptrs.push(p);
            guards.push(guard);
        }
        let lda = if g.trans_a { m } else { s.k } as i64;
        let ldb = if g.trans_b { s.k } else { n } as i64;
        dims.push((lda, ldb, s.k as i32));
    }
    if sources.len() == 1 {
        ptrs.extend_from_within(0..2);
        dims.push((dims[0].0, dims[0].1, 0));
    }

    let tiles = m.div_ceil(BM) * n.div_ceil(BN);
    let cfg =
        LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 };
    let (mi, ni) = (m as i32, n as i32);
    let mut launch = stream.launch_builder(&f);
    for (i, (lda, ldb, k)) in dims.iter().enumerate() {
        launch.arg(&ptrs[2 * i]).arg(&ptrs[2 * i + 1]).arg(lda).arg(ldb).arg(k);
    }
    match &mut c.slice {
        CudaSlices::F32(z) => launch.arg(z),
        CudaSlices::BF16(z) => launch.arg(z),
    };
    launch.arg(&mi).arg(&ni).arg(&g.alpha).arg(&g.beta);
    // SAFETY: the arguments match gemm_sm80_<layout>_<in>_<out> (per source: A, B, lda, ldb, K;
    // then C, M, N, alpha, beta); the buffers' sizes were checked by `unsupported`; the shared
    // memory size is the kernel's for this layout and element size.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(gemm_sm80)"))?;
    drop(guards);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernel_tiles() {
        // bf16 nt: two K-major tiles of 128 rows x (32 + 8) elements, 4 stages.
        assert_eq!(smem_bytes(2, false, false), 4 * 2 * 128 * 40 * 2);
        // f32 tn: two MN-major tiles of 16 K rows x (128 + 8) elements.
        assert_eq!(smem_bytes(4, true, true), 4 * 2 * 16 * 136 * 4);
        // Two CTAs fit an A100's 164 KB per SM.
        assert!((0..4).all(|l| smem_bytes(2, l & 1 == 1, l & 2 == 2) <= 80 * 1024));
    }
}
