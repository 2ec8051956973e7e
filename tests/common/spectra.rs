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

/// The error messages every randomized-SVD backend must give for a 20 x 10 layer named
/// `layers.3.mlp.up_proj`: non-finite values with their position, and q or k out of range.
/// `err(data, m, n, cfg)` runs the backend and returns its error as text; the two entries poisoned here are left at 1.0.
pub fn check_layer_errors(
    data: &mut [f32],
    cfg: &loraga_core::linalg::RsvdConfig,
    err: impl Fn(&[f32], usize, usize, &loraga_core::linalg::RsvdConfig) -> String,
) {
    use loraga_core::linalg::RsvdConfig;
    data[5 * 10 + 7] = f32::NAN;
    data[6 * 10] = f32::INFINITY;
    let e = err(data, 20, 10, cfg);
    assert!(e.contains("layers.3.mlp.up_proj") && e.contains("NaN at [5, 7]"), "{e}");
    data[5 * 10 + 7] = 1.0;
    let e = err(data, 20, 10, cfg);
    assert!(e.contains("inf at [6, 0]"), "{e}");
    data[6 * 10] = 1.0;

    let e = err(data, 20, 10, &RsvdConfig::new(11, 2, 4, 7));
    assert!(e.contains("layers.3.mlp.up_proj") && e.contains("q = 11 must be in 1..=10"), "{e}");
    let e = err(data, 20, 10, &RsvdConfig::new(4, 5, 4, 7));
    assert!(e.contains("k = 5 must be in 1..=q (q = 4)"), "{e}");
    let e = err(data, 20, 10, &RsvdConfig::new(0, 0, 4, 7));
    assert!(e.contains("q = 0"), "{e}");
}

/// A matrix with a decaying spectrum, factored with oversampled rank q.
pub struct Case {
    pub m: usize,
    pub n: usize,
    pub q: usize,
    pub decay: fn(usize) -> f64,
}

/// Tolerances, from 30 draws of each case here and of `torch.svd_lowrank` (fp32, H200, niter=4)
/// on the same spectra: the top q/2 singular values (LoRA-GA uses 2r = q/2 vectors) came within
/// 1.4e-5 relative (torch 5.8e-6); the rank-q/2 error within 1.000005x of the best (torch the
/// same). The rank-q error is where randomisation shows: its ratio to the best rank-q error had
/// medians 1.004-1.009 for torch and 1.006 here (equal within 0.3%), and maxima up to 1.043
/// (torch, q = 8) and 1.030 (here); 1.06 bounds that tail with room for these cases. The tail is
/// longer without oversampling on a fast-decaying spectrum: at 4096x1024, q = 8, σ_i = i⁻³, 40
/// draws of Ω gave up to 1.036 and one seed on the H200 (2026-11-29) 1.117 for the CPU path
/// and the GPU path alike. Tests that have the reference algorithm's result for the same Ω
/// pass it to [`check_against_exact_and`], which then bounds the rank-q error by the larger of
/// 1.06 and 1.005x the reference's own ratio.
pub const S_REL_TOL: f64 = 1e-3;
pub const ORTHO_TOL: f64 = 1e-5;
pub const RANK_HALF_Q_RATIO: f64 = 1.005;
pub const RANK_Q_RATIO: f64 = 1.06;

/// Checks a rank-q randomized SVD of `a` against its exact SVD: shape, descending order, the top
/// q/2 singular values, orthogonality of U and V, and the rank-q/2 and rank-q errors.
pub fn check_against_exact(
    what: &str,
    got: &loraga_core::linalg::TruncatedSvd,
    a: loraga_core::linalg::MatrixRef,
    q: usize,
) {
    check_against_exact_and(what, got, None, a, q)
}

/// [`check_against_exact`], with the rank-q bound raised to 1.005x the `reference`'s ratio (the
/// same algorithm with the same Ω, e.g. the CPU path) where that is above [`RANK_Q_RATIO`].
pub fn check_against_exact_and(
    what: &str,
    got: &loraga_core::linalg::TruncatedSvd,
    reference: Option<&loraga_core::linalg::TruncatedSvd>,
    a: loraga_core::linalg::MatrixRef,
    q: usize,
) {
    let exact = loraga_core::linalg::svd_exact("case", a, q).unwrap();
    assert_eq!((got.rows(), got.cols(), got.k()), (a.rows(), a.cols(), q), "{what}");
    assert!(got.s().windows(2).all(|w| w[0] >= w[1]), "{what}: not descending: {:?}", got.s());
    let k = q / 2;
    for j in 0..k {
        let (g, e) = (got.s()[j] as f64, exact.s()[j] as f64);
        assert!(((g - e) / e).abs() <= S_REL_TOL, "{what}: sigma_{j} = {g}, exact {e}");
    }
    let (ou, ov) = (got.u_orthogonality_error(), got.v_orthogonality_error());
    assert!(ou <= ORTHO_TOL && ov <= ORTHO_TOL, "{what}: |U'U - I| = {ou:e}, |V'V - I| = {ov:e}");
    let ratio = |k: usize| {
        got.truncated(k).reconstruction_error(a).unwrap() / exact.truncated(k).reconstruction_error(a).unwrap()
    };
    let (rk, rq) = (ratio(k), ratio(q));
    let rq_bound = reference.map_or(RANK_Q_RATIO, |r| {
        let own = r.truncated(q).reconstruction_error(a).unwrap() / exact.truncated(q).reconstruction_error(a).unwrap();
        RANK_Q_RATIO.max(1.005 * own)
    });
    assert!(rk <= RANK_HALF_Q_RATIO, "{what}: rank-{k} error is {rk}x the best");
    assert!(rq <= rq_bound, "{what}: rank-{q} error is {rq}x the best (bound {rq_bound})");
}
