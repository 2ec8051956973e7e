//! GPU randomized SVD (`loraga_core::linalg::rsvd_cuda`) against the exact SVD and the CPU path
//! with the same Ω, on matrices with a known, decaying spectrum; its two paths (all on the device,
//! and the host-assisted fallback for flagged layers) each shown to be the one that ran; one
//! CholeskyQR pass of the fused kernels (q up to 128; cuSOLVER and cuBLAS
//! above it, both covered by the spectra) against an f64 CPU CholeskyQR; and cuSOLVER's gesvdr
//! wrapper that the bench compares against. Every test needs a CUDA GPU and
//! fails without one (run with `--include-ignored`). Inputs are fresh each run: the seed comes
//! from the clock (or LORAGA_TEST_SEED to replay a failure) and is printed.
//!
//! Tolerances are the CPU test's (tests/rsvd_cpu.rs explains them): the top q/2 singular values
//! within 1e-3 relative of the exact SVD, ‖UᵀU − I‖_max and ‖VᵀV − I‖_max ≤ 1e-5, the rank-q/2
//! error within 1.005x of the best and the rank-q error within 1.06x. Against the CPU path (f64,
//! same Ω) the rank-q error must be within 1.005x: the same algorithm in f32 may not be worse.

mod common;

use common::spectra::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::{CudaDevice, CudaStorage};
use loraga_core::linalg::*;
use loraga_core::testing::randn;
use loraga_core::{Device, Tensor};

fn gpu() -> CudaDevice {
    CudaDevice::new(0).expect("this test needs a CUDA GPU")
}

fn upload(dev: &CudaDevice, data: &[f32]) -> CudaStorage {
    CudaStorage::from_cpu(dev, &CpuStorage::F32(data.to_vec())).expect("upload")
}

fn inverse_cube(i: usize) -> f64 {
    1.0 / (i * i * i) as f64
}

/// The GPU path against the CPU path with the same Ω (both f32 products).
const VS_CPU_RATIO: f64 = 1.005;

