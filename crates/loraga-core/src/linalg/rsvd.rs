//! Randomized truncated SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1) with the semantics
//! of `torch.svd_lowrank(A, q, niter)`, which LoRA-GA calls on every target layer's gradient
//! with q = min(4r, m, n), niter = 4, and keeps the top 2r vectors.
//!
//! As in torch, a wide matrix is factored through its transpose so the basis always lives on the
//! long side. With A tall (p × c, p ≥ c):
//!   Ω = gaussian [c, q];  Q = qr(A Ω)
//!   niter times:          Q' = qr(Aᵀ Q);  Q = qr(A Q')
//!   B = Qᵀ A [q, c];      B = U_B S Vᵀ;   U = Q U_B
//! Re-orthonormalising at every step (Householder QR) keeps the small singular directions from
//! being washed out in floating point, which plain power iteration would do.
//!
//! Arithmetic is f64 on f32 inputs (widened exactly), and only the results are rounded to f32
//! (‖UᵀU − I‖_max ≈ 2e-8 in the tests, which is that rounding). This CPU path is the reference
//! the GPU's f32 path will be checked against with the same Ω, so its own rounding should be
//! negligible. The price, 2x on the ~10 GEMMs over A, is fine for a fallback.

use faer::Mat;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::rsvd_cuda::{CudaMatrixRef, svd_lowrank_cuda};
use super::rsvd_cuda_blas::widen_bf16;
use super::{MatrixRef, TruncatedSvd};
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "svd_lowrank";

/// What to compute: `q` columns in the random basis (the oversampled rank), `niter` subspace
/// iterations, the leading `k` ≤ q components returned, and the seed of Ω.
#[derive(Clone, Debug, PartialEq)]
pub struct RsvdConfig {
    pub q: usize,
    pub niter: usize,
    pub k: usize,
    pub seed: u64,
    /// Shrink q to min(q, m, n) and k to min(k, q) per matrix, as LoRA-GA's
    /// `q=min(4r, min(grad.shape))` does, instead of rejecting a q that does not fit.
    pub clamp_to_shape: bool,
}

impl RsvdConfig {
    /// Exactly these q and k; a matrix they do not fit is an error.
    pub fn new(q: usize, k: usize, niter: usize, seed: u64) -> Self {
        RsvdConfig { q, niter, k, seed, clamp_to_shape: false }
    }

    /// LoRA-GA at adapter rank `r`: q = min(4r, m, n), niter = 4, k = min(2r, q).
    pub fn lora_ga(r: usize, seed: u64) -> Self {
        RsvdConfig { q: 4 * r, niter: 4, k: 2 * r, seed, clamp_to_shape: true }
    }

    /// The (q, k) used for an [m, n] matrix, or an error naming the layer.
    pub fn resolve(&self, name: &str, m: usize, n: usize) -> Result<(usize, usize)> {
        let full = m.min(n);
        let (q, k) = if self.clamp_to_shape {
            let q = self.q.min(full);
            (q, self.k.min(q))
        } else {
            (self.q, self.k)
        };
        if q == 0 || q > full {
            return Err(Error::layer(OP, name, format!("q = {q} must be in 1..={full} for shape [{m}, {n}]")));
        }
        if k == 0 || k > q {
            return Err(Error::layer(OP, name, format!("k = {k} must be in 1..=q (q = {q})")));
        }
        Ok((q, k))
    }
}

/// Ω: `rows × q` standard normals, row-major, from ChaCha8 seeded with `seed`. Drawn as f32, as
/// torch draws it for an f32 input, so a GPU path can upload this exact matrix and match the
/// CPU. ChaCha8 and rand_distr's normal sampler are value-stable, so a seed means the same Ω
/// on every machine.
pub fn gaussian_test_matrix(rows: usize, q: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows * q).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// The randomized SVD of one matrix, named `name` in errors. For an [m, n] matrix Ω is
/// [min(m, n), q] (torch's layout after its transpose). The same config gives bit-identical
/// results on one machine (tested); across thread counts that rests on faer's parallel kernels
/// keeping their summation order, which is not checked.
pub fn svd_lowrank(name: &str, a: MatrixRef<'_>, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
    factor(name, a, cfg, None)
}

