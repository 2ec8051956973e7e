//! The device path of the GPU randomized SVD (see [`super::rsvd_cuda`] for the algorithm): one
//! layer queued on one lane's stream with no host round trip, every q × q factorisation done
//! on the device, and the conditions under which the result could be wrong checked there too.
//!
//! orth(X), X column-major f32 [rows, q], is CholeskyQR with an f64 Gram:
//!   pass(check):  G = XᵀX (f64);  RᵀR = G (Cholesky, f64);  X ← X R⁻¹
//!   a basis that U or V is made of (the range finder's last Q, and Q₂ of Z = Bᵀ) is
//!   CholeskyQR2: pass(no check); pass(check: ‖G − I‖_F < 1/2)
//!   the 2·niter bases before it take one pass: they only carry a subspace to the next product
//!   with A, which needs their span, not their orthonormality to f32 rounding. One pass already
//!   leaves X within ~u₃₂·cond(X) of orthonormal (below), a basis with a condition number near
//!   1 for anything the f64 Cholesky accepts; a Cholesky that fails still raises the flag, and a
//!   NaN carries through the products to the final basis's checked pass. At niter = 4 that is
//!   12 passes a layer instead of 20, with the same results to the tests' tolerances.
//! A pass has two implementations, picked by q alone (one rule for every pass of every layer):
//! - q ≤ the lane's `fused_max_q` (128 on an A100 or H200): three kernels of our own
//!   ([`super::rsvd_cuda_orth`]): the f64 Gram straight from the f32 X, Cholesky and the f64
//!   inverse R⁻¹ in one block (with this pass's checks), and X ← X R⁻¹ with f64 accumulation.
//!   On the H200 a pass of these takes 35 / 38 / 102 µs at q = 32 / 64 / 128 on 4096 rows,
//!   cuSOLVER's and cuBLAS's small kernels 84 / 82 / 163 (scripts/bench/orth_pass.py).
//! - larger q: exact widening + DGEMM for G, cuSOLVER potrf, R rounded to f32 with zeros below
//!   the diagonal, cuBLAS STRSM, and the Gram check as a kernel of its own. There the products
//!   with A dominate anyway.
//!
//! The f64 Gram lets Cholesky succeed up to cond(X) ≈ 1e7; the first pass leaves X with
//! orthogonality error ≈ u₃₂·cond(X) at worst (the STRSM; the fused pass's f64 R⁻¹ does
//! better, see [`super::rsvd_cuda_orth`]), and a second pass whose input is within 1/2 of orthonormal
//! (the check) ends at f32 rounding. Anything worse (a Cholesky that fails, a second Gram that is
//! not near I, a non-finite Gram) raises the layer's flag: the host-assisted fallback
//! ([`super::rsvd_cuda_host`]) then redoes the layer with shifts, more passes or Householder QR,
//! which a fixed device schedule cannot branch into.
//!
//! The last orth, of Z = Bᵀ, keeps its two f32 factors: Z = Q₂ R with R = R₂ R₁ (f64, exact
//! products of the f32 factors the solves used). The core R = U_R Σ V_Rᵀ gets V_R and σ²
//! (ascending, reversed) from one-sided Jacobi on Rᵀ for q ≤ the lane's `jacobi_max_q`, 64 on an
//! A100 or H200 ([`super::rsvd_cuda_jacobi`]), and from the f64 eigen-decomposition
//! RᵀR = V_R Σ² V_Rᵀ (cuSOLVER syevd) above that; then U_R = R V_R Σ⁻¹. Squaring R there is
//! harmless in f64 as long as R is well conditioned in f64 terms,
//! which the Cholesky checks above already demand (cond(R) ≲ 1e7, so σ² keeps ~2 digits even for
//! the smallest σ, and the top 2r that LoRA-GA keeps lose nothing); U_R's orthogonality is then
//! checked directly (‖U_RᵀU_R − I‖_max ≤ 1e-7, f64 DGEMM) rather than argued, so a rank-deficient
//! or clustered core falls back instead of returning a U that is not orthonormal.
//!
//! Per layer at niter = 4: 10 products with A (one launch each, ours or SGEMM), 12 passes of 3 launches each (fused; or
//! 5 each above the limit: widen, DGEMM, potrf, round, STRSM, plus the check in a second pass),
//! the core's 6 launches (7 with syevd's) and 2 SGEMMs for U and V.
//! No launch depends on a value read back.

use cudarc::driver::PushKernelArg;

use super::rsvd_cuda::{CudaMatrixRef, GemmMath};
use super::rsvd_cuda_blas::{Precision, Products, dptr, gram_f64, grid, strsm_right_upper, xgemm};
use super::rsvd_cuda_jacobi::jacobi_core;
use super::rsvd_cuda_lane::Lane;
use super::rsvd_cuda_orth::{PassBuffers, PassChecks, fused_pass};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

