//! The host-assisted path of the GPU randomized SVD: the fallback for the layers the device path
//! ([`super::rsvd_cuda_device`]) flags as untrustworthy (a Cholesky that failed, a CholeskyQR that
//! needs a third pass, a core whose U is not orthonormal, non-finite values), and so the reference
//! for what those layers must still produce. Same products with A on the device; the q × q work on
//! the host in f64 (faer), one sync per CholeskyQR pass:
//!
//! orth(X) is CholeskyQR repeated until it has run on an X that was already near-orthonormal:
//! G = XᵀX (f64 DGEMM of the exactly widened X), R = chol(G) on the host, X ← X R⁻¹ (STRSM, R
//! rounded to f32). The pass whose input Gram is within ‖G − I‖_F < 1/2 of the identity is the
//! last. If Cholesky fails (cond(X) > ~1e7 or X rank-deficient) the pass is redone with a shift
//! G + sI, s = 1e-8·trace(G) (shifted CholeskyQR, Fukaya et al. 2020); if that also fails (X = 0)
//! or the passes do not converge in 6, X goes to the host for a Householder QR in f64 and comes
//! back. The core R = U_R Σ V_Rᵀ is an f64 SVD on the host (faer), which stays exact for
//! rank-deficient R, where the device path's eigen-decomposition cannot.

use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;
use faer::{Mat, MatRef, Side};

use super::TruncatedSvd;
use super::rsvd_cuda::{CudaMatrixRef, GemmMath, OP};
use super::rsvd_cuda_blas::{Products, dptr, gram_f64, strsm_right_upper};
use super::rsvd_cuda_lane::Workspace;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

/// CholeskyQR passes before falling back to a host Householder QR.
const MAX_PASSES: usize = 6;
/// Relative shift of shifted CholeskyQR: s = SHIFT · trace(XᵀX).
const SHIFT: f64 = 1e-8;

/// The randomized SVD of one layer with host help (see the module docs), Ω at `omega`.
#[allow(clippy::too_many_arguments)]
pub(super) fn factor_with_host_help(
    dev: &CudaDevice,
    math: GemmMath,
    ws: &mut Workspace,
    name: &str,
    a: CudaMatrixRef<'_>,
    omega: u64,
    q: usize,
    k: usize,
    niter: usize,
) -> Result<TruncatedSvd> {
    let (m, n) = (a.rows, a.cols);
    let blas = dev.cublas()?;
    let products = Products::new(dev, dev.stream(), blas, math, a, q, ws);
    let (p, c) = (products.long_side(), products.short_side());
    let mut orth = Orth { dev, blas, ws_wide: &mut ws.wide, ws_gram: &mut ws.gram, ws_r: &mut ws.r, q, name };
    products.range_finder(omega, niter, |x, rows, _last| orth.run(x, rows, false).map(drop))?;
    let r = orth.run(products.z, c, true)?.expect("asked for R");

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
    let (sv, su) = (dptr(&ws.small_v, dev), dptr(&ws.small_u, dev));
    products.factors(k, sv, su, dptr(&ws.out_p, dev), dptr(&ws.out_c, dev))?;
    let down =
        |src: &CudaSlice<f32>, len: usize| stream.clone_dtoh(&src.slice(..len)).map_err(Error::cuda("cuMemcpyDtoH"));
    let (from_p, from_c) = (down(&ws.out_p, p * k)?, down(&ws.out_c, c * k)?);
    let (u, vt) = if m >= n { (from_p, from_c) } else { (from_c, from_p) };
    TruncatedSvd::from_parts(u, s, vt, m, n)
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

    /// XᵀX in f64 on the host: computed on the device ([`gram_f64`]), then downloaded (the sync).
    fn gram(&mut self, x: u64, rows: usize) -> Result<Mat<f64>> {
        let (q, dev) = (self.q, self.dev);
        gram_f64(dev, dev.stream(), self.blas, x, rows, q, dptr(self.ws_wide, dev), dptr(self.ws_gram, dev))?;
        let g = dev.stream().clone_dtoh(&self.ws_gram.slice(..q * q)).map_err(Error::cuda("cuMemcpyDtoH"))?;
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
