//! The products with A of the GPU randomized SVD on our own kernel (`kernels/rsvd_skinny.cu`):
//! out = A V or Aᵀ V for the row-major f32 A and a column-major f32 V of q ≤ [`SKINNY_MAX_Q`]
//! columns, to f32 accuracy on the tensor cores (3xTF32: the kernel's header says why and how),
//! split over the reduction dimension with a deterministic
//! sum of the splits (the same shape on the same device gives the same bits, whichever lane runs
//! it). [`super::rsvd_cuda_blas::Products`] uses it for the fp32 products at q ≤ the limit and
//! cuBLAS for the rest (TF32, wider q). Measured against cuBLAS: PERF.md.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::rsvd_cuda_blas::dptr;
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage};
use crate::error::{Error, Result};

const MODULE: &str = "rsvd_skinny";
/// The widest V the kernel takes, its column tile. Wider products stay on cuBLAS: at 64 and 128
/// columns this design measured 0.83-0.96x of cuBLAS's speed at 4096 x 4096 (kernel header).
pub(super) const SKINNY_MAX_Q: usize = 32;
// Must match kernels/rsvd_skinny.cu.
const BM: usize = 128;
const BK: usize = 32;
const STAGES: usize = 4;
/// No split shorter than this many reduction steps: its pipeline would barely fill.
const MIN_SPLIT: usize = 4 * BK;

/// out [m, q] = op(A) V with A row-major: `trans` false: A [m, k], out = A V; true: A [k, m],
/// out = Aᵀ V. V column-major [k, q], out column-major [m, q].
#[derive(Clone, Copy)]
pub(super) struct SkinnyProduct {
    pub(super) a: u64,
    pub(super) trans: bool,
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) v: u64,
    pub(super) q: usize,
    pub(super) out: u64,
}

/// The split buffers: `partials` f32 of [`partials_len`], `tickets` u32 of [`tickets_len`],
/// zeroed at allocation (the kernel leaves them zero).
#[derive(Clone, Copy)]
pub(super) struct SkinnyBuffers {
    pub(super) partials: u64,
    pub(super) tickets: u64,
}

/// Dynamic shared memory of the kernel: STAGES tiles of A (the layout's) and of V, in f32.
fn shared_bytes(trans: bool) -> usize {
    let a_tile = if trans { BK * (BM + 8) } else { BM * (BK + 4) };
    STAGES * (a_tile + SKINNY_MAX_Q * (BK + 4)) * std::mem::size_of::<f32>()
}

/// The widest q whose products take the kernel on `dev`: [`SKINNY_MAX_Q`], or 0 (cuBLAS for
/// all) where its stages do not fit one block's opt-in shared memory (92 KiB; an A100 has 163,
/// an H200 227).
pub(super) fn skinny_max_q(dev: &CudaDevice) -> usize {
    max_q_for_shared_memory(dev.shared_memory_per_block_optin())
}

fn max_q_for_shared_memory(optin: usize) -> usize {
    // Less 1 KiB for the kernel's static shared variables.
    if shared_bytes(true).max(shared_bytes(false)) + 1024 <= optin { SKINNY_MAX_Q } else { 0 }
}

/// Row tiles of out for m rows.
fn tiles(m: usize) -> usize {
    m.div_ceil(BM)
}

/// How the reduction of length k is split for `tiles` row tiles on `sms` SMs: (kchunk, splits),
/// kchunk a multiple of BK. As many blocks as fit the SMs twice (two blocks an SM run at once:
/// more would start a second, mostly idle round; measured at 4096 x 4096: 8 splits 42 us, 9
/// splits 46 us), no split under MIN_SPLIT steps unless k is.
fn splits(tiles: usize, k: usize, sms: usize) -> (usize, usize) {
    let want = ((2 * sms) / tiles).min(k.div_ceil(MIN_SPLIT)).max(1);
    let kchunk = k.div_ceil(want).next_multiple_of(BK).max(BK);
    (kchunk, k.div_ceil(kchunk).max(1))
}

/// f32 elements of the partials buffer for products on `sms` SMs (with more than one split,
/// splits · tiles ≤ 2·sms by [`splits`]; one split needs none).
pub(super) fn partials_len(sms: usize) -> usize {
    2 * sms * BM * SKINNY_MAX_Q
}

/// Ticket counters for products with up to `rows` output rows.
pub(super) fn tickets_len(rows: usize) -> usize {
    tiles(rows)
}

/// Queues `p` on `stream`; p.q ≤ [`skinny_max_q`] (the callers check), `buffers` sized for at
/// least p.m rows.
pub(super) fn skinny_product(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    p: SkinnyProduct,
    buffers: SkinnyBuffers,
) -> Result<()> {
    if p.m == 0 {
        return Ok(());
    }
    // 16-byte copies need A's rows and V's columns to start 16-byte aligned.
    let aligned = p.a.is_multiple_of(16)
        && p.v.is_multiple_of(16)
        && p.k.is_multiple_of(4)
        && (!p.trans || p.m.is_multiple_of(4));
    let name = match (p.trans, aligned) {
        (false, true) => "rsvd_skinny_n",
        (true, true) => "rsvd_skinny_t",
        (false, false) => "rsvd_skinny_n_s",
        (true, false) => "rsvd_skinny_t_s",
    };
    let smem = shared_bytes(p.trans);
    let f = dev.function_with_shared_memory(MODULE, name, smem)?;
    let tiles = tiles(p.m);
    let (kchunk, splits) = if p.k == 0 { (BK, 1) } else { splits(tiles, p.k, dev.sm_count().max(1)) };
    let threads = 256; // KG = 2 groups of 4 warps
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, splits as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (m, k, q, kc) = (p.m as i32, p.k as i32, p.q as i32, kchunk as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&p.a).arg(&m).arg(&k).arg(&p.v).arg(&q).arg(&p.out).arg(&kc);
    launch.arg(&buffers.partials).arg(&buffers.tickets);
    // SAFETY: matches rsvd_skinny_*(const float* a, int m, int k, const float* v, int q,
    // float* out, int kchunk, float* partials, unsigned* tickets): a holds m*k f32, v k*q, out
    // m*q, q ≤ 32 (the callers check); splits*tiles*BM*32 ≤ partials_len(sms) f32 of partials
    // when splits > 1 and tiles zeroed tickets (the caller sizes them); 256 threads as the
    // kernel assumes.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_skinny)"))?;
    Ok(())
}

