//! The q × q core of the GPU randomized SVD's device path ([`super::rsvd_cuda_device`]) for
//! q ≤ [`jacobi_core_max_q`]: V_R and σ² of the upper-triangular f64 R = U_R Σ V_Rᵀ by one-sided
//! Jacobi on the columns of Rᵀ in one thread block (`kernels/rsvd_jacobi.cu`), in place of
//! cuSOLVER's syevd of RᵀR. Same outputs as syevd (V_R's columns, σ² ascending, an info word),
//! so the rest of the core does not change.
//!
//! Why: syevd of a small matrix is a chain of dozens of small launches, some waiting on the
//! host; on the H200 (scripts/bench/core_eigen.py, 2026-11-29) it took 236 µs at q = 32 and
//! 1,543 µs at q = 128 (syevj 393 / 1,269 µs, syevjBatched 131 µs at q = 32, the host's LAPACK
//! with the copies 183 / 1,294 µs), a sixth of a 4096² layer's time at q = 32 and a third at
//! q = 128, and its host waits stall the batch's second lane. One block of ours never waits on
//! the host. And Jacobi on R itself keeps each σ's relative accuracy instead of squaring R's
//! condition number.
//!
//! Why by q: the block holds all of Rᵀ (q·q f64, q rounded up to even) in shared memory and
//! gives each of the q/2 concurrent column pairs 16 threads; it runs for q ≤ [`JACOBI_MAX_Q`]
//! (64: see there for the measurements), or less where the opt-in shared memory is smaller;
//! above it the core keeps syevd.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::rsvd_cuda_blas::dptr;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

const MODULE: &str = "rsvd_jacobi";
/// Must match the kernel's GROUP (threads per column pair) and MAX_Q.
const GROUP: usize = 16;
/// The largest q the core takes the kernel for. The kernel itself takes up to 128 ((q/2)·GROUP
/// threads ≤ 1024), but measured on the H200 (ncu, 2026-11-29) it took 216 µs at q = 32 and
/// 2,780 µs at q = 128, against syevd's 236 and 1,543 µs (wall, host waits included): a tie at
/// q = 32 and a loss at 128 for one layer. (Instantiated by rows a lane, fifth session: 169 µs
/// at q = 32; q = 128 runs the same code as before.) What it wins is the batch: syevd waits on the host
/// inside, which stalls the other lane, and a batch of Llama-2-7B's 224 layers at q = 32 took
/// 286 ms with the kernel against 490 ms with syevd. So q ≤ 64: there syevd takes 906 µs, and
/// the kernel runs 63 rounds a sweep (31 at q = 32, 127 at 128), each dearer than at q = 32 and
/// cheaper than at 128; q = 64 itself has not been timed. Sixth session (call 2): with the
/// limit at 128 (a register version of the kernel, since dropped), the 224-layer batch at r = 32
/// took 893 ms against 1,031 with syevd, but one 4096² layer at q = 128 6.08 ms against 4.48,
/// where issue 5 measures the single layer; syevd there is ~1.9 ms of GPU time (ncu: sytrd
/// 0.41 ms, 254 launches of ormtr 1.26 ms, stedc ~0.25 ms).
pub const JACOBI_MAX_Q: usize = 64;
/// The kernel's own limit: (q/2)·GROUP threads ≤ 1024, Rᵀ in shared memory.
const KERNEL_MAX_Q: usize = 128;
const _: () = assert!(JACOBI_MAX_Q <= KERNEL_MAX_Q && GROUP * KERNEL_MAX_Q / 2 <= 1024);

fn shared_bytes(q: usize) -> usize {
    (q + q % 2) * q * std::mem::size_of::<f64>()
}

/// The largest q the Jacobi core takes on `dev`: `JACOBI_MAX_Q`, or less where Rᵀ does not
/// fit one block's opt-in shared memory (less 2 KiB for the kernel's static shared variables).
pub fn jacobi_core_max_q(dev: &CudaDevice) -> usize {
    max_q_for_shared_memory(dev.shared_memory_per_block_optin())
}

fn max_q_for_shared_memory(optin: usize) -> usize {
    let budget = optin.saturating_sub(2048);
    (1..=JACOBI_MAX_Q.min(KERNEL_MAX_Q)).take_while(|&q| shared_bytes(q) <= budget).last().unwrap_or(0)
}

