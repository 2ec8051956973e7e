//! CPU tests of the randomized SVD (`loraga_core::linalg`) against the exact one, on matrices
//! with a known, decaying spectrum. Inputs are fresh each run: the seed comes from the clock (or
//! LORAGA_TEST_SEED to replay a failure) and is printed.

mod common;

use common::spectra::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use loraga_core::linalg::*;
use loraga_core::testing::randn;
use loraga_core::{Device, Tensor};

#[test]
fn decaying_spectra_match_the_exact_svd() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let cases = [
        Case { m: 300, n: 217, q: 8, decay: harmonic },
        Case { m: 300, n: 217, q: 32, decay: inverse_square },
        Case { m: 217, n: 300, q: 32, decay: harmonic },
        Case { m: 517, n: 1024, q: 64, decay: harmonic },
    ];
    for c in cases {
        let what = format!("{}x{} q={}", c.m, c.n, c.q);
        let a = with_spectrum(&mut rng, c.m, c.n, c.decay);
        let a = MatrixRef::new(&a, c.m, c.n).unwrap();
        let got = svd_lowrank("case", a, &RsvdConfig::new(c.q, c.q, 4, rng.random())).unwrap();
        check_against_exact(&what, &got, a, c.q);
    }
}

#[test]
fn the_metrics_catch_bad_factorisations() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let a = with_spectrum(&mut rng, 40, 30, harmonic);
    let a = MatrixRef::new(&a, 40, 30).unwrap();
    let exact = svd_exact("a", a, 30).unwrap();
    assert!(exact.reconstruction_error(a).unwrap() < 1e-5);
    assert!(exact.u_orthogonality_error() < 1e-5 && exact.v_orthogonality_error() < 1e-5);

    let (mut u, s, mut vt) = (exact.u().to_vec(), exact.s().to_vec(), exact.vt().to_vec());
    u[7] += 0.01;
    vt[3] = f32::NAN;
    let bad = TruncatedSvd::from_parts(u, s, vt, 40, 30).unwrap();
    assert!(bad.u_orthogonality_error() > 1e-3);
    assert!(bad.v_orthogonality_error().is_nan());
    assert!(bad.reconstruction_error(a).unwrap().is_nan());
    let other = MatrixRef::new(&[1.0; 6], 2, 3).unwrap();
    assert!(exact.reconstruction_error(other).unwrap_err().to_string().contains("[2, 3]"));
}

#[test]
fn same_seed_is_bit_identical_and_another_seed_is_not() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let data = randn(&mut rng, 120 * 90);
    let a = MatrixRef::new(&data, 120, 90).unwrap();
    let seed = rng.random();
    let cfg = RsvdConfig::new(16, 8, 4, seed);
    assert_eq!(svd_lowrank("a", a, &cfg).unwrap(), svd_lowrank("a", a, &cfg).unwrap());
    let other = RsvdConfig { seed: seed ^ 1, ..cfg.clone() };
    assert_ne!(svd_lowrank("a", a, &cfg).unwrap(), svd_lowrank("a", a, &other).unwrap());

    let omega = gaussian_test_matrix(90, 16, seed);
    assert_eq!(omega, gaussian_test_matrix(90, 16, seed));
    assert_ne!(omega, gaussian_test_matrix(90, 16, seed ^ 1));
    let mean = omega.iter().map(|&x| x as f64).sum::<f64>() / omega.len() as f64;
    let var = omega.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / omega.len() as f64;
    assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.15, "omega mean {mean}, variance {var}");
}

#[test]
fn batched_equals_one_by_one() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let shapes = [(130, 70), (45, 160), (12, 9), (96, 96)];
    let data: Vec<Vec<f32>> = shapes.iter().map(|&(m, n)| randn(&mut rng, m * n)).collect();
    let names = ["q_proj", "up_proj", "tiny", "o_proj"];
    let items: Vec<(&str, MatrixRef)> =
        (0..4).map(|i| (names[i], MatrixRef::new(&data[i], shapes[i].0, shapes[i].1).unwrap())).collect();
    // r = 4 wants q = 16; the 12x9 layer clamps to q = 9, k = 8, as LoRA-GA's min(4r, min(shape)).
    let cfg = RsvdConfig::lora_ga(4, rng.random());
    let batch = svd_lowrank_batch(&items, &cfg).unwrap();
    assert_eq!(batch.len(), 4);
    for ((name, a), got) in items.iter().zip(&batch) {
        assert_eq!(got, &svd_lowrank(name, *a, &cfg).unwrap(), "{name}");
    }
    assert_eq!(batch[2].k(), 8);
}

