//! The randomized SVD of [`super::rsvd`] on the GPU, in f32: same algorithm (torch.svd_lowrank,
//! HMT Alg. 4.4 + 5.1), same [`RsvdConfig`], same Ω ([`gaussian_test_matrix`], uploaded), same
//! [`TruncatedSvd`] result on the host.
//!
//! With op(A) the tall orientation [p, c] of A (p ≥ c; a wide A is used through its transpose,
//! without copying: the products read the row-major buffer in the other orientation):
//!   Y = op(A) Ω;  Q = orth(Y)
//!   niter times:  Z = op(A)ᵀ Q;  Q' = orth(Z);  Y = op(A) Q';  Q = orth(Y)
//!   Z = op(A)ᵀ Q = Bᵀ   (B = Qᵀ op(A), the [q, c] core);   Z = Q₂ R  (orth, keeping R)
//!   R = U_R Σ V_Rᵀ      (q × q)
//!   so B = V_R Σ (Q₂ U_R)ᵀ:  U = Q V_R,  V = Q₂ U_R
//! The core's SVD goes through the triangular factor of Bᵀ rather than the Gram B Bᵀ of the f32
//! B: that Gram would square B's condition number in f32. R is kept in f64, where squaring it is
//! harmless (see `super::rsvd_cuda_device`).
//!
//! Two paths compute this:
//! - `super::rsvd_cuda_device`, the normal one: CholeskyQR with an f64 Gram, two passes for the
//!   bases U and V are made of, one for the others (its passes in
//!   kernels of our own, `super::rsvd_cuda_orth`, up to the q whose factor fits in shared
//!   memory; cuSOLVER's Cholesky and cuBLAS's triangular solve above that); the core by
//!   one-sided Jacobi on R in one block (or, above q = 64, an f64 eigen-decomposition of RᵀR),
//!   all on the device, no host round trip inside a layer. It cannot branch on the data, so it
//!   checks itself on the device instead (Cholesky info, the second CholeskyQR pass's Gram within
//!   1/2 of I, the core's U_R orthonormal to 1e-7, finite values) and raises a per-layer flag.
//! - `super::rsvd_cuda_host`, the fallback for flagged layers: the same products with the q × q
//!   factorisations on the host in f64 (shifted CholeskyQR, Householder QR, an SVD of R), which
//!   handles rank-deficient, ill-conditioned (cond > ~1e7) and zero inputs, and reports overflow.
//!   [`CudaRsvd::fallbacks`] counts its uses, so a test or bench sees when the fast path gave up.
//!
//! Precision: the products with A are f32-accurate, matching torch's default `allow_tf32 =
//! False`: our own kernels (`super::rsvd_cuda_skinny`: 3xTF32 on the tensor cores, within a
//! few 1e-7 of |A||V|, 4-6x SGEMM's rounding error; mma.sync at q ≤ 32, 1.06-1.33x faster than
//! SGEMM on an H200; wgmma above on Hopper, PERF.md has its ratio), cuBLAS SGEMM with
//! CUBLAS_COMPUTE_32F where neither runs (q > 32 without wgmma, operands not 16-byte aligned;
//! set no NVIDIA_TF32_OVERRIDE).
//! [`GemmMath::Tf32`] opts into cuBLAS's CUBLAS_COMPUTE_32F_FAST_TF32 (one TF32 product, ~1e-3
//! relative) for those ten products only (Grams, solves and the small products stay full
//! precision).
//!
//! Streams and syncs: a plan has two lanes, each a stream with its own cuBLAS and cuSOLVER
//! handles and workspace; layer i of a batch runs on lane i mod 2, so two layers are in flight
//! and one's small q × q launches fill the SMs the other's products leave idle. Lanes start
//! behind an event on the device's stream, so inputs written there are ready. Results come back
//! two ways:
//! - [`CudaRsvd::run_batch`] returns them on the host: before queueing layer i it copies layer
//!   i − 2's U, S, Vᵀ and flag out of that lane's workspace, which waits for that lane only.
//! - [`CudaRsvd::run_batch_device`] leaves U and Vᵀ on the device ([`CudaTruncatedSvd`]): each
//!   layer writes buffers of its own, nothing waits between layers, each lane is queued from a
//!   host thread of its own (cuSOLVER's syevd waits on the host inside), and the host reads the
//!   flags and singular values once at the end.
//!
//! Flagged layers are redone after the batch by the host path on the device's own stream (one
//! sync per CholeskyQR pass each). NaN/Inf in an input need no pass of their own: a non-finite
//! element makes its row of the first product non-finite (0 · inf is NaN too), which every
//! later stage carries and the device checks flag (they test `!(x < tol)`, so NaN fails them);
//! a flagged layer is scanned for its first non-finite element before it is redone, and that is
//! the error. So a finite input pays no scan (20 µs at 4096², 48 µs at 11008x4096 on an H200),
//! and the host does not wait before queueing.
//!
//! Ω is generated on the host (ChaCha8, so CPU and GPU paths see the same Ω) and cached on the
//! device per (rows, q, seed) by a [`CudaRsvd`] plan, so repeated calls pay for it once.
//!
//! This file holds the entry points, the plan and its lanes; the products both paths share are
//! in `super::rsvd_cuda_blas`.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::cusolver::Solver;
use super::rsvd_cuda_blas::{dptr, grid};
use super::rsvd_cuda_device::{DeviceLayer, LayerOut};
use super::rsvd_cuda_host::factor_with_host_help;
use super::rsvd_cuda_jacobi::jacobi_core_max_q;
use super::rsvd_cuda_lane::{Lane, Need, allocate};
use super::rsvd_cuda_orth::cholesky_qr_fused_max_q;
use super::svd::TruncatedSvdOf;
use super::{RsvdConfig, TruncatedSvd, gaussian_test_matrix};
use crate::cpu::CpuStorage;
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage, libs};
use crate::error::{Error, Result};

