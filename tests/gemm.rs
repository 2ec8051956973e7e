//! GEMM correctness against the f64 CPU reference: the CPU backend everywhere, the CUDA paths
//! (naive kernel, cuBLAS) on a GPU. Every check draws fresh random operands, poisons the output
//! with NaN (or fills it with random C0 when beta != 0), and bounds ||out - ref|| / ||ref||.

mod common;

use common::{SHAPES, dims, problem};
use loraga_core::cuda::{CudaDevice, GemmPath};
use loraga_core::gemm::{Gemm, gemm, gemm_cuda};
use loraga_core::testing::rel_error;
use loraga_core::{DType, Device};
use rand::SeedableRng;

/// (input dtype, output dtype, bound on the relative error). fp32 accumulation of exact operand
/// values lands near 1e-6; a bf16 output adds its rounding (2^-9 relative, ~2e-3 in norm).
const CASES: &[(DType, DType, f64)] =
    &[(DType::F32, DType::F32, 1e-5), (DType::BF16, DType::F32, 1e-5), (DType::BF16, DType::BF16, 4e-3)];

fn variants() -> Vec<Gemm> {
    let mut v = Vec::new();
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        v.push(Gemm { trans_a, trans_b, alpha: 1.0, beta: 0.0, deterministic: false });
    }
    v.push(Gemm { trans_a: false, trans_b: true, alpha: 1.5, beta: 0.5, deterministic: false });
    v.push(Gemm { trans_a: true, trans_b: false, alpha: -0.25, beta: 1.0, deterministic: false });
    v
}

/// Runs every shape, layout and dtype case through `run` and checks the bound.
fn check_all(
    device: &Device,
    mut run: impl FnMut(&Gemm, &loraga_core::Tensor, &loraga_core::Tensor, &mut loraga_core::Tensor),
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for &(din, dout, bound) in CASES {
        for g in variants() {
            for &s in SHAPES {
                let p = problem(&mut rng, dims(s), g, din);
                let (a, b) = p.operands(device);
                let mut c = p.output(device, dout);
                run(&g, &a, &b, &mut c);
                let err = rel_error(&c.to_f32_vec().unwrap(), &p.reference);
                assert!(err <= bound, "{din}->{dout} {g:?} {s:?}: rel. error {err:.2e} > {bound:.0e} on {device}");
            }
        }
    }
}

#[test]
fn cpu_gemm_matches_f64_reference() {
    check_all(&Device::Cpu, |g, a, b, c| gemm(g, a, b, c).unwrap());
}

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn naive_kernel_matches_f64_reference() {
    check_all(&gpu(), |g, a, b, c| gemm_cuda(GemmPath::Naive, g, a, b, c).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cublas_matches_f64_reference() {
    check_all(&gpu(), |g, a, b, c| gemm_cuda(GemmPath::Cublas, g, a, b, c).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_gemm_rejects_bad_inputs_with_clear_errors() {
    let dev = gpu();
    let a = loraga_core::Tensor::zeros([4, 5], DType::F32, &dev).unwrap();
    let b = loraga_core::Tensor::zeros([6, 7], DType::F32, &dev).unwrap();
    let mut c = loraga_core::Tensor::zeros([4, 7], DType::F32, &dev).unwrap();
    let e = gemm_cuda(GemmPath::Naive, &Gemm::default(), &a, &b, &mut c).unwrap_err().to_string();
    assert!(e.contains("inner dimensions differ"), "{e}");
    let b16 = loraga_core::Tensor::zeros([5, 7], DType::BF16, &dev).unwrap();
    let e = gemm_cuda(GemmPath::Naive, &Gemm::default(), &a, &b16, &mut c).unwrap_err().to_string();
    assert!(e.contains("A is f32 but B is bf16"), "{e}");
    let cpu_b = loraga_core::Tensor::zeros([5, 7], DType::F32, &Device::Cpu).unwrap();
    let e = gemm(&Gemm::default(), &a, &cpu_b, &mut c).unwrap_err().to_string();
    assert!(e.contains("different devices"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cublaslt_matches_f64_reference_for_bf16() {
    let dev = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x17);
    for g in variants() {
        for &s in SHAPES {
            let p = problem(&mut rng, dims(s), g, DType::BF16);
            let (a, b) = p.operands(&dev);
            let mut c = p.output(&dev, DType::BF16);
            gemm_cuda(GemmPath::CublasLt, &g, &a, &b, &mut c).unwrap();
            let err = rel_error(&c.to_f32_vec().unwrap(), &p.reference);
            assert!(err <= 4e-3, "{g:?} {s:?}: rel. error {err:.2e}");
        }
    }
    let p = problem(&mut rng, dims((8, 8, 8)), Gemm::default(), DType::F32);
    let (a, b) = p.operands(&dev);
    let mut c = p.output(&dev, DType::F32);
    let e = gemm_cuda(GemmPath::CublasLt, &Gemm::default(), &a, &b, &mut c).unwrap_err().to_string();
    assert!(e.contains("bf16"), "{e}");
}
