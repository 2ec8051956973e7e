//! One CholeskyQR pass of the GPU randomized SVD's device path ([`super::rsvd_cuda_device`]) in
//! three kernels of our own (`kernels/rsvd_orth.cu`), for q ≤ [`cholesky_qr_fused_max_q`]: 128
//! ([`FUSED_MAX_Q`]), or less where one block's shared memory cannot hold an f64 q × q matrix.
//!
//! With X the column-major f32 panel [rows, q]:
//!   gram:      G = XᵀX in f64 (exact f32 products, f64 sums; per-chunk partial tiles summed in a
//!              fixed order, so reruns are bit-identical)
//!   chol_inv:  RᵀR = G (upper Cholesky, f64) and W = R⁻¹ (f64, the same elimination applied
//!              to I), one block; R in f64 over G, R in f32 for the core, W; the pass's checks
//!              raise the flag
//!   apply:     X ← X W, f64 accumulation, rounded to f32 once
//!
//! Why X·W, W = R⁻¹ in f64 applied with f64 accumulation, is as good as the triangular solve it
//! replaces (cuBLAS STRSM with R rounded to f32): R from the f64 Gram has relative error
//! ~u₆₄·cond(X)², so the exact X R⁻¹ is orthonormal to ~u₆₄·cond(X)². The f32 solve then adds
//! its own error: R₃₂ = R(1 + O(u₃₂)) and a backward-stable solve, so X R₃₂⁻¹ is orthonormal
//! only to ~u₃₂·cond(X). The product adds W's error, ~u₆₄·cond(R) = u₆₄·cond(X) relative, the
//! f64 sums' ~q·u₆₄·cond(X), and one rounding to f32 (u₃₂): orthonormal to ~u₆₄·cond(X)² + u₃₂,
//! which is no worse than u₃₂·cond(X) for every cond(X) ≤ u₃₂/u₆₄ ≈ 1e9, i.e. for everything
//! the f64 Cholesky accepts (cond(X) ≲ 1e7). Both first passes thus end within ~u₃₂·cond(X) of
//! orthonormal (ours usually much closer); the second pass, whose input its Gram check requires
//! within 1/2 of orthonormal, ends at f32 rounding either way. The explicit inverse's usual
//! weakness (no backward stability for an ill-conditioned R) is what those two bounds already
//! price in, and anything beyond them raises the flag: the host-assisted fallback redoes the
//! layer.
//!
//! Why by q: the fused pass needs the whole q × q factor in one block (registers for the
//! elimination, shared memory to stage it and R⁻¹), so it stops at [`FUSED_MAX_Q`] = 128 and at
//! what the device's shared memory holds; above that the pass keeps cuSOLVER's potrf and
//! cuBLAS's STRSM. The Cholesky and the apply come in instances for widths 32, 64 and 128 (q
//! padded with I up to the next), picked by q alone, so a layer takes the same path on every
//! run. Measured on an H200 (`python3 scripts/bench/orth_pass.py`, a pass at 4096 rows, µs):
//!
//! | q | Cholesky + R⁻¹ | X R⁻¹ | the library pass (DGEMM Gram, potrf, STRSM) |
//! |---:|---:|---:|---:|
//! | 32 | 13 (version 1: 13-19) | 10 | 84 |
//! | 64 | 19 (version 1: 54) | 7 | 82 |
//! | 128 | 67 (version 1: 232) | 16 (version 1: 18) | 163 |
//!
//! Version 1 kept the elimination in shared memory with a barrier a step; version 2 keeps it in
//! registers and runs it by panels of four rows (kernels/rsvd_orth.cu). At q = 128 the panel
//! owner's chain of pivots and the other warps' f64 FMAs still leave it far from the ~10 µs that
//! its arithmetic needs.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::rsvd_cuda_blas::dptr;
use super::rsvd_cuda_device::{FLAG_CHOLESKY, FLAG_GRAM, SECOND_PASS_TOL};
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage};
use crate::error::{Error, Result};