/// Flag bits (kernels/rsvd_factor.cu and rsvd_orth.cu OR them into the layer's flag); any bit
/// means "redo".
pub(super) const FLAG_GRAM: u32 = 1; // the second pass's Gram not within 1/2 of I (or not finite)
pub(super) const FLAG_CHOLESKY: u32 = 2; // Cholesky (or R⁻¹) failed, or a rounded diagonal of R is not > 0
const FLAG_CORE: u32 = 4; // the core (Jacobi or syevd) failed, or a singular value is not a finite f32
const FLAG_CORE_ORTHO: u32 = 8; // U_R not orthonormal to CORE_ORTHO_TOL

/// How far from orthonormal the f64 U_R may be: far below the 1e-5 that U and V must meet in
/// f32, far above what a well-conditioned core gives (~1e-12).
const CORE_ORTHO_TOL: f64 = 1e-7;
/// The second CholeskyQR pass must start within this Frobenius distance of I.
pub(super) const SECOND_PASS_TOL: f64 = 0.5;

/// Everything one layer's queueing needs: the lane (stream, handles, workspace) it runs on,
/// `flag`, the device address of the layer's u32 flag, zero before the layer runs, and where its
/// results go.
pub(super) struct DeviceLayer<'a> {
    pub(super) dev: &'a CudaDevice,
    pub(super) lane: &'a Lane,
    pub(super) math: GemmMath,
    pub(super) flag: u64,
    pub(super) out: LayerOut,
}

/// Device addresses for a layer's results: `p` [p, k] and `c` [c, k] (the long and short side's
/// factor, laid out as [`super::rsvd_cuda_blas::Products::factors`] writes them), `s` k f32. The
/// lane's workspace for results the host downloads, or buffers of the layer's own.
#[derive(Clone, Copy)]
pub(super) struct LayerOut {
    pub(super) p: u64,
    pub(super) c: u64,
    pub(super) s: u64,
}

