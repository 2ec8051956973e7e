//! The products with A of the GPU randomized SVD on our own kernels: out = A V or Aᵀ V for the
//! row-major f32 A and a column-major f32 V of q columns, to f32 accuracy on the tensor cores
//! (3xTF32: the kernels' headers say why and how), split over the reduction dimension with a
//! deterministic sum of the splits (the same shape on the same device gives the same bits,
//! whichever lane runs it). Two kernels ([`Kernel`]): q ≤ [`SKINNY_MAX_Q`] on mma.sync
//! (`kernels/rsvd_skinny.cu`, any sm_80 or later), wider q on Hopper's warpgroup MMAs
//! (`kernels/rsvd_skinny_wg.cu`, sm_90a, 16-byte aligned operands). [`super::rsvd_cuda_blas::Products`]
//! uses them for the fp32 products and cuBLAS for the rest (TF32, wider q elsewhere, unaligned
//! operands at wide q). Measured against cuBLAS: PERF.md.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::rsvd_cuda::GemmMath;
use super::rsvd_cuda_blas::{Precision, dptr, xgemm};
use crate::cuda::tma::{Elem, tensor_map};
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage, libs};
use crate::error::{Error, Result};

const MODULE: &str = "rsvd_skinny";
const WG_MODULE: &str = "rsvd_skinny_wg";
/// The widest V the mma.sync kernel takes, its column tile. Wider products take the wgmma kernel
/// where there is one: at 64 and 128 columns the mma.sync design measured 0.83-0.96x of cuBLAS's
/// speed at 4096 x 4096 (its header).
pub(super) const SKINNY_MAX_Q: usize = 32;
// Must match kernels/rsvd_skinny.cu and rsvd_skinny_wg.cu (WG_BM, WG_BK): both kernels' blocks
// take 128 rows of out and stage 32 reduction steps at a time.
const BM: usize = 128;
const BK: usize = 32;
const STAGES: usize = 4;
/// No split shorter than this many reduction steps: its pipeline would barely fill.
const MIN_SPLIT: usize = 4 * BK;
// Must match kernels/rsvd_skinny_wg.cu: the stages of a block's ring, its threads (two consumer
// warpgroups and a producer warp), and the widest column tile (a narrower q takes the 64-column
// one).
const WG_STAGES: usize = 4;
const WG_THREADS: u32 = 2 * 128 + 32;
const WG_NQ: usize = 128;

/// Which of our kernels runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// `rsvd_skinny.cu`: q ≤ [`SKINNY_MAX_Q`], mma.sync.
    Mma,
    /// `rsvd_skinny_wg.cu`: q > [`SKINNY_MAX_Q`], wgmma (sm_90a); 16-byte aligned operands only.
    Wgmma,
}

/// The kernel that takes fp32 products of q columns on `dev`, or None (cuBLAS for all).
pub(super) fn kernel_for(dev: &CudaDevice, q: usize) -> Option<Kernel> {
    choose(q, dev.arch().has_wgmma(), dev.shared_memory_per_block_optin())
}

fn choose(q: usize, wgmma: bool, optin: usize) -> Option<Kernel> {
    // Less 1 KiB for the kernels' static shared variables.
    let fits = |bytes: usize| bytes + 1024 <= optin;
    if q == 0 {
        None
    } else if q <= SKINNY_MAX_Q {
        fits(shared_bytes(true).max(shared_bytes(false))).then_some(Kernel::Mma)
    } else {
        (wgmma && fits(wg_shared_bytes(WG_NQ))).then_some(Kernel::Wgmma)
    }
}

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

/// The kernels' scratch as addresses, for a launch: `partials` f32 of [`partials_len`], `tickets`
/// u32 of [`tickets_len`] (zero: the kernels leave them so), `split` f32 of [`split_len`] for the
/// wgmma kernel's split V.
#[derive(Clone, Copy)]
pub(super) struct SkinnyBuffers {
    partials: u64,
    tickets: u64,
    split: u64,
}