const MODULE: &str = "rsvd_orth";
/// Must match the kernels' GRAM_TILE, GRAM_ROWS, CHOL_ROWS and APPLY_ROWS/APPLY_THREADS.
const GRAM_TILE: usize = 32;
/// Rows rsvd_orth_gram stages a step (its GRAM_ROWS): chunks are multiples of it.
const GRAM_ROWS: usize = 32;
const GRAM_THREADS: u32 = 256;
/// Rows of the Cholesky's working matrix a warp owns: its threads are 32·width/CHOL_ROWS.
const CHOL_ROWS: usize = 4;
const APPLY_ROWS: usize = 64;
const APPLY_THREADS: u32 = 512;
/// At most this many row chunks per Gram tile (the kernel's MAX_CHUNKS = SUM_GROUP ·
/// MAX_GROUPS; the partials and tickets are sized for it), each at least about GRAM_MIN_ROWS
/// rows: a block waits on memory once per 32-row step, and the two levels of sums (groups of
/// SUM_GROUP chunks, then the groups) once each. 4096 rows at q = 32 take 64 chunks of 2 steps.
/// (One level over 16 chunks of 8 steps took 14.9 µs there, ncu.)
const MAX_CHUNKS: usize = 64;
const MAX_GROUPS: usize = 8;
const GRAM_MIN_ROWS: usize = 64;

/// One width the Cholesky and the apply are instantiated for (q ≤ width, padded), with the
/// kernels' names.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Instance {
    width: usize,
    chol: &'static str,
    apply: &'static str,
}

const INSTANCES: [Instance; 3] = [
    Instance { width: 32, chol: "rsvd_orth_chol_inv_32", apply: "rsvd_orth_apply_32" },
    Instance { width: 64, chol: "rsvd_orth_chol_inv_64", apply: "rsvd_orth_apply_64" },
    Instance { width: 128, chol: "rsvd_orth_chol_inv_128", apply: "rsvd_orth_apply_128" },
];

/// The instance for q: the narrowest that holds it (None above 128).
fn instance(q: usize) -> Option<Instance> {
    INSTANCES.into_iter().find(|i| q <= i.width)
}

/// Dynamic shared memory of rsvd_orth_chol_inv_<w>: G/R/E with leading dimension w + 1 (the
/// published panels while it is free), R's diagonal, its reciprocals, the pivots' reciprocals.
fn chol_shared_bytes(w: usize) -> usize {
    (w * (w + 1) + 3 * w) * std::mem::size_of::<f64>()
}

/// Dynamic shared memory of rsvd_orth_apply for q: R⁻¹ in f64, then a chunk of X in f32.
fn apply_shared_bytes(q: usize) -> usize {
    q * q * std::mem::size_of::<f64>() + APPLY_ROWS * q * std::mem::size_of::<f32>()
}

/// The largest q the fused pass takes on any device: the widest rsvd_orth_chol_inv instance
/// (beyond it the working matrix no longer fits one block's registers).
pub const FUSED_MAX_Q: usize = 128;

/// The largest q the fused pass takes on `dev`: `FUSED_MAX_Q`, or less where the factor (or
/// the apply's R⁻¹ and chunk of X) does not fit one block's opt-in shared memory (less 1 KiB for
/// the kernels' static shared variables).
pub fn cholesky_qr_fused_max_q(dev: &CudaDevice) -> usize {
    fused_max_q(dev.shared_memory_per_block_optin())
}

fn fused_max_q(optin: usize) -> usize {
    max_q_for_shared_memory(optin).min(FUSED_MAX_Q)
}

fn max_q_for_shared_memory(optin: usize) -> usize {
    let budget = optin.saturating_sub(1024);
    let fits =
        |q: usize| instance(q).is_some_and(|i| chol_shared_bytes(i.width) <= budget) && apply_shared_bytes(q) <= budget;
    (1..).take_while(|&q| fits(q)).last().unwrap_or(0)
}