pub(super) const OP: &str = "svd_lowrank";

/// How the ten products with A are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmMath {
    /// f32-accurate products, as torch with allow_tf32 = False: our 3xTF32 kernels, cuBLAS SGEMM
    /// (CUBLAS_COMPUTE_32F) where they do not run (see the module docs).
    #[default]
    Fp32,
    /// CUBLAS_COMPUTE_32F_FAST_TF32: tensor cores with 10-bit mantissas for the products with A.
    Tf32,
}

/// A row-major f32 matrix on a device: element (i, j) is `storage[i * cols + j]`.
#[derive(Clone, Copy)]
pub struct CudaMatrixRef<'a> {
    storage: &'a CudaStorage,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl<'a> CudaMatrixRef<'a> {
    /// `storage` must be f32 and hold exactly `rows * cols` elements.
    pub fn new(storage: &'a CudaStorage, rows: usize, cols: usize) -> Result<Self> {
        if !matches!(storage.slice, CudaSlices::F32(_)) {
            return Err(Error::DType {
                op: OP,
                msg: format!("the GPU randomized SVD takes f32 matrices, got {}", storage.dtype()),
            });
        }
        if Some(storage.len()) != rows.checked_mul(cols) {
            return Err(Error::shape(
                "CudaMatrixRef::new",
                format!("{} elements do not fill [{rows}, {cols}]", storage.len()),
            ));
        }
        Ok(CudaMatrixRef { storage, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn device(&self) -> &CudaDevice {
        &self.storage.device
    }

    pub(super) fn slice(&self) -> &'a CudaSlice<f32> {
        match &self.storage.slice {
            CudaSlices::F32(s) => s,
            CudaSlices::BF16(_) => unreachable!("checked in CudaMatrixRef::new"),
        }
    }
}

/// [`super::svd_lowrank`] of a device matrix, f32-accurate. Same config and seed give the same Ω
/// as the CPU path, and bit-identical results on one GPU (our kernels sum in a fixed order, and
/// cuBLAS's default algorithms are deterministic for a fixed problem on one stream).
pub fn svd_lowrank_cuda(name: &str, a: CudaMatrixRef<'_>, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
    with_shared_plan(a.device(), |plan| plan.run(name, a, cfg))
}

/// [`svd_lowrank_cuda`] with U and Vᵀ left on the device ([`CudaRsvd::run_batch_device`]).
pub fn svd_lowrank_cuda_device(name: &str, a: CudaMatrixRef<'_>, cfg: &RsvdConfig) -> Result<CudaTruncatedSvd> {
    with_shared_plan(a.device(), |plan| plan.run_device(name, a, cfg))
}

/// A truncated SVD left on the device that computed it: U row-major f32 [m, k] and Vᵀ row-major
/// f32 [k, n] there, S (k values, descending) on the host. What a trainer on the GPU uses (the
/// adapters are made where the model lives), and what torch.svd_lowrank returns: the factors
/// are not copied to the host, which at 11008 x 4096, q = k = 128 would move 7.7 MB.
pub type CudaTruncatedSvd = TruncatedSvdOf<CudaStorage>;

impl CudaTruncatedSvd {
    /// The same factors on the host.
    pub fn to_host(&self) -> Result<TruncatedSvd> {
        let (u, vt) = (self.u().to_cpu()?.to_f32_vec(), self.vt().to_cpu()?.to_f32_vec());
        TruncatedSvd::from_parts(u, self.s().to_vec(), vt, self.rows(), self.cols())
    }
}

/// [`super::svd_lowrank_batch`] on the GPU: every layer with the same config, results in input
/// order; the first bad layer in input order is the error. Layers of one shape share Ω, as on the
/// CPU.
pub fn svd_lowrank_batch_cuda(items: &[(&str, CudaMatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<TruncatedSvd>> {
    let Some((_, first)) = items.first() else { return Ok(Vec::new()) };
    with_shared_plan(first.device(), |plan| plan.run_batch(items, cfg))
}

/// Runs `f` on the process's fp32 plan for `dev`. A plan's lanes (streams, cuBLAS and cuSOLVER
/// handles) take milliseconds to create, which LoRA-GA, calling once per layer, would otherwise
/// pay per layer. The plan keeps its workspace (the largest layer seen) for the life of the
/// process; its Ω cache is emptied past a few entries, so that callers drawing fresh seeds do
/// not grow it without bound. Calls on one device are serialised by the lock.
fn with_shared_plan<T>(dev: &CudaDevice, f: impl FnOnce(&mut CudaRsvd) -> Result<T>) -> Result<T> {
    static PLANS: Mutex<Vec<CudaRsvd>> = Mutex::new(Vec::new());
    const MAX_OMEGAS: usize = 16;
    let mut plans = PLANS.lock().unwrap_or_else(|e| e.into_inner());
    let i = match plans.iter().position(|p| p.dev == *dev) {
        Some(i) => i,
        None => {
            plans.push(CudaRsvd::new(dev, GemmMath::Fp32));
            plans.len() - 1
        }
    };
    let plan = &mut plans[i];
    if plan.omegas.len() > MAX_OMEGAS {
        plan.omegas.clear();
    }
    f(plan)
}

/// Layers in flight at once, each on its own stream ([`Lane`]).
const LANES: usize = 2;

/// A reusable GPU randomized SVD: holds the lanes with their workspaces (grown to the largest
/// layer seen) and the uploaded Ω matrices, so that repeated calls (a bench, LoRA-GA over many
/// models) allocate and draw Ω once.
pub struct CudaRsvd {
    dev: CudaDevice,
    math: GemmMath,
    omegas: HashMap<(usize, usize, u64), CudaSlice<f32>>,
    lanes: Vec<Lane>,
    need: Need,
    fallbacks: usize,
}

/// One layer as its lane queues it.
struct Queued<'a> {
    a: CudaMatrixRef<'a>,
    omega: u64,
    flag: u64,
    out: LayerOut,
    q: usize,
    k: usize,
}

/// What one layer needs, decided before any work.
struct Job {
    q: usize,
    k: usize,
}

/// A layer's results on the host, not yet trusted: `flag` non-zero means redo it.
struct Downloaded {
    u_p: Vec<f32>,
    u_c: Vec<f32>,
    s: Vec<f32>,
    flag: u32,
}

impl CudaRsvd {
    pub fn new(dev: &CudaDevice, math: GemmMath) -> Self {
        CudaRsvd {
            dev: dev.clone(),
            math,
            omegas: HashMap::new(),
            lanes: Vec::new(),
            need: Need::default(),
            fallbacks: 0,
        }
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// How many layers so far the device path flagged and the host-assisted fallback redid.
    pub fn fallbacks(&self) -> usize {
        self.fallbacks
    }

    /// One matrix.
    pub fn run(&mut self, name: &str, a: CudaMatrixRef<'_>, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
        Ok(self.run_batch(&[(name, a)], cfg)?.remove(0))
    }

    /// One matrix, the factors left on the device ([`CudaTruncatedSvd`]).
    pub fn run_device(&mut self, name: &str, a: CudaMatrixRef<'_>, cfg: &RsvdConfig) -> Result<CudaTruncatedSvd> {
        Ok(self.run_batch_device(&[(name, a)], cfg)?.remove(0))
    }

    /// Many matrices, queued one after another on the lanes with the downloads overlapped (see
    /// the module docs). Before any work, every layer's shape, q and k are checked; NaN/Inf
    /// cost no pass of their own: they always raise the layer's flag (a non-finite element
    /// makes its whole row of the first product non-finite, and the checks downstream catch
    /// it), and each flagged layer is scanned before it is redone. Either way the first bad
    /// layer in input order is the error, and within a layer an empty shape comes first, then
    /// NaN/Inf, then q and k.
    pub fn run_batch(&mut self, items: &[(&str, CudaMatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<TruncatedSvd>> {
        let jobs = self.prepare(items, cfg)?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let flags = self.start(items.len())?;
        let mut got: Vec<Option<Downloaded>> = (0..items.len()).map(|_| None).collect();
        for i in 0..items.len() {
            // Lane i mod LANES last ran layer i - LANES: copy that one out first (waiting for
            // this lane only), then queue layer i behind it into the same workspace.
            if i >= LANES {
                got[i - LANES] = Some(self.download(i - LANES, items[i - LANES].1, &jobs[i - LANES], &flags)?);
            }
            let ws = &self.lanes[i % LANES].ws;
            let out =
                LayerOut { p: dptr(&ws.out_p, &self.dev), c: dptr(&ws.out_c, &self.dev), s: dptr(&ws.s, &self.dev) };
            self.queue(i, &self.layer(i, items[i].1, &jobs[i], cfg, &flags, out), cfg.niter)?;
        }
        for j in items.len().saturating_sub(LANES)..items.len() {
            got[j] = Some(self.download(j, items[j].1, &jobs[j], &flags)?);
        }

        let mut out = Vec::with_capacity(items.len());
        for ((&(name, a), job), d) in items.iter().zip(&jobs).zip(got) {
            let d = d.expect("every layer was downloaded");
            if d.flag != 0 {
                out.push(self.redo(name, a, job, cfg)?);
            } else {
                let (u, vt) = if a.rows >= a.cols { (d.u_p, d.u_c) } else { (d.u_c, d.u_p) };
                out.push(TruncatedSvd::from_parts(u, d.s, vt, a.rows, a.cols)?);
            }
        }
        Ok(out)
    }

    /// [`Self::run_batch`] with the factors left on the device: each layer writes U and Vᵀ into
    /// buffers of its own, so nothing waits between layers, and the host reads back only the
    /// flags and singular values, once, at the end. Bit-identical to [`Self::run_batch`]'s
    /// factors (the same launches; only the destination differs). A flagged layer's
    /// host-assisted result is uploaded.
    pub fn run_batch_device(
        &mut self,
        items: &[(&str, CudaMatrixRef<'_>)],
        cfg: &RsvdConfig,
    ) -> Result<Vec<CudaTruncatedSvd>> {
        let jobs = self.prepare(items, cfg)?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // Allocated on the device's stream, which the lanes wait for ([`Self::start`]) and
        // which owns the results after.
        let stream = self.dev.stream().clone();
        // SAFETY: uninitialised f32 buffers, each written whole before it is read: U and Vᵀ by
        // the layer's last two GEMMs (or by the upload of a redone layer), S by its core.
        let alloc = |n: usize| unsafe { stream.alloc::<f32>(n) }.map_err(Error::cuda("cuMemAlloc"));
        let mut factors = Vec::with_capacity(items.len());
        for (&(_, a), job) in items.iter().zip(&jobs) {
            factors.push((alloc(a.rows * job.k)?, alloc(job.k * a.cols)?));
        }
        let s_at: Vec<usize> = jobs.iter().scan(0, |at, j| Some(std::mem::replace(at, *at + j.k))).collect();
        let s_all = alloc(jobs.iter().map(|j| j.k).sum())?;
        let flags = self.start(items.len())?;
        let mut layers = Vec::with_capacity(items.len());
        for (i, ((&(_, a), job), (u, vt))) in items.iter().zip(&jobs).zip(&factors).enumerate() {
            let (u, vt) = (dptr(u, &self.dev), dptr(vt, &self.dev));
            let (p, c) = if a.rows >= a.cols { (u, vt) } else { (vt, u) };
            let s = dptr(&s_all, &self.dev) + (s_at[i] * std::mem::size_of::<f32>()) as u64;
            layers.push(self.layer(i, a, job, cfg, &flags, LayerOut { p, c, s }));
        }
        self.queue_from_lane_threads(&layers, cfg.niter)?;
        for lane in &self.lanes {
            let done = lane.stream.record_event(None).map_err(Error::cuda("cuEventRecord"))?;
            stream.wait(&done).map_err(Error::cuda("cuStreamWaitEvent"))?;
        }
        let flags = stream.clone_dtoh(&flags).map_err(Error::cuda("cuMemcpyDtoH"))?;
        let s_all = stream.clone_dtoh(&s_all).map_err(Error::cuda("cuMemcpyDtoH"))?;

        let mut out = Vec::with_capacity(items.len());
        for (i, ((&(name, a), job), (u, vt))) in items.iter().zip(&jobs).zip(factors).enumerate() {
            let storage = |slice| CudaStorage { slice: CudaSlices::F32(slice), device: self.dev.clone() };
            let (mut u, mut vt) = (storage(u), storage(vt));
            let s = if flags[i] != 0 {
                let host = self.redo(name, a, job, cfg)?;
                u.copy_from_cpu(&CpuStorage::F32(host.u().to_vec()))?;
                vt.copy_from_cpu(&CpuStorage::F32(host.vt().to_vec()))?;
                host.s().to_vec()
            } else {
                s_all[s_at[i]..s_at[i] + job.k].to_vec()
            };
            out.push(CudaTruncatedSvd::from_shaped(u, s, vt, a.rows, a.cols));
        }
        Ok(out)
    }

    /// Checks every layer (see [`Self::run_batch`]), reserves the workspace for all of them and
    /// uploads their Ω.
    fn prepare(&mut self, items: &[(&str, CudaMatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<Job>> {
        let jobs = self.validate(items, cfg)?;
        for (&(_, a), job) in items.iter().zip(&jobs) {
            self.omega(a.cols.min(a.rows), job.q, cfg.seed)?;
        }
        Ok(jobs)
    }

    /// The zeroed per-layer flags; the lanes start once the device's stream has them, the
    /// inputs and Ω.
    fn start(&self, layers: usize) -> Result<CudaSlice<u32>> {
        let flags = self.dev.stream().alloc_zeros::<u32>(layers).map_err(Error::cuda("cuMemAlloc"))?;
        let ready = self.dev.stream().record_event(None).map_err(Error::cuda("cuEventRecord"))?;
        for lane in &self.lanes {
            lane.stream.wait(&ready).map_err(Error::cuda("cuStreamWaitEvent"))?;
        }
        Ok(flags)
    }

    /// Layer i's queueing: its input, Ω, flag and results.
    fn layer<'a>(
        &self,
        i: usize,
        a: CudaMatrixRef<'a>,
        job: &Job,
        cfg: &RsvdConfig,
        flags: &CudaSlice<u32>,
        out: LayerOut,
    ) -> Queued<'a> {
        let omega = dptr(&self.omegas[&(a.cols.min(a.rows), job.q, cfg.seed)], &self.dev);
        let flag = dptr(flags, &self.dev) + (i * std::mem::size_of::<u32>()) as u64;
        Queued { a, omega, flag, out, q: job.q, k: job.k }
    }

    /// Queues layer i on lane i mod LANES, from this thread.
    fn queue(&self, i: usize, layer: &Queued<'_>, niter: usize) -> Result<()> {
        let lane = &self.lanes[i % LANES];
        let device = DeviceLayer { dev: &self.dev, lane, math: self.math, flag: layer.flag, out: layer.out };
        device.enqueue(layer.a, layer.omega, layer.q, layer.k, niter)
    }

    /// Queues every layer on its lane, each lane from a host thread of its own: cuSOLVER's syevd
    /// (the core above q = 64) waits on the host inside, and from one thread that wait also held
    /// back the other lane's queueing, so the lanes seldom overlapped. A lane's launches, and so
    /// its results, are the same whichever thread queues them. One layer is queued from this
    /// thread: starting threads costs ~0.1 ms, a tenth of a small layer (measured on the H200:
    /// 4096², q = 32 in 1.110 ms with them, 0.990 without).
    fn queue_from_lane_threads(&self, layers: &[Queued<'_>], niter: usize) -> Result<()> {
        if layers.len() < 2 {
            return layers.iter().enumerate().try_for_each(|(i, layer)| self.queue(i, layer, niter));
        }
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..LANES)
                .map(|l| {
                    scope.spawn(move || -> Result<()> {
                        // cuBLAS and cuSOLVER calls run in the calling thread's current context.
                        self.dev.context().bind_to_thread().map_err(Error::cuda("cuCtxSetCurrent"))?;
                        for (i, layer) in layers.iter().enumerate().skip(l).step_by(LANES) {
                            self.queue(i, layer, niter)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            // Join every thread, then report the first lane's error.
            let done: Vec<Result<()>> = threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(Error::InvalidArgument(format!("{OP}: a lane's host thread panicked"))))
                })
                .collect();
            done.into_iter().collect()
        })
    }

    /// A layer the device path flagged: the NaN/Inf error if it has one, else the host-assisted
    /// fallback's result. Called once every lane is idle, so lane 0's workspace is free for the
    /// fallback, which runs on the device's own stream.
    fn redo(&mut self, name: &str, a: CudaMatrixRef<'_>, job: &Job, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
        if let Some(e) = self.nonfinite_error(&[(name, a)])? {
            return Err(e);
        }
        self.fallbacks += 1;
        let omega = dptr(&self.omegas[&(a.cols.min(a.rows), job.q, cfg.seed)], &self.dev);
        let ws = &mut self.lanes[0].ws;
        factor_with_host_help(&self.dev, self.math, ws, name, a, omega, job.q, job.k, cfg.niter)
    }

    /// Checks every layer (see [`Self::run_batch`]) and reserves the workspace for all of them.
    /// The host-side checks run first; only when one fails are the layers before it (and that
    /// layer, unless empty) scanned for NaN/Inf, so that the error is the first in input order.
    fn validate(&mut self, items: &[(&str, CudaMatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<Job>> {
        for (name, a) in items {
            if *a.device() != self.dev {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    lhs: format!("{:?} (layer `{name}`)", a.device()),
                    rhs: format!("{:?}", self.dev),
                });
            }
            for (what, v) in [("rows", a.rows), ("cols", a.cols)] {
                if v > i32::MAX as usize / 2 {
                    return Err(Error::layer(OP, name, format!("{what} = {v} exceeds the cuBLAS 32-bit limit")));
                }
            }
        }
        let mut jobs = Vec::with_capacity(items.len());
        let mut need = Need::default();
        for (j, (name, a)) in items.iter().enumerate() {
            let empty = a.rows == 0 || a.cols == 0;
            let job = if empty {
                Err(Error::shape(OP, format!("layer `{name}` is empty: shape [{}, {}]", a.rows, a.cols)))
            } else {
                cfg.resolve(name, a.rows, a.cols)
            };
            match job {
                Ok((q, k)) => {
                    need = need.max(Need::of(a.rows, a.cols, q, k));
                    jobs.push(Job { q, k });
                }
                Err(e) => {
                    let scanned = if empty { j } else { j + 1 };
                    return Err(self.nonfinite_error(&items[..scanned])?.unwrap_or(e));
                }
            }
        }
        if !items.is_empty() {
            let qs: Vec<usize> = jobs.iter().map(|j| j.q).collect();
            self.reserve(need, &qs)?;
        }
        Ok(jobs)
    }

    /// Copies layer j's U, V (both orientations' buffers), S and flag to the host from its lane,
    /// on the lane's stream: the wait covers that lane only.
    fn download(&self, j: usize, a: CudaMatrixRef<'_>, job: &Job, flags: &CudaSlice<u32>) -> Result<Downloaded> {
        let lane = &self.lanes[j % LANES];
        let (ws, stream) = (&lane.ws, &lane.stream);
        let (p, c) = (a.rows.max(a.cols), a.rows.min(a.cols));
        let down = |src: &CudaSlice<f32>, len: usize| {
            stream.clone_dtoh(&src.slice(..len)).map_err(Error::cuda("cuMemcpyDtoH"))
        };
        let u_p = down(&ws.out_p, p * job.k)?;
        let u_c = down(&ws.out_c, c * job.k)?;
        let s = down(&ws.s, job.k)?;
        let flag = stream.clone_dtoh(&flags.slice(j..j + 1)).map_err(Error::cuda("cuMemcpyDtoH"))?[0];
        stream.synchronize().map_err(Error::cuda("cuStreamSynchronize"))?;
        Ok(Downloaded { u_p, u_c, s, flag })
    }

    /// The error for the first NaN/Inf (least index) of the first layer that has one, if any:
    /// one device reduction per layer, read back together (one sync).
    fn nonfinite_error(&self, items: &[(&str, CudaMatrixRef<'_>)]) -> Result<Option<Error>> {
        if items.is_empty() {
            return Ok(None);
        }
        let stream = self.dev.stream();
        let mut flags = stream.clone_htod(&vec![u64::MAX; items.len()]).map_err(Error::cuda("cuMemcpyHtoD"))?;
        let f = self.dev.function("rsvd", "rsvd_first_nonfinite_f32")?;
        for (i, (_, a)) in items.iter().enumerate() {
            let n = a.rows * a.cols;
            if n == 0 {
                continue;
            }
            let len = n as i64;
            let mut flag = flags.slice_mut(i..i + 1);
            let mut launch = stream.launch_builder(&f);
            launch.arg(a.slice()).arg(&len).arg(&mut flag);
            // SAFETY: matches rsvd_first_nonfinite_f32(const float*, i64, unsigned long long*);
            // the input holds n elements, the flag one.
            unsafe { launch.launch(grid(&self.dev, n)) }
                .map_err(Error::cuda("cuLaunchKernel(rsvd_first_nonfinite)"))?;
        }
        let flags = stream.clone_dtoh(&flags).map_err(Error::cuda("cuMemcpyDtoH"))?;
        let Some((i, idx)) = flags.iter().enumerate().find(|&(_, &f)| f != u64::MAX) else { return Ok(None) };
        let (name, a) = items[i];
        let idx = *idx as usize;
        let value = stream.clone_dtoh(&a.slice().slice(idx..idx + 1)).map_err(Error::cuda("cuMemcpyDtoH"))?[0];
        Ok(Some(Error::NonFinite { op: OP, name: name.to_string(), row: idx / a.cols, col: idx % a.cols, value }))
    }

    /// Creates the lanes on first use, grows their workspaces to `need` (never shrinks them),
    /// and cuSOLVER's workspace to what each q in `qs` needs.
    fn reserve(&mut self, need: Need, qs: &[usize]) -> Result<()> {
        let need = self.need.max(need);
        if self.lanes.is_empty() {
            libs::ensure_cublas()?;
            let (fused_max_q, jacobi_max_q) = (cholesky_qr_fused_max_q(&self.dev), jacobi_core_max_q(&self.dev));
            for _ in 0..LANES {
                let stream = self.dev.stream().fork().map_err(Error::cuda("cuStreamCreate"))?;
                let blas = CudaBlas::new(stream.clone()).map_err(Error::cublas("cublasCreate"))?;
                let solver = Solver::new(&stream)?;
                let ws = allocate(&self.dev, &stream, need, fused_max_q)?;
                self.lanes.push(Lane { stream, blas, solver, ws, fused_max_q, jacobi_max_q });
            }
        } else if need != self.need {
            for lane in &mut self.lanes {
                lane.ws = allocate(&self.dev, &lane.stream, need, lane.fused_max_q)?;
            }
        }
        self.need = need;
        for lane in &mut self.lanes {
            let ws = &mut lane.ws;
            let (gram, w) = (dptr(&ws.gram, &self.dev), dptr(&ws.w, &self.dev));
            let mut work = 0;
            for &q in qs {
                work = work.max(lane.solver.potrf_work(q, gram)?).max(lane.solver.syevd_work(q, gram, w)?);
            }
            if work > ws.work.len() {
                ws.work = lane.stream.alloc_zeros::<f64>(work).map_err(Error::cuda("cuMemAlloc"))?;
            }
        }
        Ok(())
    }

    /// Ω [c, q] for this seed (the CPU path's values), uploaded once in the column-major layout
    /// the products take.
    fn omega(&mut self, c: usize, q: usize, seed: u64) -> Result<u64> {
        if !self.omegas.contains_key(&(c, q, seed)) {
            let row_major = gaussian_test_matrix(c, q, seed);
            let host: Vec<f32> = (0..c * q).map(|e| row_major[(e % c) * q + e / c]).collect();
            let dev = self.dev.stream().clone_htod(&host).map_err(Error::cuda("cuMemcpyHtoD"))?;
            self.omegas.insert((c, q, seed), dev);
        }
        Ok(dptr(&self.omegas[&(c, q, seed)], &self.dev))
    }
}