/// The kernels' scratch on the device, for products of up to `rows` output rows, a reduction of
/// up to `k` steps and q columns: what a lane's workspace and [`SkinnyProducts`] each hold.
pub(super) struct SkinnyScratch {
    partials: CudaSlice<f32>,
    tickets: CudaSlice<u32>,
    split: CudaSlice<f32>,
}

impl SkinnyScratch {
    pub(super) fn new(dev: &CudaDevice, stream: &Arc<CudaStream>, rows: usize, k: usize, q: usize) -> Result<Self> {
        let f32s = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(Error::cuda("cuMemAlloc"));
        Ok(SkinnyScratch {
            partials: f32s(partials_len(dev.sm_count(), q))?,
            tickets: stream.alloc_zeros(tickets_len(rows, q).max(1)).map_err(Error::cuda("cuMemAlloc"))?,
            split: f32s(split_len(dev, k, q))?,
        })
    }

    pub(super) fn buffers(&self, dev: &CudaDevice) -> SkinnyBuffers {
        SkinnyBuffers {
            partials: dptr(&self.partials, dev),
            tickets: dptr(&self.tickets, dev),
            split: dptr(&self.split, dev),
        }
    }
}

/// Dynamic shared memory of the kernel: STAGES tiles of A (the layout's) and of V, in f32.
fn shared_bytes(trans: bool) -> usize {
    let a_tile = if trans { BK * (BM + 8) } else { BM * (BK + 4) };
    STAGES * (a_tile + SKINNY_MAX_Q * (BK + 4)) * std::mem::size_of::<f32>()
}

/// Dynamic shared memory of the wgmma kernel with column tile `nq`: STAGES stages of V's hi and
/// lo tiles (nq rows of 128 bytes each) and A's tile (BM rows of 128 bytes), the ring's two
/// mbarriers a stage, and 1 KiB to align the first stage (the swizzle needs it).
fn wg_shared_bytes(nq: usize) -> usize {
    WG_STAGES * (2 * nq + BM) * BK * 4 + 2 * WG_STAGES * 8 + 1024
}

/// The wgmma kernel's column tile for q columns: 64 when q fits, else 128.
fn wg_nq(q: usize) -> usize {
    if q <= 64 { 64 } else { WG_NQ }
}

/// Row tiles of out for m rows (both kernels' tiles are BM rows).
fn tiles(m: usize) -> usize {
    m.div_ceil(BM)
}

/// Column tiles of out for q columns: one for the mma.sync kernel, q / 64 or q / 128 for wgmma.
fn column_tiles(q: usize) -> usize {
    if q <= SKINNY_MAX_Q { 1 } else { q.div_ceil(wg_nq(q)) }
}

/// How the mma.sync kernel splits the reduction of length k for `tiles` row tiles on `sms` SMs:
/// (kchunk, splits), kchunk a multiple of BK. As many blocks as fit the SMs twice (two blocks an
/// SM run at once: more would start a second, mostly idle round; measured at 4096 x 4096: 8
/// splits 42 us, 9 splits 46 us), no split under MIN_SPLIT steps unless k is.
fn splits(tiles: usize, k: usize, sms: usize) -> (usize, usize) {
    let want = ((2 * sms) / tiles).min(k.div_ceil(MIN_SPLIT)).max(1);
    chunked(k, want)
}

/// How the wgmma kernel splits it for `units` output tiles: one block an SM runs at a time (its
/// ring fills the shared memory), so the splits minimise the rounds of blocks per unit of work,
/// ⌈units·s / sms⌉ / s, the fewest splits among equals (each adds a partial tile to write and
/// sum); at most 2·sms blocks, no split under MIN_SPLIT steps unless k is.
fn wg_splits(units: usize, k: usize, sms: usize) -> (usize, usize) {
    let most = ((2 * sms) / units).min(k.div_ceil(MIN_SPLIT)).max(1);
    let rounds = |s: usize| (units * s).div_ceil(sms);
    // s is better than b when rounds(s) / s < rounds(b) / b.
    let want = (2..=most).fold(1, |b, s| if rounds(s) * b < rounds(b) * s { s } else { b });
    chunked(k, want)
}