/// How rsvd_orth_gram splits `rows` for a q-wide panel on `sms` SMs: (chunk_rows, chunks).
/// Enough blocks to cover the SMs twice, no chunk under GRAM_MIN_ROWS rows unless the panel is,
/// at most MAX_CHUNKS (the partials buffer's size), chunk_rows a multiple of the staged rows.
fn gram_chunks(rows: usize, q: usize, sms: usize) -> (usize, usize) {
    let want = (2 * sms).div_ceil(pairs(q)).min(rows.div_ceil(GRAM_MIN_ROWS));
    let chunk_rows = rows.div_ceil(want.clamp(1, MAX_CHUNKS)).next_multiple_of(GRAM_ROWS);
    (chunk_rows, rows.div_ceil(chunk_rows))
}

/// Upper-triangle tile pairs of a q × q Gram in GRAM_TILE tiles.
fn pairs(q: usize) -> usize {
    let nt = q.div_ceil(GRAM_TILE);
    nt * (nt + 1) / 2
}

/// f64 elements of the partial-Gram buffer a pass of width up to q needs: the chunks' partial
/// tiles, then the groups'.
pub(super) fn partials_len(q: usize) -> usize {
    (MAX_CHUNKS + MAX_GROUPS) * pairs(q) * GRAM_TILE * GRAM_TILE
}

/// u32 ticket counters a pass of width up to q needs (zeroed at allocation; the kernel leaves
/// them zero): one per (pair, group), then one per pair.
pub(super) fn tickets_len(q: usize) -> usize {
    pairs(q) * (MAX_GROUPS + 1)
}

/// Device addresses of one pass's buffers: `gram` f64 q × q (G in, R out), `rinv` f64 q × q,
/// `r32` f32 q × q, `partials` and `tickets` sized by [`partials_len`] / [`tickets_len`] for at
/// least this q, `flag` one u32.
pub(super) struct PassBuffers {
    pub(super) gram: u64,
    pub(super) rinv: u64,
    pub(super) r32: u64,
    pub(super) partials: u64,
    pub(super) tickets: u64,
    pub(super) flag: u64,
}

/// What the pass checks and which flag bits it raises: `gram_bit` (0 for none) unless
/// ‖G − I‖_F < `gram_tol`; `chol_bit` when the Cholesky or the inverse fails.
#[derive(Clone, Copy)]
pub(super) struct PassChecks {
    pub(super) chol_bit: u32,
    pub(super) gram_bit: u32,
    pub(super) gram_tol: f64,
}