/// [`svd_lowrank`] with a given Ω [min(m, n), q] (row-major) instead of the one `cfg.seed`
/// draws: to reproduce another implementation's run from the test matrix it used (torch's
/// `randn(min(m, n), q)`), or to share one Ω between backends.
pub fn svd_lowrank_with_omega(name: &str, a: MatrixRef<'_>, cfg: &RsvdConfig, omega: &[f32]) -> Result<TruncatedSvd> {
    factor(name, a, cfg, Some(omega))
}

fn factor(name: &str, a: MatrixRef<'_>, cfg: &RsvdConfig, omega: Option<&[f32]>) -> Result<TruncatedSvd> {
    a.check_factorable(OP, name)?;
    let (m, n) = (a.rows(), a.cols());
    let (q, k) = cfg.resolve(name, m, n)?;
    let drawn;
    let omega = match omega {
        Some(o) => o,
        None => {
            drawn = gaussian_test_matrix(m.min(n), q, cfg.seed);
            &drawn
        }
    };
    if omega.len() != m.min(n) * q {
        return Err(Error::layer(
            OP,
            name,
            format!("the test matrix has {} elements, [{}, {q}] needs {}", omega.len(), m.min(n), m.min(n) * q),
        ));
    }

    let transposed = m < n;
    let a = a.to_f64(transposed);
    let omega = Mat::from_fn(a.ncols(), q, |i, j| omega[i * q + j] as f64);

    let mut basis = (&a * &omega).qr().compute_thin_Q();
    for _ in 0..cfg.niter {
        let side = (a.transpose() * &basis).qr().compute_thin_Q();
        basis = (&a * &side).qr().compute_thin_Q();
    }
    let b = basis.transpose() * &a;
    let small =
        b.thin_svd().map_err(|e| Error::layer(OP, name, format!("SVD of the {q}x{} core failed: {e:?}", b.ncols())))?;
    let u = &basis * small.U();
    let s: Vec<f64> = small.S().column_vector().iter().copied().collect();

    // A = U S Vᵀ was computed for Aᵀ when A is wide: swap the factors back.
    Ok(if transposed {
        TruncatedSvd::from_factors(small.V(), &s, u.as_ref(), k)
    } else {
        TruncatedSvd::from_factors(u.as_ref(), &s, small.V(), k)
    })
}

/// [`svd_lowrank`] of each named matrix with the same config, results in input order. Matrices
/// run in parallel (faer parallelises inside each too); the first failure in input order is the
/// error returned. Layers of one shape share Ω; that is harmless, since each layer's accuracy
/// depends only on its own Ω being Gaussian, and it keeps a layer's result independent of which
/// other layers are in the batch.
pub fn svd_lowrank_batch(items: &[(&str, MatrixRef<'_>)], cfg: &RsvdConfig) -> Result<Vec<TruncatedSvd>> {
    let results: Vec<Result<TruncatedSvd>> = items.par_iter().map(|(name, a)| svd_lowrank(name, *a, cfg)).collect();
    results.into_iter().collect()
}

/// [`svd_lowrank`] of a 2-D tensor, on the tensor's device: CPU tensors here, CUDA tensors by
/// [`super::rsvd_cuda`] in full fp32. bf16 is widened to f32 first (on its device), like
/// LoRA-GA's `grad.float()`.
pub fn svd_lowrank_tensor(name: &str, a: &Tensor, cfg: &RsvdConfig) -> Result<TruncatedSvd> {
    let (m, n) = a.shape().dims2(OP, name)?;
    match a.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => svd_lowrank(name, MatrixRef::new(v, m, n)?, cfg),
        Storage::Cpu(other) => svd_lowrank(name, MatrixRef::new(&other.to_f32_vec(), m, n)?, cfg),
        Storage::Cuda(s) if s.dtype() == DType::F32 => svd_lowrank_cuda(name, CudaMatrixRef::new(s, m, n)?, cfg),
        Storage::Cuda(s) => {
            if m == 0 || n == 0 {
                return Err(Error::shape(OP, format!("layer `{name}` is empty: shape [{m}, {n}]")));
            }
            let wide = widen_bf16(s)?;
            svd_lowrank_cuda(name, CudaMatrixRef::new(&wide, m, n)?, cfg)
        }
    }
}