/// (kchunk, splits) for `want` splits of k: kchunk a multiple of BK.
fn chunked(k: usize, want: usize) -> (usize, usize) {
    let kchunk = k.div_ceil(want).next_multiple_of(BK).max(BK);
    (kchunk, k.div_ceil(kchunk).max(1))
}

/// f32 elements of the partials buffer for products of up to q columns on `sms` SMs (with more
/// than one split, blocks ≤ 2·sms by [`splits`] and [`wg_splits`], each a tile of up to
/// 128 x 128; one split needs none).
fn partials_len(sms: usize, q: usize) -> usize {
    2 * sms * BM * if q <= SKINNY_MAX_Q { SKINNY_MAX_Q } else { WG_NQ }
}

/// Ticket counters for products with up to `rows` output rows and q columns.
fn tickets_len(rows: usize, q: usize) -> usize {
    tiles(rows) * column_tiles(q)
}

/// f32 elements of the wgmma kernel's split V for products with a reduction of up to k and q
/// columns on `dev` (none where that kernel does not run).
fn split_len(dev: &CudaDevice, k: usize, q: usize) -> usize {
    if kernel_for(dev, q) == Some(Kernel::Wgmma) { 2 * k * q } else { 0 }
}

/// Queues `p` on `stream` and returns true, or returns false where no kernel of ours takes it
/// (q past the device's kernels, or an unaligned operand at q > [`SKINNY_MAX_Q`]): the caller
/// runs cuBLAS. `buffers` sized for at least p.m rows, p.k reduction steps and p.q columns.
pub(super) fn skinny_product(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    p: SkinnyProduct,
    buffers: SkinnyBuffers,
) -> Result<bool> {
    let Some(kernel) = kernel_for(dev, p.q) else { return Ok(false) };
    // 16-byte copies need A's rows and V's columns to start 16-byte aligned.
    let aligned = p.a.is_multiple_of(16)
        && p.v.is_multiple_of(16)
        && p.k.is_multiple_of(4)
        && (!p.trans || p.m.is_multiple_of(4));
    match kernel {
        _ if p.m == 0 => Ok(true),
        Kernel::Mma => mma_product(dev, stream, p, buffers, aligned).map(|_| true),
        Kernel::Wgmma if aligned => wg_product(dev, stream, p, buffers).map(|_| true),
        Kernel::Wgmma => Ok(false),
    }
}

fn mma_product(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    p: SkinnyProduct,
    buffers: SkinnyBuffers,
    aligned: bool,
) -> Result<()> {
    let name = match (p.trans, aligned) {
        (false, true) => "rsvd_skinny_n",
        (true, true) => "rsvd_skinny_t",
        (false, false) => "rsvd_skinny_n_s",
        (true, false) => "rsvd_skinny_t_s",
    };
    let tiles = tiles(p.m);
    let (kchunk, splits) = if p.k == 0 { (BK, 1) } else { splits(tiles, p.k, dev.sm_count().max(1)) };
    let smem = shared_bytes(p.trans);
    let f = dev.function_with_shared_memory(MODULE, name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, splits as u32, 1),
        block_dim: (256, 1, 1), // KG = 2 groups of 4 warps
        shared_mem_bytes: smem as u32,
    };
    let (m, k, q, kc) = (p.m as i32, p.k as i32, p.q as i32, kchunk as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&p.a).arg(&m).arg(&k).arg(&p.v).arg(&q).arg(&p.out).arg(&kc);
    launch.arg(&buffers.partials).arg(&buffers.tickets);
    // SAFETY: matches rsvd_skinny_*(const float* a, int m, int k, const float* v, int q,
    // float* out, int kchunk, float* partials, unsigned* tickets): a holds m*k f32, v k*q, out
    // m*q, q ≤ 32 (kernel_for); splits*tiles*BM*32 ≤ partials_len f32 of partials when splits > 1
    // and tiles zeroed tickets (the caller sizes them); 256 threads as the kernel assumes.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_skinny)"))?;
    Ok(())
}

