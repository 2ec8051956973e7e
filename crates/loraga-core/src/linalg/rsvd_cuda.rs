//! The randomized SVD of [`super::rsvd`] on the GPU, in f32: same algorithm (torch.svd_lowrank,
//! HMT Alg. 4.4 + 5.1), same [`RsvdConfig`], same Ω ([`gaussian_test_matrix`], uploaded), same
//! [`TruncatedSvd`] result on the host.
//!
//! With op(A) the tall orientation [p, c] of A (p ≥ c; a wide A is used through its transpose,
//! without copying: cuBLAS reads the row-major buffer with the other transpose flag):
//!   Y = op(A) Ω;  Q = orth(Y)
//!   niter times:  Z = op(A)ᵀ Q;  Q' = orth(Z);  Y = op(A) Q';  Q = orth(Y)
//!   Z = op(A)ᵀ Q = Bᵀ   (B = Qᵀ op(A), the [q, c] core);   Z = Q₂ R  (orth, keeping R)
//!   R = U_R Σ V_Rᵀ      (q × q, f64 on the host, faer)
//!   so B = V_R Σ (Q₂ U_R)ᵀ:  U = Q V_R,  V = Q₂ U_R
//! The core's SVD goes through the triangular factor of Bᵀ rather than the Gram B Bᵀ: the Gram
//! would square B's condition number, and then V = Bᵀ U Σ⁻¹ loses orthogonality in the small
//! directions (error ≈ u·σ₁/σ_j, 6e-5 at σ_q/σ₁ = 1e-3 in f32). Through R both U and V are
//! orthonormal bases times exactly orthogonal f64 factors, and Σ carries the f32 backward error
//! u·‖A‖ of any f32 method. It costs nothing extra: Bᵀ = op(A)ᵀ Q is the same product as B.
//!
//! orth(X) is CholeskyQR repeated until it has run on an X that was already near-orthonormal
//! (CholeskyQR2 in the normal case): G = XᵀX, R = chol(G), X ← X R⁻¹.
//! - G is computed in f64 (X widened exactly by `kernels/rsvd.cu`, then cuBLAS DGEMM), so it is
//!   accurate to ~1e-16 and Cholesky succeeds up to cond(X) ≈ 1e7 (an f32 Gram fails near 3e3).
//! - Cholesky runs on the host in f64 (faer): q ≤ 512, so G is at most 2 MiB; this is one host
//!   sync per pass (see "Syncs" below).
//! - X ← X R⁻¹ is cuBLAS STRSM with R rounded to f32 (and that rounded R is what R accumulates),
//!   which is row-wise backward stable, so ‖X − Q R‖ stays at f32 rounding level.
//! - The pass whose input Gram is within ‖G − I‖_F < 1/2 of the identity is the last: its output
//!   is orthonormal to f32 rounding. A matrix with cond(X)·u₃₂ ≳ 1 needs a third pass (CQR3).
//! - Fallbacks: if Cholesky fails (G not numerically positive definite: cond(X) > ~1e7 or X
//!   rank-deficient), the pass is redone with a shift G + sI, s = 1e-8·trace(G) (shifted
//!   CholeskyQR, Fukaya et al. 2020): X R⁻¹ then has cond ≤ ~1e4 and the next passes finish the
//!   job. If that also fails (X = 0) or the passes do not converge in 6, X goes to the host for
//!   a Householder QR in f64 (faer) and comes back. Both are rare and slow; the normal path is two
//!   DGEMM Grams, two Choleskies and two STRSMs.
//!
//! Precision: the products with A are cuBLAS SGEMM with CUBLAS_COMPUTE_32F, i.e. full fp32 (no
//! TF32; set no NVIDIA_TF32_OVERRIDE), matching torch's default `allow_tf32 = False`.
//! [`GemmMath::Tf32`] opts into CUBLAS_COMPUTE_32F_FAST_TF32 for those ten products only (Grams,
//! solves and the small products stay full precision).
//!
//! Syncs (host waits on the device), per layer: one per CholeskyQR pass (the Gram's download;
//! normally 2 per orth and 2·niter + 2 orths, so 20 at niter = 4), and one for the results'
//! download. The R of the last orth is already on the host, so the q × q SVD adds none. The
//! uploads of R and of the small factors are from pageable memory, which the driver stages
//! before returning (no wait on the device). A batch adds one sync up front for all its NaN/Inf
//! checks (one device reduction per layer, read back together). Between layers there is no
//! other sync, but the GPU idles while the host factors each q × q Gram (µs at q = 32, ms at
//! q = 512); moving Cholesky to the device or overlapping two layers on two streams is the next
//! step if the bench shows that gap.
//!
//! Ω is generated on the host (ChaCha8, so CPU and GPU paths see the same Ω) and cached on the
//! device per (rows, q, seed) by a [`CudaRsvd`] plan, so repeated calls pay for it once.

