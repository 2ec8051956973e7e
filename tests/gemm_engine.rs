//! The Hopper GEMM engine (kernels/gemm_sm90.cu) against the f64 CPU reference: ragged M and N,
//! K that is not a multiple of the 64-wide K tile, bf16 and f32 outputs, alpha/beta including
//! in-place fp32 accumulation, and two K sources in one K loop.

mod common;

use common::problem;
use half::bf16;
use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::gemm_sm90::{self, KSource};
use loraga_core::cuda::{CudaDevice, CudaStorage, GemmPath};
use loraga_core::gemm::{Gemm, GemmDims, gemm_cuda};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Storage, Tensor};
use rand::SeedableRng;

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

/// Ragged M, N and K; most shapes are aligned for every layout (M, N, K multiples of 8) but not
/// for the tiles (128 x 256 x 64), and a few are not aligned for some layouts.
const SHAPES: &[(usize, usize, usize)] = &[
    (8, 8, 8),
    (128, 256, 64),
    (136, 264, 72),
    (304, 72, 520),
    (1000, 600, 8),
    (80, 1032, 1000),
    (2048, 2304, 1024),
    (520, 4096, 136),
    (129, 257, 72),
    (77, 1031, 1000),
    (1, 1, 8),
];

/// Every layout: (trans_a, trans_b) as in `Gemm`.
const LAYOUTS: [(bool, bool); 4] = [(false, true), (false, false), (true, false), (true, true)];

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_matches_f64_reference_in_every_layout() {
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xe9);
    let mut checked = 0;
    for (trans_a, trans_b) in LAYOUTS {
        let gemms = [
            Gemm { trans_a, trans_b, alpha: 1.0, beta: 0.0 },
            Gemm { trans_a, trans_b, alpha: 0.75, beta: 1.0 },
            Gemm { trans_a, trans_b, alpha: -2.0, beta: 0.5 },
        ];
        for (dout, bound) in [(DType::F32, 1e-5), (DType::BF16, 4e-3)] {
            for g in gemms {
                for &(m, n, k) in SHAPES {
                    let p = problem(&mut rng, GemmDims { m, n, k }, g, DType::BF16);
                    let (a, b) = p.operands(&dev);
                    let mut c = p.output(&dev, dout);
                    // The contiguous dimension of each operand must be a multiple of 8.
                    let aligned = [(k, !trans_a || trans_b), (m, trans_a), (n, !trans_b)];
                    if aligned.iter().any(|&(v, applies)| applies && v % 8 != 0) {
                        let e = gemm_cuda(GemmPath::Engine, &g, &a, &b, &mut c).unwrap_err().to_string();
                        assert!(e.contains("not a multiple of 8"), "{e}");
                        continue;
                    }
                    gemm_cuda(GemmPath::Engine, &g, &a, &b, &mut c).unwrap();
                    let err = rel_error(&c.to_f32_vec().unwrap(), &p.reference);
                    assert!(err <= bound, "bf16->{dout} {g:?} ({m}, {n}, {k}): rel. error {err:.2e} > {bound:.0e}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 4 * 6 * 6, "only {checked} engine cases ran");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn repeated_accumulation_in_place_matches_the_sum() {
    // G += dY^T X style: the same f32 C accumulated over several GEMMs (beta = 1).
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (m, n, k) = (384, 520, 264);
    let mut c = Tensor::full([m, n], DType::F32, 0.0, &dev).unwrap();
    let mut reference = vec![0.0f64; m * n];
    let g = Gemm { trans_a: false, trans_b: true, alpha: 0.5, beta: 1.0 };
    for _ in 0..4 {
        let p = problem(&mut rng, GemmDims { m, n, k }, Gemm { beta: 0.0, ..g }, DType::BF16);
        let (a, b) = p.operands(&dev);
        gemm_cuda(GemmPath::Engine, &g, &a, &b, &mut c).unwrap();
        // p.reference is already alpha * A B^T (the problem was built with alpha = 0.5).
        for (r, x) in reference.iter_mut().zip(&p.reference) {
            *r += x;
        }
    }
    let err = rel_error(&c.to_f32_vec().unwrap(), &reference);
    assert!(err <= 1e-5, "rel. error {err:.2e}");
}

fn bf16_tensor(rng: &mut impl rand::Rng, rows: usize, cols: usize, dev: &Device) -> (Tensor, Vec<f64>) {
    let v: Vec<bf16> = randn(rng, rows * cols).into_iter().map(bf16::from_f32).collect();
    let wide = v.iter().map(|x| x.to_f64()).collect();
    (Tensor::from_cpu(CpuStorage::BF16(v), [rows, cols].into(), dev).unwrap(), wide)
}

fn cuda(t: &Tensor) -> &CudaStorage {
    match t.storage() {
        Storage::Cuda(s) => s,
        Storage::Cpu(_) => panic!("expected a device tensor"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn two_k_sources_equal_the_concatenated_gemm() {
    // The LoRA forward [X | U] [W | B]^T (trans_b) and backward [dY | V] [W ; A] (plain B), with a
    // ragged first K so the sources meet mid-tile.
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for trans_b in [true, false] {
        for &(m, n, k1, k2) in &[(300, 520, 200, 16), (1024, 768, 4096, 64), (65, 256, 8, 128)] {
            let b_dims = |k: usize| if trans_b { (n, k) } else { (k, n) };
            let (x, x64) = bf16_tensor(&mut rng, m, k1, &dev);
            let (w, w64) = bf16_tensor(&mut rng, b_dims(k1).0, b_dims(k1).1, &dev);
            let (u, u64_) = bf16_tensor(&mut rng, m, k2, &dev);
            let (bm, b64) = bf16_tensor(&mut rng, b_dims(k2).0, b_dims(k2).1, &dev);
            let mut reference = vec![0.0f64; m * n];
            let g = Gemm { trans_a: false, trans_b, alpha: 1.0, beta: 0.0 };
            let d = |k| GemmDims { m, n, k };
            loraga_core::cpu::gemm::gemm_f64(&g, d(k1), &x64, &w64, &mut reference);
            loraga_core::cpu::gemm::gemm_f64(&Gemm { beta: 1.0, ..g }, d(k2), &u64_, &b64, &mut reference);

            let mut c = Tensor::full([m, n], DType::F32, f32::NAN, &dev).unwrap();
            let sources = [KSource { a: cuda(&x), b: cuda(&w), k: k1 }, KSource { a: cuda(&u), b: cuda(&bm), k: k2 }];
            let Storage::Cuda(cs) = c.storage_mut() else { unreachable!() };
            gemm_sm90::gemm(&g, &sources, m, n, cs).unwrap();
            let err = rel_error(&c.to_f32_vec().unwrap(), &reference);
            assert!(err <= 1e-5, "trans_b = {trans_b} ({m}, {n}, {k1}+{k2}): rel. error {err:.2e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_refuses_what_it_cannot_do_and_auto_falls_back() {
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // K = 100 is not a multiple of 8.
    let g = Gemm { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    let p = problem(&mut rng, GemmDims { m: 70, n: 90, k: 100 }, g, DType::BF16);
    let (a, b) = p.operands(&dev);
    let mut c = p.output(&dev, DType::F32);
    let e = gemm_cuda(GemmPath::Engine, &g, &a, &b, &mut c).unwrap_err().to_string();
    assert!(e.contains("not a multiple of 8"), "{e}");
    gemm_cuda(GemmPath::Auto, &g, &a, &b, &mut c).unwrap();
    assert!(rel_error(&c.to_f32_vec().unwrap(), &p.reference) <= 1e-5);
    // A plain B [K, N] is read along N: N = 90 is not a multiple of 8.
    let nn = Gemm { trans_b: false, ..g };
    let p = problem(&mut rng, GemmDims { m: 64, n: 90, k: 64 }, nn, DType::BF16);
    let (a, b) = p.operands(&dev);
    let mut c = p.output(&dev, DType::F32);
    let e = gemm_cuda(GemmPath::Engine, &nn, &a, &b, &mut c).unwrap_err().to_string();
    assert!(e.contains("N = 90 is not a multiple of 8"), "{e}");
    // f32 operands go to the naive kernel under Auto.
    let p = problem(&mut rng, GemmDims { m: 64, n: 64, k: 64 }, g, DType::F32);
    let (a, b) = p.operands(&dev);
    let mut c = p.output(&dev, DType::F32);
    gemm_cuda(GemmPath::Auto, &g, &a, &b, &mut c).unwrap();
    assert!(rel_error(&c.to_f32_vec().unwrap(), &p.reference) <= 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn skinny_f32_products_split_k_and_still_match() {
    // Few output tiles and a long K: the engine splits K over the idle SMs and adds the slices
    // into C (zeroed first when beta == 0), as for LoRA's dA [r, K] and dB [N, r].
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    for &(m, n, k, trans_a, trans_b) in &[
        (16, 1024, 4096, true, false),
        (1024, 16, 4096, true, false),
        (8, 520, 2048, false, true),
        (64, 4096, 8192, true, false),
    ] {
        for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0)] {
            let g = Gemm { trans_a, trans_b, alpha, beta };
            let p = problem(&mut rng, GemmDims { m, n, k }, g, DType::BF16);
            let (a, b) = p.operands(&dev);
            let mut c = p.output(&dev, DType::F32);
            gemm_cuda(GemmPath::Engine, &g, &a, &b, &mut c).unwrap();
            let err = rel_error(&c.to_f32_vec().unwrap(), &p.reference);
            assert!(err <= 1e-5, "{g:?} ({m}, {n}, {k}): rel. error {err:.2e}");
        }
    }
}