/// The wgmma kernel: V split into its TF32 halves (into `buffers.split`), then the product.
fn wg_product(dev: &CudaDevice, stream: &Arc<CudaStream>, p: SkinnyProduct, buffers: SkinnyBuffers) -> Result<()> {
    let n = (p.k * p.q) as i64;
    if n > 0 {
        let f = dev.function(WG_MODULE, "rsvd_skinny_wg_split")?;
        let blocks = (p.k * p.q).div_ceil(256).min(8 * dev.sm_count().max(1)) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&p.v).arg(&n).arg(&buffers.split);
        // SAFETY: matches rsvd_skinny_wg_split(const float* v, i64 n, float* vs): v holds n = k*q
        // f32, split 2n (split_len, sized by the caller).
        unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_skinny_wg_split)"))?;
    }
    let nq = wg_nq(p.q);
    let name = match (p.trans, nq) {
        (false, 64) => "rsvd_skinny_wg_n_64",
        (true, 64) => "rsvd_skinny_wg_t_64",
        (false, _) => "rsvd_skinny_wg_n_128",
        (true, _) => "rsvd_skinny_wg_t_128",
    };
    let (tiles, ctiles) = (tiles(p.m), column_tiles(p.q));
    let (kchunk, splits) = wg_splits(tiles * ctiles, p.k, dev.sm_count().max(1));
    let smem = wg_shared_bytes(nq);
    let f = dev.function_with_shared_memory(WG_MODULE, name, smem)?;
    // A's map: n reads [m, k] in boxes of BM rows; t reads [k, m] in boxes of 32 rows of k (x 32
    // of m: four a tile). V's split as [2q rows, k] in boxes of nq rows.
    let ta = if p.trans {
        tensor_map(p.a, p.k, p.m, p.m, 32, Elem::F32)?
    } else {
        tensor_map(p.a, p.m, p.k, p.k, BM, Elem::F32)?
    };
    let tv = tensor_map(buffers.split, 2 * p.q, p.k, p.k, nq, Elem::F32)?;
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, splits as u32, ctiles as u32),
        block_dim: (WG_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (m, k, q, kc) = (p.m as i32, p.k as i32, p.q as i32, kchunk as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&ta).arg(&tv).arg(&m).arg(&k).arg(&q).arg(&p.out).arg(&kc);
    launch.arg(&buffers.partials).arg(&buffers.tickets);
    // SAFETY: matches rsvd_skinny_wg_<n|t>_<nq>(TmaDesc ta, TmaDesc tv, int m, int k, int q,
    // float* out, int kchunk, float* partials, unsigned* tickets): the maps describe A (m*k f32,
    // 16-byte aligned with 16-byte rows: skinny_product checks) and V's split (2*k*q f32, just
    // written), out holds m*q; kchunk a multiple of BK (chunked); with splits > 1, blocks ·
    // 128 · nq ≤ partials_len f32 of partials and tiles · column tiles zeroed tickets (the caller
    // sizes them from the same functions); WG_THREADS threads as the kernel assumes, with
    // wg_shared_bytes(nq) of dynamic shared memory, which kernel_for checked fits.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rsvd_skinny_wg)"))?;
    Ok(())
}

/// One product shape with its buffers allocated once, to run our kernel and cuBLAS's SGEMM
/// (CUBLAS_COMPUTE_32F, what the SVD takes where no kernel of ours does) on the same operands:
/// out [m, q] = A V (`trans` false; A row-major [m, k]) or Aᵀ V (true; A row-major [k, m]) for
/// the column-major V [k, q], on the device's stream. For the tests (against an f64 reference;
/// `a_offset` starts A that many elements into its buffer, to test unaligned rows) and the
/// benches (against cuBLAS).
pub struct SkinnyProducts {
    dev: CudaDevice,
    blas: CudaBlas,
    trans: bool,
    m: usize,
    k: usize,
    q: usize,
    out: CudaSlice<f32>,
    scratch: SkinnyScratch,
}

