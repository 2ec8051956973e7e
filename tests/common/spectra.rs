//! Test matrices with known spectra, for the randomized-SVD tests (CPU and GPU), and the seed
//! they draw from.

use faer::Mat;
use loraga_core::testing::randn;
use rand::Rng;

/// A fresh seed per run (printed), or `LORAGA_TEST_SEED` to replay one.
pub fn test_seed() -> u64 {
    let seed = std::env::var("LORAGA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("LORAGA_TEST_SEED={seed}");
    seed
}

/// Columns of a random matrix with orthonormal columns, [rows, cols], rows ≥ cols.
pub fn random_orthonormal(rng: &mut impl Rng, rows: usize, cols: usize) -> Mat<f64> {
    let g = randn(rng, rows * cols);
    Mat::from_fn(rows, cols, |i, j| g[i * cols + j] as f64).qr().compute_thin_Q()
}

/// U diag(σ) Vᵀ with random orthonormal U, V, rounded to f32 row-major.
pub fn with_spectrum(rng: &mut impl Rng, m: usize, n: usize, sigma: impl Fn(usize) -> f64) -> Vec<f32> {
    let c = m.min(n);
    let mut u = random_orthonormal(rng, m, c);
    let v = random_orthonormal(rng, n, c);
    for j in 0..c {
        let s = sigma(j + 1);
        u.col_mut(j).iter_mut().for_each(|x| *x *= s);
    }
    let a = u * v.transpose();
    (0..m * n).map(|idx| a[(idx / n, idx % n)] as f32).collect()
}

pub fn harmonic(i: usize) -> f64 {
    1.0 / i as f64
}

pub fn inverse_square(i: usize) -> f64 {
    1.0 / (i * i) as f64
}