use std::collections::HashMap;

use cudarc::cublas::sys::{self as blas_sys, cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas_result};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use faer::{Mat, MatRef, Side};

use super::{RsvdConfig, TruncatedSvd, gaussian_test_matrix};
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage};
use crate::error::{Error, Result};

const OP: &str = "svd_lowrank";
/// CholeskyQR passes before falling back to a host Householder QR.
const MAX_PASSES: usize = 6;
/// Relative shift of shifted CholeskyQR: s = SHIFT · trace(XᵀX).
const SHIFT: f64 = 1e-8;

/// How the ten products with A are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmMath {
    /// SGEMM, CUBLAS_COMPUTE_32F: full fp32, as torch with allow_tf32 = False.
    #[default]
    Fp32,
    /// CUBLAS_COMPUTE_32F_FAST_TF32: tensor cores with 10-bit mantissas for the products with A.
    Tf32,
}

/// A row-major f32 matrix on a device: element (i, j) is `storage[i * cols + j]`.
#[derive(Clone, Copy)]
pub struct CudaMatrixRef<'a> {
    storage: &'a CudaStorage,
    rows: usize,
    cols: usize,
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

    fn slice(&self) -> &'a CudaSlice<f32> {
        match &self.storage.slice {
            CudaSlices::F32(s) => s,
            CudaSlices::BF16(_) => unreachable!("checked in CudaMatrixRef::new"),
        }
    }
}

/// [`super::svd_lowrank`] of a device matrix, full fp32. Same config and seed give the same Ω as
/// the CPU path, and bit-identical results on one GPU (cuBLAS's default algorithms are
/// deterministic for a fixed problem on one stream).
pub fn svd_lowrank_cuda(name: &str, a: CudaMatrixRef<'_>, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
    CudaRsvd::new(a.device(), GemmMath::Fp32).run(name, a, cfg)
}