/// One CholeskyQR pass on X at `x` (column-major f32 [rows, q], q ≤ [`cholesky_qr_fused_max_q`]),
/// queued on `stream`: X ← X R⁻¹, R in `b.gram` (f64) and `b.r32` (f32), R⁻¹ in `b.rinv`.
pub(super) fn fused_pass(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    x: u64,
    rows: usize,
    q: usize,
    b: &PassBuffers,
    checks: PassChecks,
) -> Result<()> {
    let (rows_i, q_i) = (rows as i32, q as i32);

    let (chunk_rows, chunks) = gram_chunks(rows, q, dev.sm_count());
    let (chunk_rows_i, chunks_i) = (chunk_rows as i32, chunks as i32);
    let f = dev.function(MODULE, "rsvd_orth_gram")?;
    let cfg = LaunchConfig {
        grid_dim: (pairs(q) as u32, chunks as u32, 1),
        block_dim: (GRAM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = stream.launch_builder(&f);
    launch.arg(&x).arg(&rows_i).arg(&q_i).arg(&chunk_rows_i).arg(&chunks_i);
    launch.arg(&b.partials).arg(&b.tickets).arg(&b.gram);
    // SAFETY: rsvd_orth_gram(const float*, int, int, int, int, double*, unsigned*, double*):
    // x holds rows*q f32, partials partials_len(q) f64 and tickets tickets_len(q) zeroed u32
    // (chunks ≤ MAX_CHUNKS, the kernel's too), gram q*q f64; the grid is (pairs, chunks) as the
    // kernel expects.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_orth_gram)"))?;

    let inst =
        instance(q).ok_or_else(|| Error::shape("rsvd_orth_chol_inv", format!("q = {q} is over {FUSED_MAX_Q}")))?;
    let bytes = chol_shared_bytes(inst.width);
    let f = dev.function_with_shared_memory(MODULE, inst.chol, bytes)?;
    let threads = (32 * inst.width / CHOL_ROWS) as u32;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: bytes as u32 };
    let mut launch = stream.launch_builder(&f);
    launch.arg(&b.gram).arg(&q_i).arg(&b.r32).arg(&b.rinv).arg(&b.flag);
    launch.arg(&checks.chol_bit).arg(&checks.gram_bit).arg(&checks.gram_tol);
    // SAFETY: rsvd_orth_chol_inv_<w>(double*, int, float*, double*, unsigned*, unsigned, unsigned,
    // double) with q <= w: gram and rinv q*q f64, r32 q*q f32, flag one u32; one block of
    // 32*w/CHOL_ROWS threads (its launch bounds) with the dynamic shared memory
    // chol_shared_bytes(w), which cholesky_qr_fused_max_q keeps in range.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_orth_chol_inv)"))?;

    // R⁻¹ in f64, then a chunk of X in f32; each block stages R⁻¹ once, so no more blocks than
    // fit on the SMs at once (more rows each on tall panels).
    let bytes = apply_shared_bytes(q);
    let f = dev.function_with_shared_memory(MODULE, inst.apply, bytes)?;
    let per_sm = (dev.shared_memory_per_block_optin() / bytes.max(1)).clamp(1, 4);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(APPLY_ROWS).min(per_sm * dev.sm_count()) as u32, 1, 1),
        block_dim: (APPLY_THREADS, 1, 1),
        shared_mem_bytes: bytes as u32,
    };
    let mut launch = stream.launch_builder(&f);
    launch.arg(&x).arg(&rows_i).arg(&q_i).arg(&b.rinv);
    // SAFETY: rsvd_orth_apply_<w>(float*, int, int, const double*) with q <= w: x rows*q f32,
    // rinv q*q f64, q*q f64 + APPLY_ROWS*q f32 of dynamic shared memory (grid-stride over the
    // row chunks), APPLY_THREADS threads (its launch bounds).
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_orth_apply)"))?;
    Ok(())
}

/// What one [`cholesky_qr_pass_cuda`] produced, downloaded: R (f64 and the f32 rounding the core
/// uses), R⁻¹ (f64), all column-major q × q with zeros below the diagonal, and the flag bits
/// (1: the Gram check failed, 2: the Cholesky or the inverse failed; the device path's bits).
#[derive(Debug, Clone)]
pub struct CholeskyQrPass {
    pub r: Vec<f64>,
    pub r_f32: Vec<f32>,
    pub r_inv: Vec<f64>,
    pub flag: u32,
}

