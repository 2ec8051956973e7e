//! LoRA-GA with tensors on a CUDA GPU, as far as it goes today: the gradient's randomized SVD
//! runs on the GPU (same Ω as the CPU) and feeds the CPU construction; vanilla LoRA's A and B are
//! made on the weight's device; adapters load onto GPU weights; and what runs only on the CPU so
//! far (the offset W − s·B·A, PiSSA) refuses GPU weights with an error naming the layer instead
//! of computing something wrong. Every test needs a CUDA GPU and fails without one.

mod common;

use common::loraga::*;
use common::spectra::{harmonic, test_seed, with_spectrum};
use loraga_core::cuda::CudaDevice;
use loraga_core::io::save_adapter;
use loraga_core::lora::{lora_a_name, lora_b_name};
use loraga_core::loraga::baselines::{lora_layer, pissa_layer};
use loraga_core::loraga::layer::{build, gradient_svd, lora_ga_layer};
use loraga_core::loraga::*;
use loraga_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

/// The same layer from G on the GPU and G on the CPU: the GPU randomized SVD (f32) against the
/// CPU one (f64), same Ω. G has a harmonic spectrum, so the top 2r triplets are separated by gaps
/// of ≥ 1/(2r(2r+1)) ≈ 1.5% of σ₁ and f32 rounding moves them by ~1e-6/1.5e-2: compared after
/// aligning signs (A's rows, B's columns carry one triplet each), relative error ≤ 1e-3.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gradient_svd_on_the_gpu_feeds_the_same_layer() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let (m, n, r) = (96, 64, 4);
    let g = Tensor::from_vec(with_spectrum(&mut rng, m, n, harmonic), [m, n], &Device::Cpu).unwrap();
    let w = Tensor::from_vec(loraga_core::testing::randn(&mut rng, m * n), [m, n], &Device::Cpu).unwrap();
    for variant in [Variant::Reference, Variant::Peft] {
        let cfg = LoraGaConfig { variant, seed: 42, ..Default::default() };
        let cpu = gradient_svd("layer.g", &g, r, &cfg).unwrap();
        let gpu_svd = gradient_svd("layer.g", &g.to_device(&dev).unwrap(), r, &cfg).unwrap();
        let e = loraga_core::testing::rel_error(gpu_svd.s(), &wide(cpu.s()));
        assert!(e < 1e-5, "{variant:?}: singular values {e:.2e}");
        let sel = Selection::new(cfg.direction, variant, r, cfg.seed, "layer");
        let a = build("layer", &w, &cpu, &sel, None, r, 2.0, &cfg).unwrap();
        let b = build("layer", &w, &gpu_svd, &sel, None, r, 2.0, &cfg).unwrap();
        // Sign of each triplet from the product of A's row (or B's column) with the CPU one.
        let (a1, a2, b1, b2) = (mat(&a.a), mat(&b.a), mat(&a.b), mat(&b.b));
        let fa = faer::Mat::from_fn(r, n, |k, j| {
            let d: f64 = (0..n).map(|t| a1[(k, t)] * a2[(k, t)]).sum();
            d.signum() * a2[(k, j)]
        });
        let fb = faer::Mat::from_fn(m, r, |i, k| {
            let d: f64 = (0..m).map(|t| b1[(t, k)] * b2[(t, k)]).sum();
            d.signum() * b2[(i, k)]
        });
        assert!(
            rel(&fa, &a1) < 1e-3 && rel(&fb, &b1) < 1e-3,
            "{variant:?}: A {:.2e} B {:.2e}",
            rel(&fa, &a1),
            rel(&fb, &b1)
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cpu_only_steps_refuse_gpu_weights_by_name() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let w = Tensor::from_vec(loraga_core::testing::randn(&mut rng, 24 * 16), [24, 16], &dev).unwrap();
    let g = Tensor::from_vec(loraga_core::testing::randn(&mut rng, 24 * 16), [24, 16], &dev).unwrap();
    let e =
        lora_ga_layer("model.layers.0.mlp.up_proj", &w, &g, 2, 1.0, &LoraGaConfig::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("CUDA device"), "{e}");
    let e = pissa_layer("model.layers.0.mlp.up_proj", &w, 2, 1.0, &PissaConfig::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("CUDA device"), "{e}");
    // Vanilla LoRA needs no host work: A and B are made on the weight's device.
    let l = lora_layer("up", &w, 2, &mut rng).unwrap();
    assert!(l.a.device().is_cuda() && l.b.device().is_cuda());
    let bound = 1.0 / 4.0;
    assert!(l.a.to_vec::<f32>().unwrap().iter().all(|x| x.abs() <= bound && *x != 0.0));
    assert!(l.b.to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
}

/// An adapter read onto a model whose base weights live on the GPU comes back on the GPU, exact.
#[test]
#[ignore = "needs a CUDA GPU"]
fn adapters_load_onto_gpu_weights() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let c = tiny_config();
    let (model, cpu_params) = random_model(&c, &mut rng);
    let lora = lora_config(2, 4.0, false);
    let mut gpu_params = loraga_core::autograd::Params::new();
    for p in cpu_params.iter() {
        gpu_params.insert(p.name(), p.value().to_device(&dev).unwrap(), false).unwrap();
    }
    let mut tensors = Vec::new();
    for m in target_modules(&c, &lora) {
        let w = cpu_params.get(&format!("{m}.weight")).unwrap();
        let l = lora_layer(&m, w, lora.r, &mut rng).unwrap();
        let b = Tensor::from_vec(
            loraga_core::testing::randn(&mut rng, w.dims()[0] * lora.r),
            [w.dims()[0], lora.r],
            &Device::Cpu,
        )
        .unwrap();
        tensors.push((lora_a_name(&m), l.a));
        tensors.push((lora_b_name(&m), b));
    }
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_adapter(dir.path().join("a"), &loraga_core::io::AdapterConfig::from_lora(&lora, None), &refs, &[]).unwrap();
    let (_, read) =
        loraga_core::io::read_adapter(dir.path().join("a")).unwrap().tensors_for(&model, &gpu_params).unwrap();
    for ((n1, t1), (n2, t2)) in read.iter().zip(&tensors) {
        assert_eq!(n1, n2);
        assert!(t1.device().is_cuda(), "{n1}");
        assert_eq!(t1.to_vec::<f32>().unwrap(), t2.to_vec::<f32>().unwrap(), "{n1}");
    }
}