impl SkinnyProducts {
    pub fn new(dev: &CudaDevice, trans: bool, m: usize, k: usize, q: usize) -> Result<Self> {
        libs::ensure_cublas()?;
        let stream = dev.stream();
        let blas = CudaBlas::new(stream.clone()).map_err(Error::cublas("cublasCreate"))?;
        let out = stream.alloc_zeros::<f32>((m * q).max(1)).map_err(Error::cuda("cuMemAlloc"))?;
        let scratch = SkinnyScratch::new(dev, stream, m, k, q)?;
        Ok(SkinnyProducts { dev: dev.clone(), blas, trans, m, k, q, out, scratch })
    }

    /// Which of our kernels takes this product ("mma" or "wgmma"), or None (cuBLAS).
    pub fn kernel(&self) -> Option<&'static str> {
        kernel_for(&self.dev, self.q).map(|k| match k {
            Kernel::Mma => "mma",
            Kernel::Wgmma => "wgmma",
        })
    }

    /// The f32 operands' device addresses, A starting `a_offset` elements into `a`.
    fn operands(&self, op: &'static str, a: &CudaStorage, a_offset: usize, v: &CudaStorage) -> Result<(u64, u64)> {
        let (CudaSlices::F32(a_s), CudaSlices::F32(v_s)) = (&a.slice, &v.slice) else {
            return Err(Error::DType { op, msg: "A and V must be f32".into() });
        };
        let (m, k, q) = (self.m, self.k, self.q);
        if a_offset + m * k > a_s.len() || v_s.len() != k * q {
            let msg = format!("A holds {}, V {} elements for m {m}, k {k}, q {q}", a_s.len(), v_s.len());
            return Err(Error::shape(op, msg));
        }
        Ok((dptr(a_s, &self.dev) + (a_offset * 4) as u64, dptr(v_s, &self.dev)))
    }

    /// Queues our kernel's product; an error where none takes it (then the SVD runs cuBLAS).
    pub fn ours(&mut self, a: &CudaStorage, a_offset: usize, v: &CudaStorage) -> Result<()> {
        const OP: &str = "SkinnyProducts::ours";
        let q = self.q;
        if self.kernel().is_none() {
            return Err(Error::shape(OP, format!("no kernel of ours takes q = {q} on this device")));
        }
        let (a, v) = self.operands(OP, a, a_offset, v)?;
        let dev = &self.dev;
        let product = SkinnyProduct { a, trans: self.trans, m: self.m, k: self.k, v, q, out: dptr(&self.out, dev) };
        if !skinny_product(dev, dev.stream(), product, self.scratch.buffers(dev))? {
            let (m, k) = (self.m, self.k);
            let msg =
                format!("the wgmma kernel (q = {q}) takes 16-byte aligned rows only: offset {a_offset}, m {m}, k {k}");
            return Err(Error::shape(OP, msg));
        }
        Ok(())
    }

    /// Queues cuBLAS's SGEMM for the same product.
    pub fn cublas(&mut self, a: &CudaStorage, a_offset: usize, v: &CudaStorage) -> Result<()> {
        let (a, v) = self.operands("SkinnyProducts::cublas", a, a_offset, v)?;
        let (m, k, q, out) = (self.m, self.k, self.q, dptr(&self.out, &self.dev));
        // Column-major: A row-major [m, k] is [k, m] (op T); A row-major [k, m] is [m, k] (op N).
        let lda = if self.trans { m } else { k };
        xgemm(&self.blas, Precision::F32(GemmMath::Fp32), !self.trans, false, m, q, k, a, lda, v, k, out, m)
    }

    /// The last product's out (column-major [m, q]) and the ticket counters (the kernels leave
    /// them zero for the next launch).
    pub fn download(&self) -> Result<SkinnyRun> {
        let stream = self.dev.stream();
        let down = |e| Error::cuda("cuMemcpyDtoH")(e);
        let mut out = stream.clone_dtoh(&self.out).map_err(down)?;
        out.truncate(self.m * self.q);
        let tickets = stream.clone_dtoh(&self.scratch.tickets).map_err(down)?;
        Ok(SkinnyRun { out, tickets })
    }
}