/// One pass of the fused CholeskyQR on a column-major f32 panel X [rows, q] in place, on the
/// device's stream, with the Gram check (‖G − I‖_F < 1/2) when `check_gram`: what the device
/// path runs for q ≤ the device's limit, exposed so tests can hold it against an f64 reference.
pub fn cholesky_qr_pass_cuda(x: &mut CudaStorage, rows: usize, q: usize, check_gram: bool) -> Result<CholeskyQrPass> {
    const OP: &str = "cholesky_qr_pass_cuda";
    let dev = x.device.clone();
    let CudaSlices::F32(xs) = &mut x.slice else {
        return Err(Error::DType { op: OP, msg: "the panel must be f32".into() });
    };
    if rows == 0 || q == 0 || rows.checked_mul(q) != Some(xs.len()) || rows < q {
        return Err(Error::shape(OP, format!("{} elements for a [{rows}, {q}] panel with rows ≥ q ≥ 1", xs.len())));
    }
    let max_q = cholesky_qr_fused_max_q(&dev);
    if q > max_q {
        return Err(Error::shape(OP, format!("q = {q} exceeds this device's fused limit {max_q}")));
    }
    let stream = dev.stream();
    let f64s = |n: usize| stream.alloc_zeros::<f64>(n).map_err(Error::cuda("cuMemAlloc"));
    let (gram, rinv, partials) = (f64s(q * q)?, f64s(q * q)?, f64s(partials_len(q))?);
    let r32: CudaSlice<f32> = stream.alloc_zeros(q * q).map_err(Error::cuda("cuMemAlloc"))?;
    let tickets: CudaSlice<u32> = stream.alloc_zeros(tickets_len(q)).map_err(Error::cuda("cuMemAlloc"))?;
    let flag: CudaSlice<u32> = stream.alloc_zeros(1).map_err(Error::cuda("cuMemAlloc"))?;
    let b = PassBuffers {
        gram: dptr(&gram, &dev),
        rinv: dptr(&rinv, &dev),
        r32: dptr(&r32, &dev),
        partials: dptr(&partials, &dev),
        tickets: dptr(&tickets, &dev),
        flag: dptr(&flag, &dev),
    };
    let gram_bit = if check_gram { FLAG_GRAM } else { 0 };
    let checks = PassChecks { chol_bit: FLAG_CHOLESKY, gram_bit, gram_tol: SECOND_PASS_TOL };
    fused_pass(&dev, stream, dptr(xs, &dev), rows, q, &b, checks)?;
    let down = |e| Error::cuda("cuMemcpyDtoH")(e);
    let pass = CholeskyQrPass {
        r: stream.clone_dtoh(&gram).map_err(down)?,
        r_f32: stream.clone_dtoh(&r32).map_err(down)?,
        r_inv: stream.clone_dtoh(&rinv).map_err(down)?,
        flag: stream.clone_dtoh(&flag).map_err(down)?[0],
    };
    dev.synchronize()?;
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_limit_is_128_or_what_the_opt_in_shared_memory_holds() {
        // H200 / H100 (227 KiB) and A100 (163 KiB) opt-in limits per block hold the 128-wide
        // Cholesky (132 KiB) and the apply's R⁻¹ with a chunk of X (160 KiB); the default 48 KiB
        // holds the 64-wide Cholesky (34 KiB) but the apply only up to q = 63; 32 KiB only the
        // 32-wide Cholesky.
        for (optin, fits) in [(232_448, 128), (166_912, 128), (49_152, 63), (32_768, 32)] {
            let q = max_q_for_shared_memory(optin);
            assert_eq!(q, fits, "opt-in {optin}");
            let need = |q: usize| instance(q).map(|i| chol_shared_bytes(i.width).max(apply_shared_bytes(q)) + 1024);
            assert!(need(q).unwrap() <= optin && need(q + 1).is_none_or(|n| n > optin), "opt-in {optin}");
            assert_eq!(fused_max_q(optin), fits, "opt-in {optin}");
        }
        assert_eq!(FUSED_MAX_Q, 128);
        assert_eq!(fused_max_q(0), 0);
        assert_eq!(
            [1, 32, 33, 64, 65, 128, 129].map(|q| instance(q).map(|i| i.width)),
            [Some(32), Some(32), Some(64), Some(64), Some(128), Some(128), None]
        );
    }

    #[test]
    fn gram_chunks_cover_every_row_once_within_the_partials_buffer() {
        for sms in [1, 108, 132] {
            for q in [1, 9, 32, 33, 100, 128, 168] {
                for rows in [q, 31, 32, 33, 1000, 3001, 4096, 11008, 1 << 20] {
                    let rows = rows.max(q);
                    let (chunk_rows, chunks) = gram_chunks(rows, q, sms);
                    let what = format!("rows {rows}, q {q}, {sms} SMs: {chunks} x {chunk_rows}");
                    assert!((1..=MAX_CHUNKS).contains(&chunks), "{what}");
                    assert_eq!(chunk_rows % GRAM_ROWS, 0, "{what}");
                    assert!(chunks * chunk_rows >= rows && (chunks - 1) * chunk_rows < rows, "{what}");
                    assert!(chunks * pairs(q) * GRAM_TILE * GRAM_TILE <= partials_len(q), "{what}");
                    assert!(chunks <= rows.div_ceil(GRAM_MIN_ROWS), "{what}");
                }
            }
        }
        // The bench's shapes on an H200's 132 SMs: 4096 rows at q = 32 in 64 chunks of 64 rows,
        // 11008 in 58 of 192.
        assert_eq!(gram_chunks(4096, 32, 132), (64, 64));
        assert_eq!(gram_chunks(11008, 32, 132), (192, 58));
    }
}
