//! Helpers shared by the correctness tests and benchmarks: random inputs and the relative-error
//! metric DESIGN.md fixes for every kernel check.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// ||out - ref|| / ||ref|| in f64. NaN or Inf anywhere in `out` gives +Inf, so it never passes.
pub fn rel_error(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "rel_error: lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            return f64::INFINITY;
        }
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if den == 0.0 { if num == 0.0 { 0.0 } else { f64::INFINITY } } else { (num / den).sqrt() }
}

/// A path inside the repository: under `$LORAGA_ROOT` when set (binaries staged to another
/// machine, see scripts/gpu-run.sh), else under the checkout this crate was built from.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    let root = std::env::var_os("LORAGA_ROOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    root.join(relative)
}

/// `n` standard-normal samples.
pub fn randn(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_error_measures_and_rejects_nan() {
        assert_eq!(rel_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        let e = rel_error(&[1.0, 2.0], &[1.0, 2.1]);
        assert!((e - 0.1 / (1.0f64 + 4.41).sqrt()).abs() < 1e-6);
        assert_eq!(rel_error(&[f32::NAN, 2.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_error(&[f32::INFINITY], &[1.0]), f64::INFINITY);
    }
}