#[test]
#[ignore = "needs a CUDA GPU"]
fn decaying_spectra_match_the_exact_svd_and_the_cpu_path() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let cases = [
        Case { m: 300, n: 217, q: 8, decay: harmonic },
        Case { m: 300, n: 217, q: 32, decay: inverse_square },
        Case { m: 217, n: 300, q: 32, decay: harmonic },
        Case { m: 300, n: 217, q: 128, decay: harmonic },
        Case { m: 1024, n: 4096, q: 128, decay: harmonic },
        Case { m: 4096, n: 1024, q: 32, decay: harmonic },
        Case { m: 4096, n: 1024, q: 8, decay: inverse_cube },
        Case { m: 1024, n: 4096, q: 32, decay: inverse_square },
        Case { m: 700, n: 600, q: 256, decay: harmonic },
    ];
    // q ≤ the fused limit runs CholeskyQR's passes in loraga's kernels, q = 256 in cuSOLVER's
    // and cuBLAS's: both implementations must be covered here.
    let limit = cholesky_qr_fused_max_q(&dev);
    assert!((128..256).contains(&limit), "fused CholeskyQR limit {limit}: the cases no longer cover both paths");
    // These spectra are well conditioned for CholeskyQR2 (cond ≤ ~1e4): the device path must
    // handle every one of them without the host fallback.
    let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
    for c in cases {
        let what = format!("{}x{} q={}", c.m, c.n, c.q);
        let data = with_spectrum(&mut rng, c.m, c.n, c.decay);
        let a = MatrixRef::new(&data, c.m, c.n).unwrap();
        let storage = upload(&dev, &data);
        let cfg = RsvdConfig::new(c.q, c.q, 4, rng.random());
        let got = plan.run("case", CudaMatrixRef::new(&storage, c.m, c.n).unwrap(), &cfg).unwrap();
        assert_eq!(plan.fallbacks(), 0, "{what}: the device path flagged this layer");
        let cpu = svd_lowrank("case", a, &cfg).unwrap();
        check_against_exact_and(&what, &got, Some(&cpu), a, c.q);
        let err = |s: &TruncatedSvd| s.reconstruction_error(a).unwrap();
        let vs_cpu = err(&got) / err(&cpu);
        eprintln!("{what}: rank-q error {vs_cpu}x the CPU path's");
        assert!(vs_cpu <= VS_CPU_RATIO, "{what}: rank-q error is {vs_cpu}x the CPU path's");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tf32_products_still_find_the_top_subspace() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let (m, n, q) = (1024, 768, 32);
    let data = with_spectrum(&mut rng, m, n, harmonic);
    let a = MatrixRef::new(&data, m, n).unwrap();
    let storage = upload(&dev, &data);
    let cfg = RsvdConfig::new(q, q / 2, 4, rng.random());
    let got =
        CudaRsvd::new(&dev, GemmMath::Tf32).run("tf32", CudaMatrixRef::new(&storage, m, n).unwrap(), &cfg).unwrap();
    let exact = svd_exact("tf32", a, q / 2).unwrap();
    // TF32 rounds the products' operands to 10-bit mantissas (~5e-4): looser than fp32.
    for j in 0..q / 2 {
        let (g, e) = (got.s()[j] as f64, exact.s()[j] as f64);
        assert!(((g - e) / e).abs() <= 1e-2, "sigma_{j} = {g}, exact {e}");
    }
    assert!(got.u_orthogonality_error() <= ORTHO_TOL && got.v_orthogonality_error() <= ORTHO_TOL);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn same_seed_is_bit_identical_and_another_seed_is_not() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let data = randn(&mut rng, 520 * 390);
    let storage = upload(&dev, &data);
    let a = CudaMatrixRef::new(&storage, 520, 390).unwrap();
    // q = 32: the fused CholeskyQR passes (their Gram's chunk sums must not depend on which
    // block finished last); q = 200: cuSOLVER's and cuBLAS's.
    for q in [32, 200] {
        let seed = rng.random();
        let cfg = RsvdConfig::new(q, 16, 4, seed);
        let first = svd_lowrank_cuda("a", a, &cfg).unwrap();
        assert_eq!(first, svd_lowrank_cuda("a", a, &cfg).unwrap(), "q = {q}");
        let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
        assert_eq!(first, plan.run("a", a, &cfg).unwrap(), "q = {q}");
        assert_eq!(first, plan.run("a", a, &cfg).unwrap(), "q = {q}: a reused plan");
        let other = RsvdConfig { seed: seed ^ 1, ..cfg.clone() };
        assert_ne!(first, svd_lowrank_cuda("a", a, &other).unwrap(), "q = {q}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batched_equals_one_by_one() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let shapes = [(130, 70), (45, 160), (12, 9), (96, 96), (700, 300)];
    let names = ["q_proj", "up_proj", "tiny", "o_proj", "down_proj"];
    let data: Vec<Vec<f32>> = shapes.iter().map(|&(m, n)| randn(&mut rng, m * n)).collect();
    let storages: Vec<CudaStorage> = data.iter().map(|d| upload(&dev, d)).collect();
    let items: Vec<(&str, CudaMatrixRef)> = (0..shapes.len())
        .map(|i| (names[i], CudaMatrixRef::new(&storages[i], shapes[i].0, shapes[i].1).unwrap()))
        .collect();
    // r = 4 wants q = 16; the 12x9 layer clamps to q = 9, k = 8, as LoRA-GA's min(4r, min(shape)).
    let cfg = RsvdConfig::lora_ga(4, rng.random());
    let batch = svd_lowrank_batch_cuda(&items, &cfg).unwrap();
    assert_eq!(batch.len(), shapes.len());
    for (i, ((name, a), got)) in items.iter().zip(&batch).enumerate() {
        assert_eq!(got, &svd_lowrank_cuda(name, *a, &cfg).unwrap(), "{name}");
        let host = MatrixRef::new(&data[i], shapes[i].0, shapes[i].1).unwrap();
        let cpu = svd_lowrank(name, host, &cfg).unwrap();
        let ratio = got.reconstruction_error(host).unwrap() / cpu.reconstruction_error(host).unwrap();
        assert!((ratio - 1.0).abs() < 1e-3, "{name}: error {ratio}x the CPU path's");
    }
    assert_eq!(batch[2].k(), 8);
    assert!(svd_lowrank_batch_cuda(&[], &cfg).unwrap().is_empty());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_results_are_the_host_results() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    // Tall and wide; q = 16 and 32 (the Jacobi core), 128 (the widest fused pass, syevd); and a zero
    // matrix, which the device path flags and the host-assisted path redoes and uploads.
    let shapes = [(300, 200, 16), (200, 300, 32), (400, 260, 128), (64, 48, 8)];
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(m, n, _))| if i == 3 { vec![0.0; m * n] } else { randn(&mut rng, m * n) })
        .collect();
    let storages: Vec<CudaStorage> = data.iter().map(|d| upload(&dev, d)).collect();
    for (i, &(m, n, q)) in shapes.iter().enumerate() {
        let a = CudaMatrixRef::new(&storages[i], m, n).unwrap();
        let cfg = RsvdConfig::new(q, q / 2, 4, rng.random());
        let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
        let host = plan.run("layer", a, &cfg).unwrap();
        let device = plan.run_device("layer", a, &cfg).unwrap();
        assert_eq!((device.rows(), device.cols(), device.k()), (m, n, q / 2));
        assert_eq!((device.u().len(), device.vt().len()), (m * q / 2, q / 2 * n));
        assert_eq!(device.to_host().unwrap(), host, "{m}x{n} q={q}");
        assert_eq!(plan.fallbacks(), if i == 3 { 2 } else { 0 }, "{m}x{n} q={q}");
    }
    // A batch: every layer in its own buffers, the same as one by one.
    let cfg = RsvdConfig::lora_ga(4, rng.random());
    let items: Vec<(&str, CudaMatrixRef)> =
        shapes.iter().zip(&storages).map(|(&(m, n, _), s)| ("layer", CudaMatrixRef::new(s, m, n).unwrap())).collect();
    let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
    let batch = plan.run_batch_device(&items, &cfg).unwrap();
    for ((name, a), got) in items.iter().zip(&batch) {
        assert_eq!(got.to_host().unwrap(), svd_lowrank_cuda(name, *a, &cfg).unwrap());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_inputs_are_errors_that_name_the_layer() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let mut data = randn(&mut rng, 20 * 10);
    let cfg = RsvdConfig::new(4, 2, 4, 7);
    let err = |data: &[f32], m, n, cfg: &RsvdConfig| {
        let s = upload(&dev, data);
        svd_lowrank_cuda("layers.3.mlp.up_proj", CudaMatrixRef::new(&s, m, n).unwrap(), cfg).unwrap_err().to_string()
    };

    check_layer_errors(&mut data, &cfg, err);

    let s = upload(&dev, &data);
    let e = CudaMatrixRef::new(&s, 21, 10).err().unwrap().to_string();
    assert!(e.contains("200 elements do not fill [21, 10]"), "{e}");

    // A batch reports the first bad layer in input order.
    let mut nan = data.clone();
    nan[0] = f32::NAN;
    let (good, bad) = (upload(&dev, &data), upload(&dev, &nan));
    let items = [
        ("good", CudaMatrixRef::new(&good, 20, 10).unwrap()),
        ("first_bad", CudaMatrixRef::new(&bad, 20, 10).unwrap()),
        ("second_bad", CudaMatrixRef::new(&bad, 10, 20).unwrap()),
    ];
    let e = svd_lowrank_batch_cuda(&items, &cfg).unwrap_err().to_string();
    assert!(e.contains("first_bad"), "{e}");
    let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
    let e = plan.run_batch_device(&items, &cfg).err().unwrap().to_string();
    assert!(e.contains("first_bad") && e.contains("NaN at [0, 0]"), "{e}");
    // NaN/Inf are found by the device path's flags, and by a scan only when a later layer fails
    // a host check: the order still holds either way.
    let narrow = upload(&dev, &data[..30]);
    let (nan_layer, narrow_layer) =
        (CudaMatrixRef::new(&bad, 20, 10).unwrap(), CudaMatrixRef::new(&narrow, 3, 10).unwrap());
    let e = svd_lowrank_batch_cuda(&[("nan", nan_layer), ("narrow", narrow_layer)], &cfg).unwrap_err().to_string();
    assert!(e.contains("`nan`") && e.contains("NaN at [0, 0]"), "{e}");
    let e = svd_lowrank_batch_cuda(&[("narrow", narrow_layer), ("nan", nan_layer)], &cfg).unwrap_err().to_string();
    assert!(e.contains("`narrow`") && e.contains("q = 4 must be in 1..=3"), "{e}");

    // The device's check reads float4s with a scalar tail: the first bad element anywhere in a
    // ragged matrix (1001 x 37: a tail of one), and the least index when several are bad.
    let (m, n) = (1001, 37);
    let clean = randn(&mut rng, m * n);
    let last = m * n - 1;
    for bad in [vec![0], vec![3], vec![4, 2000], vec![31_000, 30_999], vec![last - 1], vec![last], vec![last, 17]] {
        let mut poisoned = clean.clone();
        for (t, &i) in bad.iter().enumerate() {
            poisoned[i] = if t % 2 == 0 { f32::NEG_INFINITY } else { f32::NAN };
        }
        let first = *bad.iter().min().unwrap();
        let e = err(&poisoned, m, n, &cfg);
        assert!(e.contains(&format!("at [{}, {}]", first / n, first % n)), "{bad:?}: {e}");
    }

    // The tensor path (bf16 widened on the device) checks q the same way.
    let t = Tensor::from_vec(vec![half::bf16::from_f32(1.0); 6], [2, 3], &Device::Cuda(dev.clone())).unwrap();
    let e = svd_lowrank_tensor("w", &t, &RsvdConfig::new(3, 3, 4, 7)).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("q = 3 must be in 1..=2"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn ill_conditioned_rank_deficient_and_zero_inputs_still_factor() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    // Rank 3 asked for q = 8, a geometric spectrum down to 1e-16 (shifted CholeskyQR), and zero
    // (the Householder fallback): the bases must stay orthonormal past the numerical rank.
    let low_rank = with_spectrum(&mut rng, 50, 40, |i| if i <= 3 { 1.0 / i as f64 } else { 0.0 });
    let geometric = with_spectrum(&mut rng, 300, 217, |i| 10f64.powf(-(i as f64) / 2.0));
    let zero = vec![0.0f32; 64 * 48];
    for (what, data, m, n, q) in
        [("low_rank", &low_rank, 50, 40, 8), ("geometric", &geometric, 300, 217, 32), ("zero", &zero, 64, 48, 8)]
    {
        let a = MatrixRef::new(data, m, n).unwrap();
        let s = upload(&dev, data);
        let norm = data.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        for niter in [0, 4] {
            let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
            let cfg = RsvdConfig::new(q, q, niter, rng.random());
            let got = plan.run(what, CudaMatrixRef::new(&s, m, n).unwrap(), &cfg).unwrap();
            // Cholesky cannot factor a zero Gram, nor one of condition 1e31 (geometric): the
            // device path must have flagged these and the host path redone them.
            if what != "low_rank" {
                assert_eq!(plan.fallbacks(), 1, "{what} niter {niter}: the device path did not flag it");
            }
            let (ou, ov) = (got.u_orthogonality_error(), got.v_orthogonality_error());
            assert!(ou <= ORTHO_TOL && ov <= ORTHO_TOL, "{what} niter {niter}: {ou:e} {ov:e}");
            let e = got.reconstruction_error(a).unwrap();
            assert!(e <= 1e-5 * norm.max(1.0), "{what} niter {niter}: error {e}, |A| = {norm}");
            if what != "zero" {
                let exact = svd_exact(what, a, 3).unwrap();
                for j in 0..3 {
                    let (g, x) = (got.s()[j] as f64, exact.s()[j] as f64);
                    assert!(((g - x) / x).abs() <= S_REL_TOL, "{what} niter {niter}: sigma_{j} = {g}, exact {x}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_tensors_are_factored_on_the_device_bf16_widened() {
    let dev = gpu();
    let device = Device::Cuda(dev.clone());
    let mut rng = StdRng::seed_from_u64(test_seed());
    let data = randn(&mut rng, 60 * 33);
    let cfg = RsvdConfig::new(12, 6, 4, rng.random());
    let s = upload(&dev, &data);
    let want = svd_lowrank_cuda("w", CudaMatrixRef::new(&s, 60, 33).unwrap(), &cfg).unwrap();
    let t = Tensor::from_vec(data.clone(), [60, 33], &device).unwrap();
    assert_eq!(svd_lowrank_tensor("w", &t, &cfg).unwrap(), want);

    let bf: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let widened: Vec<f32> = bf.iter().map(|x| x.to_f32()).collect();
    let s = upload(&dev, &widened);
    let want = svd_lowrank_cuda("w", CudaMatrixRef::new(&s, 60, 33).unwrap(), &cfg).unwrap();
    let t = Tensor::from_vec(bf, [60, 33], &device).unwrap();
    assert_eq!(svd_lowrank_tensor("w", &t, &cfg).unwrap(), want);

    let t = Tensor::from_vec(data, [2, 30, 33], &device).unwrap();
    let e = svd_lowrank_tensor("stacked", &t, &cfg).unwrap_err().to_string();
    assert!(e.contains("stacked must be a matrix"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_flagged_layer_in_a_batch_is_redone_on_the_host_and_the_rest_stay_on_the_device() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let good1 = with_spectrum(&mut rng, 200, 130, harmonic);
    let zero = vec![0.0f32; 90 * 150];
    let good2 = with_spectrum(&mut rng, 110, 260, inverse_square);
    let shapes = [(200, 130), (90, 150), (110, 260)];
    let storages = [upload(&dev, &good1), upload(&dev, &zero), upload(&dev, &good2)];
    let names = ["good1", "zero", "good2"];
    let items: Vec<(&str, CudaMatrixRef)> =
        (0..3).map(|i| (names[i], CudaMatrixRef::new(&storages[i], shapes[i].0, shapes[i].1).unwrap())).collect();
    let cfg = RsvdConfig::new(16, 16, 4, rng.random());
    let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
    let batch = plan.run_batch(&items, &cfg).unwrap();
    assert_eq!(plan.fallbacks(), 1, "only the zero layer should leave the device path");
    for ((name, a), got) in items.iter().zip(&batch) {
        let mut alone = CudaRsvd::new(&dev, GemmMath::Fp32);
        assert_eq!(got, &alone.run(name, *a, &cfg).unwrap(), "{name}: batch differs from one by one");
        assert!(got.u_orthogonality_error() <= ORTHO_TOL && got.v_orthogonality_error() <= ORTHO_TOL, "{name}");
    }
    assert!(batch[1].s().iter().all(|&s| s == 0.0), "zero layer: {:?}", batch[1].s());
    for (i, data) in [(0, &good1), (2, &good2)] {
        let a = MatrixRef::new(data, shapes[i].0, shapes[i].1).unwrap();
        check_against_exact(names[i], &batch[i], a, 16);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cusolver_gesvdr_baseline_finds_the_top_subspace() {
    // The bench's baseline must compute what it claims, in our layout: right singular values,
    // orthonormal U and V (a V read with the wrong layout would not be), and a rank-k error near
    // the best, tall and wide.
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let mut gesvdr = CusolverGesvdr::new(&dev).unwrap();
    for (m, n) in [(700, 300), (300, 700)] {
        let data = with_spectrum(&mut rng, m, n, harmonic);
        let a = MatrixRef::new(&data, m, n).unwrap();
        let s = upload(&dev, &data);
        let q = 32;
        let got = gesvdr.run("g", CudaMatrixRef::new(&s, m, n).unwrap(), q, 4).unwrap();
        let k = q / 2;
        assert_eq!((got.rows(), got.cols(), got.k()), (m, n, k));
        let exact = svd_exact("g", a, k).unwrap();
        for j in 0..k / 2 {
            let (g, e) = (got.s()[j] as f64, exact.s()[j] as f64);
            assert!(((g - e) / e).abs() <= S_REL_TOL, "{m}x{n}: sigma_{j} = {g}, exact {e}");
        }
        let (ou, ov) = (got.u_orthogonality_error(), got.v_orthogonality_error());
        assert!(ou <= 1e-4 && ov <= 1e-4, "{m}x{n}: |U'U - I| = {ou:e}, |V'V - I| = {ov:e}");
        let ratio = got.reconstruction_error(a).unwrap() / exact.reconstruction_error(a).unwrap();
        assert!(ratio <= RANK_Q_RATIO, "{m}x{n}: rank-{k} error {ratio}x the best");
    }
    let s = upload(&dev, &[1.0; 12]);
    let e = gesvdr.run("tiny", CudaMatrixRef::new(&s, 3, 4).unwrap(), 4, 4).unwrap_err().to_string();
    assert!(e.contains("`tiny`") && e.contains("q = 4 must be in 2..=3"), "{e}");
}

/// Column-major f32 panel [rows, q] = U diag(σ) Vᵀ with σ from 1 down to 1/cond, geometrically.
fn panel_with_condition(rng: &mut StdRng, rows: usize, q: usize, cond: f64) -> Vec<f32> {
    let mut u = random_orthonormal(rng, rows, q);
    let v = random_orthonormal(rng, q, q);
    for j in 0..q {
        let s = cond.powf(-(j as f64) / (q - 1).max(1) as f64);
        u.col_mut(j).iter_mut().for_each(|x| *x *= s);
    }
    let x = u * v.transpose();
    (0..rows * q).map(|idx| x[(idx % rows, idx / rows)] as f32).collect()
}

/// XᵀX of a column-major panel, in f64.
fn gram(x: &[f32], rows: usize, q: usize) -> Vec<f64> {
    let col = |j: usize| &x[j * rows..(j + 1) * rows];
    let mut g = vec![0.0; q * q];
    for i in 0..q {
        for j in 0..q {
            g[i + j * q] = col(i).iter().zip(col(j)).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    g
}

/// Upper Cholesky factor R (RᵀR = G, column-major) by the dot-product (left-looking) form.
fn cholesky_upper(g: &[f64], q: usize) -> Vec<f64> {
    let mut r = vec![0.0; q * q];
    for j in 0..q {
        for i in 0..=j {
            let dot: f64 = (0..i).map(|l| r[l + i * q] * r[l + j * q]).sum();
            r[i + j * q] = if i == j { (g[j + j * q] - dot).sqrt() } else { (g[i + j * q] - dot) / r[i + i * q] };
        }
    }
    r
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn frobenius(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn identity(q: usize) -> Vec<f64> {
    (0..q * q).map(|idx| if idx % q == idx / q { 1.0 } else { 0.0 }).collect()
}

fn download(s: &CudaStorage) -> Vec<f32> {
    match s.to_cpu().unwrap() {
        CpuStorage::F32(v) => v,
        _ => unreachable!("uploaded as f32"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_cholesky_qr_pass_matches_an_f64_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let limit = cholesky_qr_fused_max_q(&dev);
    // Ragged rows (not multiples of the kernels' 32-row chunks) and q inside one Gram tile, one
    // full tile (the bench's 4096, q = 32), over two tiles with a ragged last one, at the full
    // width of each Cholesky instance (32, 64, 128), and below the widest one's (100: padded
    // with I). Wider panels take cuSOLVER's and cuBLAS's pass: the spectra test covers both, the
    // end of this one the refusal.
    for (rows, q) in [(1000, 24), (4096, 32), (517, 45), (3001, 64), (777, 100), (4096, 128)] {
        let what = format!("{rows}x{q}");
        let x = panel_with_condition(&mut rng, rows, q, 1e4);
        let mut dx = upload(&dev, &x);
        let first = cholesky_qr_pass_cuda(&mut dx, rows, q, false).unwrap();
        assert_eq!(first.flag, 0, "{what}: first pass flagged");

        // R against the f64 reference from the same f32 panel: only the Gram's summation order
        // differs, which moves R by ~u₆₄·cond(X) relative.
        let r = cholesky_upper(&gram(&x, rows, q), q);
        let r_err = frobenius(&first.r.iter().zip(&r).map(|(a, b)| a - b).collect::<Vec<_>>()) / frobenius(&r);
        assert!(r_err <= 1e-10, "{what}: R off by {r_err:e} relative");
        assert!(first.r.iter().zip(&first.r_f32).all(|(&a, &b)| a as f32 == b), "{what}: R in f32 is not R rounded");
        let below = (0..q * q).filter(|idx| idx % q > idx / q);
        assert!(below.clone().all(|idx| first.r[idx] == 0.0 && first.r_inv[idx] == 0.0), "{what}: not upper");
        // R R⁻¹ = I to f64 accuracy times cond(R) = 1e4.
        let mut prod = vec![0.0; q * q];
        for j in 0..q {
            for i in 0..q {
                prod[i + j * q] = (0..q).map(|l| first.r[i + l * q] * first.r_inv[l + j * q]).sum();
            }
        }
        let inv_err = max_abs_diff(&prod, &identity(q));
        assert!(inv_err <= 1e-10, "{what}: |R R⁻¹ - I| = {inv_err:e}");

        // X R⁻¹ against the reference's (f64 back substitution from the f32 panel): the GPU's
        // X is f32, so it may differ by its rounding plus R's difference times cond(X).
        let got = download(&dx);
        let mut want = vec![0.0f64; rows * q];
        for row in 0..rows {
            for j in 0..q {
                let dot: f64 = (0..j).map(|l| want[row + l * rows] * r[l + j * q]).sum();
                want[row + j * rows] = (x[row + j * rows] as f64 - dot) / r[j + j * q];
            }
        }
        let got64: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        let q_err = max_abs_diff(&got64, &want);
        assert!(q_err <= 1e-6, "{what}: X R⁻¹ off by {q_err:e}");
        // With R⁻¹ in f64 the first pass is already orthonormal to ~u₆₄·cond(X)² + u₃₂ (an f32
        // STRSM would leave ~u₃₂·cond(X) ≈ 1e-3; see rsvd_cuda_orth's module docs).
        let ortho1 = max_abs_diff(&gram(&got, rows, q), &identity(q));
        assert!(ortho1 <= 1e-5, "{what}: first pass leaves |QᵀQ - I| = {ortho1:e}");

        // The second pass, with its Gram check: orthonormal to f32 rounding, R₂ near I.
        let second = cholesky_qr_pass_cuda(&mut dx, rows, q, true).unwrap();
        assert_eq!(second.flag, 0, "{what}: second pass flagged");
        let got = download(&dx);
        let ortho2 = max_abs_diff(&gram(&got, rows, q), &identity(q));
        eprintln!("{what}: R {r_err:e}, R R⁻¹ {inv_err:e}, X R⁻¹ {q_err:e}, |QᵀQ - I| {ortho1:e} then {ortho2:e}");
        assert!(ortho2 <= 1e-5, "{what}: two passes leave |QᵀQ - I| = {ortho2:e}");
        assert!(max_abs_diff(&second.r, &identity(q)) <= 1e-3, "{what}: R₂ is not near I");
    }

    // Failures raise their bit and leave the panel as it was, inside one Gram tile and over two.
    // A first-pass panel is far from orthonormal, so the Gram check flags it (bit 1) while the
    // Cholesky succeeds.
    for q in [20, 40, 100] {
        let rows = 300;
        let x = panel_with_condition(&mut rng, rows, q, 1e3);
        let mut dx = upload(&dev, &x);
        assert_eq!(cholesky_qr_pass_cuda(&mut dx, rows, q, true).unwrap().flag, 1, "q = {q}");
        // A zero panel has no Cholesky factor (bit 2): R = R⁻¹ = I are written, X stays zero.
        let mut dz = upload(&dev, &vec![0.0; rows * q]);
        let zero = cholesky_qr_pass_cuda(&mut dz, rows, q, false).unwrap();
        assert_eq!(zero.flag, 2, "q = {q}");
        assert_eq!((zero.r.clone(), zero.r_inv.clone()), (identity(q), identity(q)), "q = {q}");
        assert!(download(&dz).iter().all(|&v| v == 0.0), "q = {q}");
        // A NaN makes the Gram non-finite: both bits, and X R⁻¹ with R⁻¹ = I keeps every other
        // row as it was (the NaN's own row is NaN · 0 in every column).
        let mut poisoned = x.clone();
        poisoned[17] = f32::NAN; // row 17, column 0
        let mut dn = upload(&dev, &poisoned);
        assert_eq!(cholesky_qr_pass_cuda(&mut dn, rows, q, true).unwrap().flag, 3, "q = {q}");
        for (idx, v) in download(&dn).into_iter().enumerate() {
            let (row, col) = (idx % rows, idx / rows);
            assert!(if row == 17 { v.is_nan() } else { v == x[idx] }, "q = {q}: [{row}, {col}] = {v}");
        }
    }

    let mut too_wide = upload(&dev, &vec![1.0; (limit + 1) * (limit + 1)]);
    let e = cholesky_qr_pass_cuda(&mut too_wide, limit + 1, limit + 1, false).unwrap_err().to_string();
    assert!(e.contains(&format!("exceeds this device's fused limit {limit}")), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn jacobi_core_matches_an_f64_svd() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let limit = jacobi_core_max_q(&dev);
    assert!(limit >= 32, "Jacobi limit {limit} on this device");
    // Odd q (a padding column), one and two columns, q = 32 and 33, and the limit; R is the
    // Cholesky factor of a panel with condition number 1e4, as the core sees it.
    for q in [1, 2, 7, 32, 33, limit - 1, limit] {
        let x = panel_with_condition(&mut rng, 2 * q, q, 1e4);
        let r = cholesky_upper(&gram(&x, 2 * q, q), q);
        let mut garbage_below = r.clone(); // the kernel must ignore the lower triangle
        (0..q * q).filter(|idx| idx % q > idx / q).for_each(|idx| garbage_below[idx] = 1e3);
        let core = jacobi_core_cuda(&dev, &garbage_below, q).unwrap();
        let what = format!("q = {q}");
        assert_eq!(core.info, 0, "{what}: no convergence or non-finite σ");

        let exact = faer::Mat::from_fn(q, q, |i, j| r[i + j * q]).thin_svd().unwrap();
        let want: Vec<f64> = exact.S().column_vector().iter().copied().collect(); // descending
        let got: Vec<f64> = core.sigma2.iter().rev().map(|s| s.sqrt()).collect();
        assert!(core.sigma2.windows(2).all(|w| w[0] <= w[1]), "{what}: σ² not ascending");
        let s_err = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w).fold(0.0, f64::max);
        // One-sided Jacobi keeps each σ's relative accuracy (a numpy model of the kernel: ≤ 3e-14).
        assert!(s_err <= 1e-12, "{what}: σ off by {s_err:e} relative");

        // V orthonormal, U = R V Σ⁻¹ orthonormal, and R = U Σ Vᵀ: a full SVD of R, not just
        // the right singular values.
        let v = faer::Mat::from_fn(q, q, |i, j| core.v[i + j * q]);
        let rm = faer::Mat::from_fn(q, q, |i, j| r[i + j * q]);
        let sigma: Vec<f64> = core.sigma2.iter().map(|s| s.sqrt()).collect();
        let rv = &rm * &v;
        let u = faer::Mat::from_fn(q, q, |i, j| rv[(i, j)] / sigma[j]);
        let eye = faer::Mat::<f64>::identity(q, q);
        let v_err = (v.transpose() * &v - &eye).norm_max();
        let u_err = (u.transpose() * &u - &eye).norm_max();
        let back = faer::Mat::from_fn(q, q, |i, j| (0..q).map(|l| u[(i, l)] * sigma[l] * v[(j, l)]).sum::<f64>());
        let r_err = (&back - &rm).norm_max() / want[0];
        eprintln!("{what}: σ {s_err:e}, |VᵀV - I| {v_err:e}, |UᵀU - I| {u_err:e}, |R - UΣVᵀ| {r_err:e}");
        // U inherits the stopping tolerance 1e-13 times cond(R) = 1e4 (the model: ≤ 7e-10).
        assert!(v_err <= 1e-12 && u_err <= 1e-8 && r_err <= 1e-12, "{what}: not an SVD");
    }

    // A NaN in R is reported (info 1); a q over the limit is refused.
    let mut poisoned = identity(5);
    poisoned[1 + 2 * 5] = f64::NAN; // (1, 2), above the diagonal
    assert_eq!(jacobi_core_cuda(&dev, &poisoned, 5).unwrap().info, 1);
    let e = jacobi_core_cuda(&dev, &identity(limit + 1), limit + 1).unwrap_err().to_string();
    assert!(e.contains(&format!("exceeds this device's Jacobi limit {limit}")), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn skinny_products_match_an_f64_reference() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    // (trans, m, k, q, offset of A in its buffer). The mma.sync kernel (q ≤ 32): both layouts,
    // q = 32 (its limit) and below, one split and many, ragged m and k (the 4-byte-copy variant
    // for k or m not a multiple of 4 and for a misaligned A), and a single element. The wgmma
    // kernel (q > 32 on Hopper): both layouts, both column tiles (64, 128) and several of them
    // (q = 200: a ragged second), ragged row tiles, splits, k not a multiple of the 32-step stage,
    // and m = 4 (one ragged row tile, a split reduction).
    let cases = [
        (false, 2048, 4096, 32, 0),
        (true, 4096, 2048, 32, 0),
        (false, 515, 1024, 20, 0),
        (true, 1024, 3000, 32, 0),
        (false, 700, 777, 31, 0),
        (true, 1001, 500, 17, 0),
        (false, 300, 2000, 32, 0),
        (true, 300, 129, 8, 1),
        (false, 129, 64, 7, 3),
        (false, 1, 1, 1, 0),
        (true, 1, 1, 1, 0),
        (false, 2048, 4096, 128, 0),
        (true, 4096, 2048, 128, 0),
        (false, 516, 1028, 33, 0),
        (true, 1000, 3004, 64, 0),
        (false, 700, 780, 100, 0),
        (true, 300, 132, 200, 0),
        (false, 4, 2048, 65, 0),
        (true, 260, 4, 128, 0),
    ];
    let wgmma = dev.arch().has_wgmma();
    for (trans, m, k, q, offset) in cases {
        let what = format!("trans {trans}, m {m}, k {k}, q {q}, offset {offset}");
        if q > 32 && !wgmma {
            eprintln!("{what}: skipped, no wgmma on this GPU (cuBLAS runs these)");
            continue;
        }
        // A sits between NaNs: a read outside it would poison the sums.
        let mut a_buf = vec![f32::NAN; offset + m * k + 64];
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        a_buf[offset..offset + m * k].copy_from_slice(&a);
        let v: Vec<f32> = (0..k * q).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let (a_dev, v_dev) = (upload(&dev, &a_buf), upload(&dev, &v));
        let mut plan = SkinnyProducts::new(&dev, trans, m, k, q).unwrap();
        assert_eq!(plan.kernel(), Some(if q > 32 { "wgmma" } else { "mma" }), "{what}");
        plan.ours(&a_dev, offset, &v_dev).unwrap();
        let run = plan.download().unwrap();
        assert!(run.tickets.iter().all(|&t| t == 0), "{what}: tickets left {:?}", run.tickets);
        // Again on the same buffers, which the first launch must have left ready.
        plan.ours(&a_dev, offset, &v_dev).unwrap();
        let again = plan.download().unwrap().out;
        let out = run.out;
        assert_eq!(out.len(), m * q, "{what}");
        assert!(out.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: reruns differ");
        let elem = |i: usize, l: usize| a[if trans { l * m + i } else { i * k + l }] as f64;
        let mut worst = 0.0f64;
        for j in 0..q {
            for i in 0..m {
                let (mut exact, mut scale) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let t = elem(i, l) * v[l + j * k] as f64;
                    exact += t;
                    scale += t.abs();
                }
                let got = out[i + j * m] as f64;
                assert!(got.is_finite(), "{what}: ({i}, {j}) = {got}");
                worst = worst.max((got - exact).abs() / scale.max(f64::MIN_POSITIVE));
            }
        }
        eprintln!("{what}: {} kernel, error {worst:e} of Σ|a||v|", if q > 32 { "wgmma" } else { "mma" });
        // 3xTF32 with f32 sums of k terms: measured ≤ 7e-7 of Σ|a||v| at k = 11008 (SGEMM:
        // ≤ 1.4e-7); an indexing error is O(1), a dropped lo term ~1e-3.
        assert!(worst <= 1e-5, "{what}: error {worst:e} of Σ|a||v|");
    }
    // q = 0 is no product; at q > 32 an A whose rows are not 16-byte aligned is left to cuBLAS.
    let (a, v) = (upload(&dev, &[1.0; 4]), upload(&dev, &[1.0; 2]));
    let e = SkinnyProducts::new(&dev, false, 2, 2, 0).unwrap().ours(&a, 0, &v).unwrap_err().to_string();
    assert!(e.contains("no kernel of ours takes q = 0"), "{e}");
    if wgmma {
        let (a, v) = (upload(&dev, &[1.0; 4 * 8 + 1]), upload(&dev, &[1.0; 8 * 33]));
        let e = SkinnyProducts::new(&dev, false, 4, 8, 33).unwrap().ours(&a, 1, &v).unwrap_err().to_string();
        assert!(e.contains("16-byte aligned rows only"), "{e}");
    }
}