/// A product downloaded ([`SkinnyProducts::download`]): out (column-major [m, q]) and the ticket
/// counters after the launch (the kernel must leave them zero for the next one).
#[derive(Debug, Clone)]
pub struct SkinnyRun {
    pub out: Vec<f32>,
    pub tickets: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_reduction_within_the_partials_buffer() {
        for &sms in &[1usize, 8, 108, 132] {
            for &m in &[1usize, 127, 128, 4096, 11008, 14336] {
                for &k in &[1usize, 31, 33, 4096, 11008] {
                    for q in [32, 33, 128, 512] {
                        let (t, ct) = (tiles(m), column_tiles(q));
                        let (kchunk, s) = if q <= SKINNY_MAX_Q { splits(t, k, sms) } else { wg_splits(t * ct, k, sms) };
                        let what = format!("m {m}, k {k}, q {q}, {sms} SMs: {s} x {kchunk}");
                        assert_eq!(kchunk % BK, 0, "{what}");
                        assert!(s * kchunk >= k && (s - 1) * kchunk < k, "{what}");
                        let tile = BM * if q <= SKINNY_MAX_Q { SKINNY_MAX_Q } else { wg_nq(q) };
                        assert!(s == 1 || s * t * ct * tile <= partials_len(sms, q), "{what}");
                        assert!(s <= k.div_ceil(MIN_SPLIT), "{what}");
                        assert!(ct * wg_nq(q) >= q || q <= SKINNY_MAX_Q, "{what}");
                    }
                }
            }
        }
        // The bench's shapes on an H200. mma.sync: 4096 by 4096 in 8 splits of 512; 11008 rows
        // by 4096 in 3. wgmma (one block an SM): 32 row tiles in 4 splits (one round of 128
        // blocks), 86 in 3 (two rounds of 258, against one of 86 unsplit: 2/3 of the time a
        // unit), 32 tiles x 4 column tiles (q = 512) unsplit.
        assert_eq!(splits(tiles(4096), 4096, 132), (512, 8));
        assert_eq!(splits(tiles(11008), 4096, 132), (1376, 3));
        assert_eq!(wg_splits(tiles(4096), 4096, 132), (1024, 4));
        assert_eq!(wg_splits(tiles(4096), 11008, 132), (2752, 4));
        assert_eq!(wg_splits(tiles(11008), 4096, 132), (1376, 3));
        assert_eq!(wg_splits(tiles(4096) * column_tiles(512), 4096, 132), (4096, 1));
    }

    #[test]
    fn each_kernel_runs_where_its_stages_fit_the_shared_memory() {
        assert_eq!(shared_bytes(false), 4 * (128 * 36 + 32 * 36) * 4); // 92,160 bytes
        // wgmma, 128 columns: 4 x (2 x 16 KiB of V + 16 KiB of A) + 64 + 1 KiB = 197,696 bytes.
        assert_eq!(wg_shared_bytes(128), 197_696);
        for optin in [99 * 1024, 163 * 1024, 227 * 1024] {
            assert_eq!(choose(32, true, optin), Some(Kernel::Mma), "{optin}");
        }
        assert_eq!(choose(32, false, 48 * 1024), None);
        // Wider q: wgmma on Hopper's 227 KiB, cuBLAS without wgmma or with less shared memory.
        for q in [33, 64, 128, 512] {
            assert_eq!(choose(q, true, 227 * 1024), Some(Kernel::Wgmma), "{q}");
            assert_eq!(choose(q, false, 227 * 1024), None, "{q}");
            assert_eq!(choose(q, true, 163 * 1024), None, "{q}");
        }
        assert_eq!(choose(0, true, 227 * 1024), None);
        assert_eq!((wg_nq(33), wg_nq(64), wg_nq(65), wg_nq(512)), (64, 64, 128, 128));
        assert_eq!((column_tiles(32), column_tiles(64), column_tiles(128), column_tiles(129)), (1, 1, 1, 2));
    }
}