/// Queues the Jacobi core on `stream`: from R at `rt` (column-major f64 q × q, upper), V_R into
/// `evec` (column-major f64 q × q), σ² ascending into `w` (q f64), 0 or 1 (no convergence, or a
/// non-finite σ²) into `info`.
pub(super) fn jacobi_core(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    rt: u64,
    q: usize,
    evec: u64,
    w: u64,
    info: u64,
) -> Result<()> {
    let bytes = shared_bytes(q);
    // Rows of a column a lane holds, ceil(q / GROUP): the kernel is instantiated for 2, 4 and 8.
    let name = match q.div_ceil(GROUP) {
        0..=2 => "rsvd_jacobi_core_2",
        3..=4 => "rsvd_jacobi_core_4",
        _ => "rsvd_jacobi_core_8",
    };
    let f = dev.function_with_shared_memory(MODULE, name, bytes)?;
    let threads = (q.div_ceil(2) * GROUP).next_multiple_of(32) as u32;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: bytes as u32 };
    let q_i = q as i32;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&rt).arg(&q_i).arg(&evec).arg(&w).arg(&info);
    // SAFETY: rsvd_jacobi_core_<rows>(const double*, int, double*, double*, int*), rows ≥
    // ceil(q / GROUP) (q ≤ KERNEL_MAX_Q = 8·GROUP by the callers): rt and evec hold q*q
    // f64, w q f64, info one int; one block of (q/2 rounded up)·GROUP threads rounded up to a
    // whole warp, ≤ 1024 (q ≤ JACOBI_MAX_Q, checked by the callers), with shared_bytes(q) of
    // dynamic shared memory, which jacobi_core_max_q keeps within the device's limit.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_jacobi_core)"))?;
    Ok(())
}

/// What [`jacobi_core_cuda`] produced, downloaded: V_R (column-major q × q), σ² ascending, info.
#[derive(Debug, Clone)]
pub struct JacobiCore {
    pub v: Vec<f64>,
    pub sigma2: Vec<f64>,
    pub info: i32,
}

/// The Jacobi core of an upper-triangular R (column-major f64 q × q; entries below the diagonal
/// are ignored) on `dev`: what the device path runs for q ≤ [`jacobi_core_max_q`], exposed so
/// tests can hold it against an f64 SVD.
pub fn jacobi_core_cuda(dev: &CudaDevice, r: &[f64], q: usize) -> Result<JacobiCore> {
    const OP: &str = "jacobi_core_cuda";
    if q == 0 || r.len() != q * q {
        return Err(Error::shape(OP, format!("{} elements for a {q} x {q} R with q ≥ 1", r.len())));
    }
    let max_q = jacobi_core_max_q(dev);
    if q > max_q {
        return Err(Error::shape(OP, format!("q = {q} exceeds this device's Jacobi limit {max_q}")));
    }
    let stream = dev.stream();
    let rt: CudaSlice<f64> = stream.clone_htod(r).map_err(Error::cuda("cuMemcpyHtoD"))?;
    let evec: CudaSlice<f64> = stream.alloc_zeros(q * q).map_err(Error::cuda("cuMemAlloc"))?;
    let w: CudaSlice<f64> = stream.alloc_zeros(q).map_err(Error::cuda("cuMemAlloc"))?;
    // Nonzero before the launch, so a kernel that never writes it cannot pass.
    let info: CudaSlice<i32> = stream.clone_htod(&[-1i32]).map_err(Error::cuda("cuMemcpyHtoD"))?;
    jacobi_core(dev, stream, dptr(&rt, dev), q, dptr(&evec, dev), dptr(&w, dev), dptr(&info, dev))?;
    let down = |e| Error::cuda("cuMemcpyDtoH")(e);
    let core = JacobiCore {
        v: stream.clone_dtoh(&evec).map_err(down)?,
        sigma2: stream.clone_dtoh(&w).map_err(down)?,
        info: stream.clone_dtoh(&info).map_err(down)?[0],
    };
    dev.synchronize()?;
    Ok(core)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jacobi_limit_is_64_or_what_the_opt_in_shared_memory_holds() {
        // H200 / H100 (227 KiB), A100 (163 KiB) and the default 48 KiB hold 64; 24 KiB holds 52.
        for (optin, fits) in [(232_448, 64), (166_912, 64), (49_152, 64), (24_576, 52), (0, 0)] {
            assert_eq!(max_q_for_shared_memory(optin), fits, "opt-in {optin}");
        }
        assert!(shared_bytes(52) <= 24_576 - 2048 && shared_bytes(53) > 24_576 - 2048);
        assert_eq!(shared_bytes(127), shared_bytes(128) - 128 * 8);
    }
}