/// [`super::svd_lowrank_batch`] on the GPU: every layer with the same config, results in input
/// order; the first bad layer in input order is the error. Layers of one shape share Ω, as on the
/// CPU.
pub fn svd_lowrank_batch_cuda(items: &[(&str, CudaMatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<TruncatedSvd>> {
    let Some((_, first)) = items.first() else { return Ok(Vec::new()) };
    CudaRsvd::new(first.device(), GemmMath::Fp32).run_batch(items, cfg)
}

/// A reusable GPU randomized SVD: holds the workspace (grown to the largest layer seen) and the
/// uploaded Ω matrices, so that repeated calls (a bench, LoRA-GA over many models) allocate and
/// draw Ω once.
pub struct CudaRsvd {
    dev: CudaDevice,
    math: GemmMath,
    omegas: HashMap<(usize, usize, u64), CudaSlice<f32>>,
    ws: Option<Workspace>,
}

/// Device scratch, sized by [`Need`].
struct Workspace {
    need: Need,
    y: CudaSlice<f32>,
    z: CudaSlice<f32>,
    wide: CudaSlice<f64>,
    gram: CudaSlice<f64>,
    r: CudaSlice<f32>,
    small_u: CudaSlice<f32>,
    small_v: CudaSlice<f32>,
    out_p: CudaSlice<f32>,
    out_c: CudaSlice<f32>,
}

/// Element counts of the workspace buffers.
#[derive(Clone, Copy, Default, PartialEq)]
struct Need {
    pq: usize,
    cq: usize,
    qq: usize,
    qk: usize,
    pk: usize,
    ck: usize,
}

impl Need {
    fn of(m: usize, n: usize, q: usize, k: usize) -> Need {
        let (p, c) = (m.max(n), m.min(n));
        Need { pq: p * q, cq: c * q, qq: q * q, qk: q * k, pk: p * k, ck: c * k }
    }

    fn max(self, o: Need) -> Need {
        Need {
            pq: self.pq.max(o.pq),
            cq: self.cq.max(o.cq),
            qq: self.qq.max(o.qq),
            qk: self.qk.max(o.qk),
            pk: self.pk.max(o.pk),
            ck: self.ck.max(o.ck),
        }
    }

    fn fits_in(self, o: Need) -> bool {
        self.max(o) == o
    }
}

impl CudaRsvd {
    pub fn new(dev: &CudaDevice, math: GemmMath) -> Self {
        CudaRsvd { dev: dev.clone(), math, omegas: HashMap::new(), ws: None }
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// One matrix.
    pub fn run(&mut self, name: &str, a: CudaMatrixRef<'_>, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
        Ok(self.run_batch(&[(name, a)], cfg)?.remove(0))
    }

    /// Many matrices, one after another on the device's stream (see the module docs for the
    /// syncs). All inputs are validated before any work: empty, NaN/Inf (one device reduction
    /// per layer, read back together), q and k against the shape, in that order per layer, and
    /// the first bad layer in input order is the error.
    pub fn run_batch(&mut self, items: &[(&str, CudaMatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<TruncatedSvd>> {
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
        let bad = self.first_nonfinite(items)?;
        let mut plan = Vec::with_capacity(items.len());
        let mut need = Need::default();
        for ((name, a), bad) in items.iter().zip(bad) {
            if a.rows == 0 || a.cols == 0 {
                return Err(Error::shape(OP, format!("layer `{name}` is empty: shape [{}, {}]", a.rows, a.cols)));
            }
            if let Some(idx) = bad {
                let value = self
                    .dev
                    .stream()
                    .clone_dtoh(&a.slice().slice(idx..idx + 1))
                    .map_err(Error::cuda("cuMemcpyDtoH"))?[0];
                return Err(Error::NonFinite {
                    op: OP,
                    name: name.to_string(),
                    row: idx / a.cols,
                    col: idx % a.cols,
                    value,
                });
            }
            let (q, k) = cfg.resolve(name, a.rows, a.cols)?;
            need = need.max(Need::of(a.rows, a.cols, q, k));
            plan.push((q, k));
        }
        self.reserve(need)?;
        items.iter().zip(plan).map(|((name, a), (q, k))| self.factor(name, *a, q, k, cfg)).collect()
    }

    /// For each layer, the flat index of its first NaN/Inf, if any (one sync for the batch).
    fn first_nonfinite(&self, items: &[(&str, CudaMatrixRef<'_>)]) -> Result<Vec<Option<usize>>> {
        if items.is_empty() {
            return Ok(Vec::new());
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
        Ok(flags.into_iter().map(|f| (f != u64::MAX).then_some(f as usize)).collect())
    }

    fn reserve(&mut self, need: Need) -> Result<()> {
        if let Some(ws) = &self.ws
            && need.fits_in(ws.need)
        {
            return Ok(());
        }
        let need = self.ws.as_ref().map_or(need, |ws| ws.need.max(need));
        let s = self.dev.stream();
        let f32s = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(Error::cuda("cuMemAlloc"));
        let f64s = |n: usize| s.alloc_zeros::<f64>(n.max(1)).map_err(Error::cuda("cuMemAlloc"));
        self.ws = None; // free the old buffers first
        self.ws = Some(Workspace {
            need,
            y: f32s(need.pq)?,
            z: f32s(need.cq)?,
            wide: f64s(need.pq)?,
            gram: f64s(need.qq)?,
            r: f32s(need.qq)?,
            small_u: f32s(need.qk)?,
            small_v: f32s(need.qk)?,
            out_p: f32s(need.pk)?,
            out_c: f32s(need.ck)?,
        });
        Ok(())
    }

    /// Ω [c, q] row-major (= column-major [q, c]) for this seed, uploaded once.
    fn omega(&mut self, c: usize, q: usize, seed: u64) -> Result<u64> {
        if !self.omegas.contains_key(&(c, q, seed)) {
            let host = gaussian_test_matrix(c, q, seed);
            let dev = self.dev.stream().clone_htod(&host).map_err(Error::cuda("cuMemcpyHtoD"))?;
            self.omegas.insert((c, q, seed), dev);
        }
        Ok(dptr(&self.omegas[&(c, q, seed)], &self.dev))
    }

    fn factor(
        &mut self,
        name: &str,
        a: CudaMatrixRef<'_>,
        q: usize,
        k: usize,
        cfg: &RsvdConfig,
    ) -> Result<TruncatedSvd> {
        let (m, n) = (a.rows, a.cols);
        let tall = m >= n;
        let (p, c) = if tall { (m, n) } else { (n, m) };
        let omega = self.omega(c, q, cfg.seed)?;
        let dev = self.dev.clone();
        let blas = dev.cublas()?;
        let math = self.math;
        let ws = self.ws.as_mut().expect("reserved by run_batch");
        let a_ptr = dptr(a.slice(), &dev);
        let (y, z) = (dptr(&ws.y, &dev), dptr(&ws.z, &dev));
        // The row-major A [m, n] is the column-major M [n, m] (ld n); op(A) = Mᵀ when A is tall.
        // Range product: Y [p, q] = op(A) W, with W column-major [c, q] (or Ωᵀ stored [q, c]).
        let range = |w: u64, w_transposed: bool| {
            let ldw = if w_transposed { q } else { c };
            sgemm(blas, math, tall, w_transposed, p, q, c, a_ptr, n, w, ldw, y, p)
        };
        // Co-range product: Z [c, q] = op(A)ᵀ Q, Q = Y [p, q].
        let corange = || sgemm(blas, math, !tall, false, c, q, p, a_ptr, n, y, p, z, c);

        let mut orth = Orth { dev: &dev, blas, ws_wide: &mut ws.wide, ws_gram: &mut ws.gram, ws_r: &mut ws.r, q, name };
        range(omega, true)?;
        orth.run(y, p, false)?;
        for _ in 0..cfg.niter {
            corange()?;
            orth.run(z, c, false)?;
            range(z, false)?;
            orth.run(y, p, false)?;
        }
        corange()?;
        let r = orth.run(z, c, true)?.expect("asked for R");

        // Bᵀ = Z = Q₂ R and R = U_R Σ V_Rᵀ give B = V_R Σ (Q₂ U_R)ᵀ.
        let svd = r.thin_svd().map_err(|e| Error::layer(OP, name, format!("SVD of the {q}x{q} core failed: {e:?}")))?;
        let s: Vec<f32> = svd.S().column_vector().iter().take(k).map(|&x| x as f32).collect();
        if s.iter().any(|x| !x.is_finite()) {
            return Err(Error::layer(OP, name, format!("non-finite singular values {s:?} (overflow in f32?)")));
        }
        let stream = dev.stream();
        let upload = |dst: &mut CudaSlice<f32>, f: MatRef<'_, f64>| {
            let host: Vec<f32> = (0..k).flat_map(|j| (0..q).map(move |i| f[(i, j)] as f32)).collect();
            stream.memcpy_htod(&host, &mut dst.slice_mut(..q * k)).map_err(Error::cuda("cuMemcpyHtoD"))
        };
        upload(&mut ws.small_v, svd.V())?; // V_R[:, :k], column-major [q, k]
        upload(&mut ws.small_u, svd.U())?; // U_R[:, :k]
        let (sv, su) = (dptr(&ws.small_v, &dev), dptr(&ws.small_u, &dev));
        let (op_, oc) = (dptr(&ws.out_p, &dev), dptr(&ws.out_c, &dev));
        // out_p: Q V_R ([p, k] col-major = row-major [k, p]) or its transpose ([k, p] col-major =
        // row-major [p, k]); out_c likewise for Q₂ U_R. Tall A: U = Q V_R, V = Q₂ U_R. Wide A
        // (factored as Aᵀ): U = Q₂ U_R, V = Q V_R.
        let fp32 = GemmMath::Fp32;
        if tall {
            sgemm(blas, fp32, true, true, k, p, q, sv, q, y, p, op_, k)?;
            sgemm(blas, fp32, false, false, c, k, q, z, c, su, q, oc, c)?;
        } else {
            sgemm(blas, fp32, false, false, p, k, q, y, p, sv, q, op_, p)?;
            sgemm(blas, fp32, true, true, k, c, q, su, q, z, c, oc, k)?;
        }
        let down = |src: &CudaSlice<f32>, len: usize| {
            stream.clone_dtoh(&src.slice(..len)).map_err(Error::cuda("cuMemcpyDtoH"))
        };
        let (from_p, from_c) = (down(&ws.out_p, p * k)?, down(&ws.out_c, c * k)?);
        let (u, vt) = if tall { (from_p, from_c) } else { (from_c, from_p) };
        TruncatedSvd::from_parts(u, s, vt, m, n)
    }
}

/// Orthonormalisation of a column-major [rows, q] f32 buffer in place (see the module docs).
struct Orth<'a> {
    dev: &'a CudaDevice,
    blas: &'a CudaBlas,
    ws_wide: &'a mut CudaSlice<f64>,
    ws_gram: &'a mut CudaSlice<f64>,
    ws_r: &'a mut CudaSlice<f32>,
    q: usize,
    name: &'a str,
}

impl Orth<'_> {
    /// X ← Q with X_in = Q R; returns R (f64, upper triangular) when `want_r`.
    fn run(&mut self, x: u64, rows: usize, want_r: bool) -> Result<Option<Mat<f64>>> {
        let q = self.q;
        let mut r_total = want_r.then(|| Mat::<f64>::identity(q, q));
        for pass in 0..MAX_PASSES {
            let g = self.gram(x, rows)?;
            if !g.is_all_finite() {
                return Err(Error::layer(
                    OP,
                    self.name,
                    "non-finite Gram matrix in the range finder (overflow in f32?)",
                ));
            }
            let last = pass > 0 && (&g - Mat::<f64>::identity(q, q)).norm_l2() < 0.5;
            let Some(r) = cholesky_upper(&g).or_else(|| shifted(&g).and_then(|gs| cholesky_upper(&gs))) else {
                break;
            };
            let r = &r;
            let r32: Vec<f32> =
                (0..q).flat_map(|j| (0..q).map(move |i| if i <= j { r[(i, j)] as f32 } else { 0.0 })).collect();
            let stream = self.dev.stream();
            stream.memcpy_htod(&r32, &mut self.ws_r.slice_mut(..q * q)).map_err(Error::cuda("cuMemcpyHtoD"))?;
            strsm_right_upper(self.blas, rows, q, dptr(self.ws_r, self.dev), x)?;
            if let Some(rt) = &mut r_total {
                let used = Mat::from_fn(q, q, |i, j| r32[j * q + i] as f64);
                *rt = used * &*rt;
            }
            if last {
                return Ok(r_total);
            }
        }
        self.householder(x, rows, r_total)
    }

    /// XᵀX in f64 on the host: X widened on the device, DGEMM, download (the sync).
    fn gram(&mut self, x: u64, rows: usize) -> Result<Mat<f64>> {
        let (q, dev) = (self.q, self.dev);
        let len = rows * q;
        let f = dev.function("rsvd", "rsvd_f32_to_f64")?;
        let stream = dev.stream();
        let (wide, len64) = (dptr(self.ws_wide, dev), len as i64);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&x).arg(&wide).arg(&len64);
        // SAFETY: rsvd_f32_to_f64(const float*, double*, i64): x holds rows*q f32 and the wide
        // workspace at least as many f64 (both sized by Need::pq or cq ≤ pq).
        unsafe { launch.launch(grid(dev, len)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_f32_to_f64)"))?;
        let gram = dptr(self.ws_gram, dev);
        let (one, zero) = (1.0f64, 0.0f64);
        // SAFETY: wide is column-major [rows, q] (ld rows), gram [q, q] (ld q), both live.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                q as i32,
                q as i32,
                rows as i32,
                (&one as *const f64).cast(),
                wide as *const _,
                cudaDataType::CUDA_R_64F,
                rows as i32,
                wide as *const _,
                cudaDataType::CUDA_R_64F,
                rows as i32,
                (&zero as *const f64).cast(),
                gram as *mut _,
                cudaDataType::CUDA_R_64F,
                q as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_64F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(Error::cublas("cublasGemmEx(f64 Gram)"))?;
        let g = stream.clone_dtoh(&self.ws_gram.slice(..q * q)).map_err(Error::cuda("cuMemcpyDtoH"))?;
        Ok(Mat::from_fn(q, q, |i, j| g[j * q + i]))
    }

    /// The fallback: Householder QR of X in f64 on the host, Q uploaded back into X.
    fn householder(&mut self, x: u64, rows: usize, r_total: Option<Mat<f64>>) -> Result<Option<Mat<f64>>> {
        let (q, stream) = (self.q, self.dev.stream());
        let mut host = vec![0.0f32; rows * q];
        // SAFETY: x is a live device buffer of at least rows*q f32 (a workspace buffer); the copy
        // is synchronous for pageable host memory.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host, x, stream.cu_stream()) }
            .map_err(Error::cuda("cuMemcpyDtoH"))?;
        self.dev.synchronize()?;
        let qr = Mat::from_fn(rows, q, |i, j| host[j * rows + i] as f64).qr();
        let qm = &qr.compute_thin_Q();
        let back: Vec<f32> = (0..q).flat_map(|j| (0..rows).map(move |i| qm[(i, j)] as f32)).collect();
        // SAFETY: as above, same buffer and length.
        unsafe { cudarc::driver::result::memcpy_htod_async(x, &back, stream.cu_stream()) }
            .map_err(Error::cuda("cuMemcpyHtoD"))?;
        self.dev.synchronize()?; // `back` must outlive the copy
        Ok(r_total.map(|rt| qr.thin_R().to_owned() * rt))
    }
}

/// Upper R with RᵀR = G, or None when G is not numerically positive definite.
fn cholesky_upper(g: &Mat<f64>) -> Option<Mat<f64>> {
    let llt = g.llt(Side::Lower).ok()?;
    let r = llt.L().transpose().to_owned();
    (0..r.nrows()).all(|i| r[(i, i)] > 0.0 && r[(i, i)].is_finite()).then_some(r)
}

/// G + sI with s = SHIFT · trace(G), or None for a zero G.
fn shifted(g: &Mat<f64>) -> Option<Mat<f64>> {
    let s = SHIFT * (0..g.nrows()).map(|i| g[(i, i)]).sum::<f64>();
    (s > 0.0).then(|| {
        let mut gs = g.clone();
        (0..g.nrows()).for_each(|i| gs[(i, i)] += s);
        gs
    })
}

fn dptr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    // The guard only records events when event tracking is on; CudaDevice switches it off.
    let (p, _guard) = s.device_ptr(dev.stream());
    p
}

fn grid(dev: &CudaDevice, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, dev.sm_count().max(1) * 8);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Column-major C [m, n] = op(A) op(B) in f32 (beta = 0), cuBLAS's own convention.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    blas: &CudaBlas,
    math: GemmMath,
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
) -> Result<()> {
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let compute = match math {
        GemmMath::Fp32 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        GemmMath::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
    };
    let (one, zero) = (1.0f32, 0.0f32);
    let f32t = cudaDataType::CUDA_R_32F;
    // SAFETY: the callers pass live device buffers whose sizes match the dimensions and leading
    // dimensions; alpha and beta are host f32s as CUBLAS_COMPUTE_32F* requires.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            op(ta),
            op(tb),
            m as i32,
            n as i32,
            k as i32,
            (&one as *const f32).cast(),
            a as *const _,
            f32t,
            lda as i32,
            b as *const _,
            f32t,
            ldb as i32,
            (&zero as *const f32).cast(),
            c as *mut _,
            f32t,
            ldc as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(Error::cublas("cublasGemmEx(f32)"))
}

/// X ← X R⁻¹ for column-major X [rows, q] and upper-triangular R [q, q].
fn strsm_right_upper(blas: &CudaBlas, rows: usize, q: usize, r: u64, x: u64) -> Result<()> {
    let one = 1.0f32;
    // SAFETY: r holds q*q f32 (ld q), x rows*q f32 (ld rows), both live device buffers.
    unsafe {
        blas_sys::cublasStrsm_v2(
            *blas.handle(),
            blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
            blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
            cublasOperation_t::CUBLAS_OP_N,
            blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
            rows as i32,
            q as i32,
            &one,
            r as *const f32,
            q as i32,
            x as *mut f32,
            rows as i32,
        )
    }
    .result()
    .map_err(Error::cublas("cublasStrsm"))
}

/// A bf16 device matrix widened to f32 on the device (LoRA-GA's `grad.float()`).
pub(crate) fn widen_bf16(s: &CudaStorage) -> Result<CudaStorage> {
    let CudaSlices::BF16(src) = &s.slice else {
        return Err(Error::DType { op: OP, msg: format!("widen_bf16 got {}", s.dtype()) });
    };
    let dev = &s.device;
    let n = src.len();
    let mut out = dev.stream().alloc_zeros::<f32>(n).map_err(Error::cuda("cuMemAlloc"))?;
    if n > 0 {
        let f = dev.function("rsvd", "rsvd_bf16_to_f32")?;
        let len = n as i64;
        let mut launch = dev.stream().launch_builder(&f);
        launch.arg(src).arg(&mut out).arg(&len);
        // SAFETY: rsvd_bf16_to_f32(const bf16*, float*, i64) over n elements of each buffer.
        unsafe { launch.launch(grid(dev, n)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_bf16_to_f32)"))?;
    }
    Ok(CudaStorage { slice: CudaSlices::F32(out), device: dev.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_gives_an_upper_factor_and_refuses_indefinite_grams() {
        let x = Mat::from_fn(7, 4, |i, j| ((i * 5 + j * 3) % 7) as f64 - 2.5 + if i == j { 4.0 } else { 0.0 });
        let g = x.transpose() * &x;
        let r = cholesky_upper(&g).expect("positive definite");
        assert!((0..4).all(|j| (j + 1..4).all(|i| r[(i, j)] == 0.0)), "not upper triangular");
        assert!((r.transpose() * &r - &g).norm_l2() <= 1e-12 * g.norm_l2());

        let mut bad = g.clone();
        bad[(3, 3)] = -1.0;
        assert!(cholesky_upper(&bad).is_none());
        assert!(cholesky_upper(&Mat::zeros(3, 3)).is_none());
    }

    #[test]
    fn the_shift_rescues_a_singular_gram_but_not_a_zero_one() {
        // Rank 1: u uᵀ is singular, G + sI is not.
        let g = Mat::from_fn(3, 3, |i, j| ((i + 1) * (j + 1)) as f64);
        let gs = shifted(&g).expect("non-zero trace");
        assert!((gs[(0, 0)] - g[(0, 0)] - SHIFT * 14.0).abs() < 1e-15);
        assert!(cholesky_upper(&g).is_none());
        assert!(cholesky_upper(&gs).is_some());
        assert!(shifted(&Mat::zeros(3, 3)).is_none());
    }

    #[test]
    fn the_householder_fallback_orthonormalises_a_zero_block() {
        // What Orth::householder relies on for X = 0 (a zero gradient): an orthonormal Q, R = 0.
        let qr = Mat::<f64>::zeros(48, 8).qr();
        let q = qr.compute_thin_Q();
        assert!(q.is_all_finite() && qr.thin_R().norm_l2() == 0.0);
        assert!((q.transpose() * &q - Mat::<f64>::identity(8, 8)).norm_l2() < 1e-12);
    }
}