#[test]
fn bad_inputs_are_errors_that_name_the_layer() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let mut data = randn(&mut rng, 20 * 10);
    let cfg = RsvdConfig::new(4, 2, 4, 7);
    let err = |data: &[f32], m, n, cfg: &RsvdConfig| {
        svd_lowrank("layers.3.mlp.up_proj", MatrixRef::new(data, m, n).unwrap(), cfg).unwrap_err().to_string()
    };

    check_layer_errors(&mut data, &cfg, err);
    let e = err(&[], 0, 10, &cfg);
    assert!(e.contains("layers.3.mlp.up_proj") && e.contains("empty"), "{e}");
    let e = RsvdConfig::lora_ga(0, 1).resolve("x", 8, 8).unwrap_err().to_string();
    assert!(e.contains("q = 0"), "{e}");

    let e = MatrixRef::new(&data, 21, 10).unwrap_err().to_string();
    assert!(e.contains("200 elements do not fill [21, 10]"), "{e}");
    let e = svd_exact("w", MatrixRef::new(&data, 20, 10).unwrap(), 11).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("k = 11"), "{e}");

    // A batch reports the first bad layer in input order.
    let mut nan = data.clone();
    nan[0] = f32::NAN;
    let items = [
        ("good", MatrixRef::new(&data, 20, 10).unwrap()),
        ("first_bad", MatrixRef::new(&nan, 20, 10).unwrap()),
        ("second_bad", MatrixRef::new(&nan, 10, 20).unwrap()),
    ];
    let e = svd_lowrank_batch(&items, &cfg).unwrap_err().to_string();
    assert!(e.contains("first_bad"), "{e}");
}

#[test]
fn zero_iterations_and_rank_deficient_inputs_still_factor() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    // Rank 3, asked for q = 8: the basis must stay orthonormal past the rank.
    let a = with_spectrum(&mut rng, 50, 40, |i| if i <= 3 { 1.0 / i as f64 } else { 0.0 });
    let a = MatrixRef::new(&a, 50, 40).unwrap();
    for niter in [0, 4] {
        let got = svd_lowrank("low_rank", a, &RsvdConfig::new(8, 8, niter, rng.random())).unwrap();
        assert!(got.u_orthogonality_error() <= ORTHO_TOL && got.v_orthogonality_error() <= ORTHO_TOL);
        assert!(got.reconstruction_error(a).unwrap() < 1e-5, "niter {niter}");
    }
}

#[test]
fn tensors_on_the_cpu_are_factored_in_place_or_widened() {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let data = randn(&mut rng, 60 * 33);
    let cfg = RsvdConfig::new(12, 6, 4, rng.random());
    let want = svd_lowrank("w", MatrixRef::new(&data, 60, 33).unwrap(), &cfg).unwrap();
    let t = Tensor::from_vec(data.clone(), [60, 33], &Device::Cpu).unwrap();
    assert_eq!(svd_lowrank_tensor("w", &t, &cfg).unwrap(), want);

    let bf: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let widened: Vec<f32> = bf.iter().map(|x| x.to_f32()).collect();
    let t = Tensor::from_vec(bf, [60, 33], &Device::Cpu).unwrap();
    let want = svd_lowrank("w", MatrixRef::new(&widened, 60, 33).unwrap(), &cfg).unwrap();
    assert_eq!(svd_lowrank_tensor("w", &t, &cfg).unwrap(), want);

    let t = Tensor::from_vec(data, [2, 30, 33], &Device::Cpu).unwrap();
    let e = svd_lowrank_tensor("stacked", &t, &cfg).unwrap_err().to_string();
    assert!(e.contains("stacked must be a matrix"), "{e}");
}