impl DeviceLayer<'_> {
    /// Queues the whole randomized SVD of `a` (q columns, k kept, `niter` power iterations, Ω at
    /// `omega`) on the lane's stream: U and Vᵀ land in `out.p` / `out.c` (which is which depends
    /// on the orientation, see [`super::rsvd_cuda`]), S in `out.s`.
    pub(super) fn enqueue(self, a: CudaMatrixRef<'_>, omega: u64, q: usize, k: usize, niter: usize) -> Result<()> {
        let (dev, ws) = (self.dev, &self.lane.ws);
        let products = Products::new(dev, &self.lane.stream, &self.lane.blas, self.math, a, q, ws);
        products.range_finder(omega, niter, |x, rows, last| {
            if last { self.orth2(x, rows, q) } else { self.pass(x, rows, q, false) }
        })?;
        self.orth2(products.z, products.short_side(), q)?; // Z = Q₂ R₂ R₁ with R₁ in ws.r, R₂ in ws.r2
        self.core(q, k)?;
        let (sv, su) = (dptr(&ws.small_v, dev), dptr(&ws.small_u, dev));
        products.factors(k, sv, su, self.out.p, self.out.c)
    }

    /// CholeskyQR2 of the column-major f32 X [rows, q] in place; R₁ in ws.r, R₂ in ws.r2.
    fn orth2(&self, x: u64, rows: usize, q: usize) -> Result<()> {
        self.pass(x, rows, q, false)?;
        self.pass(x, rows, q, true)
    }

    fn pass(&self, x: u64, rows: usize, q: usize, second: bool) -> Result<()> {
        let (dev, lane) = (self.dev, self.lane);
        let ws = &lane.ws;
        let r = dptr(if second { &ws.r2 } else { &ws.r }, dev);
        if q <= lane.fused_max_q {
            let buffers = PassBuffers {
                gram: dptr(&ws.gram, dev),
                rinv: dptr(&ws.rinv, dev),
                r32: r,
                partials: dptr(&ws.partials, dev),
                tickets: dptr(&ws.tickets, dev),
                flag: self.flag,
            };
            // As below: only the second pass checks its Gram.
            let gram_bit = if second { FLAG_GRAM } else { 0 };
            let checks = PassChecks { chol_bit: FLAG_CHOLESKY, gram_bit, gram_tol: SECOND_PASS_TOL };
            return fused_pass(dev, &lane.stream, x, rows, q, &buffers, checks);
        }
        let gram = dptr(&ws.gram, dev);
        gram_f64(dev, &lane.stream, &lane.blas, x, rows, q, dptr(&ws.wide, dev), gram)?;
        // The first pass needs no check of its own: whatever it gets wrong (a non-finite or
        // indefinite Gram, a poor X R⁻¹) shows in the second pass's Gram, which must be near I.
        if second {
            self.gram_check(gram, q, SECOND_PASS_TOL, f64::INFINITY, FLAG_GRAM)?;
        }
        let (work, info) = (dptr(&ws.work, dev), dptr(&ws.info, dev));
        lane.solver.potrf(q, gram, work, ws.work.len(), info)?;
        let f = dev.function("rsvd_factor", "rsvd_chol_to_f32")?;
        let (qi, bit) = (q as i32, FLAG_CHOLESKY);
        let mut launch = lane.stream.launch_builder(&f);
        launch.arg(&gram).arg(&qi).arg(&info).arg(&r).arg(&self.flag).arg(&bit);
        // SAFETY: rsvd_chol_to_f32(const double*, int, const int*, float*, unsigned*, unsigned):
        // gram and r hold q*q elements, info one int, flag one u32.
        unsafe { launch.launch(grid(dev, q * q)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_chol_to_f32)"))?;
        strsm_right_upper(&lane.blas, rows, q, r, x)
    }

    /// Flags `bit` unless ‖G − I‖_F < fro_tol and max|G − I| ≤ max_tol for the n × n f64 G.
    fn gram_check(&self, g: u64, n: usize, fro_tol: f64, max_tol: f64, bit: u32) -> Result<()> {
        let dev = self.dev;
        let f = dev.function("rsvd_factor", "rsvd_gram_check")?;
        let ni = n as i32;
        let mut launch = self.lane.stream.launch_builder(&f);
        launch.arg(&g).arg(&ni).arg(&fro_tol).arg(&max_tol).arg(&self.flag).arg(&bit);
        let one_block =
            cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: rsvd_gram_check(const double*, int, double, double, unsigned*, unsigned) with
        // g holding n*n f64 and flag one u32; the kernel is written for one 256-thread block.
        unsafe { launch.launch(one_block) }.map_err(Error::cuda("cuLaunchKernel(rsvd_gram_check)"))?;
        Ok(())
    }

    /// R = R₂ R₁ → RᵀR = V Σ² Vᵀ → U_R = R V Σ⁻¹, the top k of each (descending) into small_u,
    /// small_v (f32 [q, k]) and s; U_R's orthogonality checked.
    fn core(&self, q: usize, k: usize) -> Result<()> {
        let (dev, lane) = (self.dev, self.lane);
        let (ws, blas, stream) = (&lane.ws, &lane.blas, &lane.stream);
        let (r1, r2) = (dptr(&ws.r, dev), dptr(&ws.r2, dev));
        let (rt, rv, gram) = (dptr(&ws.rt, dev), dptr(&ws.rv, dev), dptr(&ws.gram, dev));
        let (w, core_u) = (dptr(&ws.w, dev), dptr(&ws.core_u, dev));
        let qi = q as i32;

        let f = dev.function("rsvd_factor", "rsvd_tri_product")?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&r2).arg(&r1).arg(&qi).arg(&rt);
        // SAFETY: rsvd_tri_product(const float*, const float*, int, double*): all q*q elements.
        unsafe { launch.launch(grid(dev, q * q)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_tri_product)"))?;

        let info = dptr(&ws.info, dev);
        if q <= lane.jacobi_max_q {
            jacobi_core(dev, stream, rt, q, gram, w, info)?; // gram ← V, w ← σ² ascending
        } else {
            xgemm(blas, Precision::F64, true, false, q, q, q, rt, q, rt, q, gram, q)?; // RᵀR
            let work = dptr(&ws.work, dev);
            lane.solver.syevd(q, gram, w, work, ws.work.len(), info)?; // the same, from RᵀR
        }
        xgemm(blas, Precision::F64, false, false, q, q, q, rt, q, gram, q, rv, q)?; // R V = U_R Σ

        let f = dev.function("rsvd_factor", "rsvd_core_order")?;
        let (ki, bit) = (k as i32, FLAG_CORE);
        let (su, sv, s) = (dptr(&ws.small_u, dev), dptr(&ws.small_v, dev), self.out.s);
        let mut launch = stream.launch_builder(&f);
        launch.arg(&gram).arg(&w).arg(&rv).arg(&qi).arg(&ki).arg(&info);
        launch.arg(&core_u).arg(&su).arg(&sv).arg(&s).arg(&self.flag).arg(&bit);
        // SAFETY: rsvd_core_order(const double* evec, const double* w, const double* rv, int q,
        // int k, const int* info, double* u64, float* u32, float* v32, float* s, unsigned* flag,
        // unsigned bit): evec, rv q*q f64, w q f64, core_u q*k f64, small_u/v q*k f32, s k f32.
        unsafe { launch.launch(grid(dev, q * k)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_core_order)"))?;

        // The eigenvectors have been consumed: the Gram buffer takes U_Rᵀ U_R [k, k].
        xgemm(blas, Precision::F64, true, false, k, k, q, core_u, q, core_u, q, gram, k)?;
        self.gram_check(gram, k, f64::INFINITY, CORE_ORTHO_TOL, FLAG_CORE_ORTHO)
    }
}