/// What [`skinny_product_cuda`] produced, downloaded: out (column-major [m, q]) and the ticket
/// counters after the launch (the kernel must leave them zero for the next one).
#[derive(Debug, Clone)]
pub struct SkinnyRun {
    pub out: Vec<f32>,
    pub tickets: Vec<u32>,
}

/// out = A V (`trans` false; A row-major [m, k]) or Aᵀ V (true; A row-major [k, m]) for the
/// column-major V [k, q], on the device's stream: what the GPU randomized SVD runs for its fp32
/// products at q ≤ [`SKINNY_MAX_Q`], exposed so tests can hold it against an f64 reference.
/// `a_offset` starts A that many elements into `a` (to test unaligned rows).
pub fn skinny_product_cuda(
    a: &CudaStorage,
    a_offset: usize,
    trans: bool,
    m: usize,
    k: usize,
    v: &CudaStorage,
    q: usize,
) -> Result<SkinnyRun> {
    const OP: &str = "skinny_product_cuda";
    let dev = a.device.clone();
    let (CudaSlices::F32(a_s), CudaSlices::F32(v_s)) = (&a.slice, &v.slice) else {
        return Err(Error::DType { op: OP, msg: "A and V must be f32".into() });
    };
    if a_offset + m * k > a_s.len() || v_s.len() != k * q {
        return Err(Error::shape(
            OP,
            format!("A holds {}, V {} elements for m {m}, k {k}, q {q}", a_s.len(), v_s.len()),
        ));
    }
    let max_q = skinny_max_q(&dev);
    if q == 0 || q > max_q {
        return Err(Error::shape(OP, format!("q = {q} outside 1..={max_q} on this device")));
    }
    let stream = dev.stream();
    let out: CudaSlice<f32> = stream.alloc_zeros((m * q).max(1)).map_err(Error::cuda("cuMemAlloc"))?;
    let partials: CudaSlice<f32> =
        stream.alloc_zeros(partials_len(dev.sm_count()).max(1)).map_err(Error::cuda("cuMemAlloc"))?;
    let tickets: CudaSlice<u32> = stream.alloc_zeros(tickets_len(m).max(1)).map_err(Error::cuda("cuMemAlloc"))?;
    let product = SkinnyProduct {
        a: dptr(a_s, &dev) + (a_offset * 4) as u64,
        trans,
        m,
        k,
        v: dptr(v_s, &dev),
        q,
        out: dptr(&out, &dev),
    };
    let buffers = SkinnyBuffers { partials: dptr(&partials, &dev), tickets: dptr(&tickets, &dev) };
    skinny_product(&dev, stream, product, buffers)?;
    let down = |e| Error::cuda("cuMemcpyDtoH")(e);
    let mut out = stream.clone_dtoh(&out).map_err(down)?;
    out.truncate(m * q);
    Ok(SkinnyRun { out, tickets: stream.clone_dtoh(&tickets).map_err(down)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_reduction_within_the_partials_buffer() {
        for &sms in &[1usize, 8, 108, 132] {
            for &m in &[1usize, 127, 128, 4096, 11008, 14336] {
                for &k in &[1usize, 31, 33, 4096, 11008] {
                    let t = tiles(m);
                    let (kchunk, s) = splits(t, k, sms);
                    let what = format!("m {m}, k {k}, {sms} SMs: {s} x {kchunk}");
                    assert_eq!(kchunk % BK, 0, "{what}");
                    assert!(s * kchunk >= k && (s - 1) * kchunk < k, "{what}");
                    assert!(s == 1 || s * t * BM * SKINNY_MAX_Q <= partials_len(sms), "{what}");
                    assert!(s <= k.div_ceil(MIN_SPLIT), "{what}");
                }
            }
        }
        // The bench's shapes on an H200: 4096 by 4096 in 8 splits of 512; 11008 rows by 4096 in 3.
        assert_eq!(splits(tiles(4096), 4096, 132), (512, 8));
        assert_eq!(splits(tiles(11008), 4096, 132), (1376, 3));
    }

    #[test]
    fn the_kernel_runs_where_its_stages_fit_the_shared_memory() {
        assert_eq!(shared_bytes(false), 4 * (128 * 36 + 32 * 36) * 4); // 92,160 bytes
        for optin in [99 * 1024, 163 * 1024, 227 * 1024] {
            assert_eq!(max_q_for_shared_memory(optin), SKINNY_MAX_Q, "{optin}");
        }
        assert_eq!(max_q_for_shared_memory(48 * 1024), 0);
    }
}
