//! The result every SVD here returns, the measures tests judge it by, and the exact SVD that
//! serves as the reference. Signs of singular vectors are arbitrary, so results are compared
//! through these measures and singular values, never element by element.

use faer::{Mat, MatRef};

use super::MatrixRef;
use crate::error::{Error, Result};

/// A rank-k factorisation A ≈ U diag(S) Vᵀ of an [m, n] matrix, in f32 and row-major:
/// U is [m, k] with orthonormal columns, S has k values in descending order (on the host), Vᵀ
/// is [k, n] with orthonormal rows. U and Vᵀ are held in `M`: host vectors ([`TruncatedSvd`]) or
/// device buffers ([`super::CudaTruncatedSvd`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TruncatedSvdOf<M> {
    u: M,
    s: Vec<f32>,
    vt: M,
    m: usize,
    n: usize,
}

/// A truncated SVD on the host.
pub type TruncatedSvd = TruncatedSvdOf<Vec<f32>>;

impl<M> TruncatedSvdOf<M> {
    /// From factors whose shapes the caller guarantees: U [m, k], Vᵀ [k, n] with k = s.len(),
    /// S descending.
    pub(super) fn from_shaped(u: M, s: Vec<f32>, vt: M, m: usize, n: usize) -> Self {
        TruncatedSvdOf { u, s, vt, m, n }
    }

    /// U, row-major [m, k].
    pub fn u(&self) -> &M {
        &self.u
    }

    /// The singular values, descending.
    pub fn s(&self) -> &[f32] {
        &self.s
    }

    /// Vᵀ, row-major [k, n].
    pub fn vt(&self) -> &M {
        &self.vt
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.s.len()
    }
}

impl TruncatedSvd {
    /// The first `k` components of U [m, q], S [q], V [n, q] (f64, faer's layout); the caller
    /// guarantees k ≤ q and that `s` is sorted descending.
    pub(crate) fn from_factors(u: MatRef<'_, f64>, s: &[f64], v: MatRef<'_, f64>, k: usize) -> Self {
        let (m, n) = (u.nrows(), v.nrows());
        let mut out = TruncatedSvd { u: vec![0.0; m * k], s: vec![0.0; k], vt: vec![0.0; k * n], m, n };
        for i in 0..m {
            for j in 0..k {
                out.u[i * k + j] = u[(i, j)] as f32;
            }
        }
        for j in 0..k {
            out.s[j] = s[j] as f32;
            for i in 0..n {
                out.vt[j * n + i] = v[(i, j)] as f32;
            }
        }
        out
    }

    /// From row-major U [m, k], S \[k\], Vᵀ [k, n], e.g. produced by another backend; the shapes
    /// must agree and S must be sorted descending (NaN is let through for the metrics to flag).
    pub fn from_parts(u: Vec<f32>, s: Vec<f32>, vt: Vec<f32>, m: usize, n: usize) -> Result<Self> {
        let k = s.len();
        if u.len() != m * k || vt.len() != k * n {
            return Err(Error::shape(
                "TruncatedSvd::from_parts",
                format!(
                    "U has {} and Vt {} elements; [{m}, {k}] and [{k}, {n}] need {} and {}",
                    u.len(),
                    vt.len(),
                    m * k,
                    k * n
                ),
            ));
        }
        if s.windows(2).any(|w| w[0] < w[1]) {
            return Err(Error::InvalidArgument(format!("TruncatedSvd::from_parts: S is not descending: {s:?}")));
        }
        Ok(TruncatedSvd { u, s, vt, m, n })
    }

    /// The leading `k` components (all of them if `k` is larger).
    pub fn truncated(&self, k: usize) -> TruncatedSvd {
        let k = k.min(self.k());
        let (m, n, k0) = (self.m, self.n, self.k());
        let u = (0..m).flat_map(|i| self.u[i * k0..i * k0 + k].iter().copied()).collect();
        TruncatedSvd { u, s: self.s[..k].to_vec(), vt: self.vt[..k * n].to_vec(), m, n }
    }

    /// ‖A − U diag(S) Vᵀ‖_F, accumulated in f64.
    pub fn reconstruction_error(&self, a: MatrixRef<'_>) -> Result<f64> {
        if (a.rows(), a.cols()) != (self.m, self.n) {
            return Err(Error::shape(
                "reconstruction_error",
                format!("A is [{}, {}] but the SVD is of an [{}, {}] matrix", a.rows(), a.cols(), self.m, self.n),
            ));
        }
        let k = self.k();
        let us = Mat::from_fn(self.m, k, |i, j| self.u[i * k + j] as f64 * self.s[j] as f64);
        let vt = Mat::from_fn(k, self.n, |i, j| self.vt[i * self.n + j] as f64);
        Ok((a.to_f64(false) - us * vt).norm_l2())
    }

    /// ‖UᵀU − I‖_max in f64: how far U's columns are from orthonormal.
    pub fn u_orthogonality_error(&self) -> f64 {
        let u = Mat::from_fn(self.m, self.k(), |i, j| self.u[i * self.k() + j] as f64);
        gram_error(u.as_ref())
    }

    /// ‖VᵀV − I‖_max in f64, over the rows of Vᵀ.
    pub fn v_orthogonality_error(&self) -> f64 {
        let v = Mat::from_fn(self.n, self.k(), |i, j| self.vt[j * self.n + i] as f64);
        gram_error(v.as_ref())
    }
}

fn gram_error(x: MatRef<'_, f64>) -> f64 {
    let g = x.transpose() * x;
    let mut worst = 0.0f64;
    for j in 0..g.ncols() {
        for i in 0..g.nrows() {
            let want = if i == j { 1.0 } else { 0.0 };
            let d = (g[(i, j)] - want).abs();
            if d.is_nan() {
                return f64::NAN; // f64::max would drop it, and a NaN must never pass
            }
            worst = worst.max(d);
        }
    }
    worst
}

/// The exact SVD (faer, f64), truncated to its leading `k` components: the reference for tests.
/// It costs O(mn·min(m, n)), so it is not for production-sized layers.
pub fn svd_exact(name: &str, a: MatrixRef<'_>, k: usize) -> Result<TruncatedSvd> {
    const OP: &str = "svd_exact";
    a.check_factorable(OP, name)?;
    let full = a.rows().min(a.cols());
    if k == 0 || k > full {
        return Err(Error::layer(
            OP,
            name,
            format!("k = {k} must be in 1..={full} for shape [{}, {}]", a.rows(), a.cols()),
        ));
    }
    let svd = a.to_f64(false).thin_svd().map_err(|e| Error::layer(OP, name, format!("SVD failed: {e:?}")))?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    Ok(TruncatedSvd::from_factors(svd.U(), &s, svd.V(), k))
}
