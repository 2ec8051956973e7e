//! LoRA-GA with the model on a CUDA GPU, against the CPU path: the gradient estimate (device and
//! host accumulators), the randomized SVD on the device feeding the same layer, the
//! initialisation (offset GEMM on the device; the first-step construction and the logits), the
//! saved state restored onto GPU weights, adapters loaded onto GPU weights, and the host-only
//! steps (exact SVDs) refusing GPU tensors by name. Every test needs a CUDA GPU and fails
//! without one.

mod common;

use common::loraga::*;
use common::spectra::{harmonic, test_seed, with_spectrum};
use faer::Mat;
use loraga_core::autograd::{GradSinks, Params, Tape};
use loraga_core::cuda::CudaDevice;
use loraga_core::io::{AdapterConfig, read_adapter, save_adapter};
use loraga_core::linalg::{MatrixRef, svd_exact};
use loraga_core::lora::{lora_a_name, lora_b_name};
use loraga_core::loraga::baselines::{lora_layer, pissa_layer};
use loraga_core::loraga::layer::{build, gradient_svd, lora_ga_layer};
use loraga_core::loraga::*;
use loraga_core::model::Llama;
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

fn on(p: &Params, dev: &Device) -> Params {
    let mut out = Params::new();
    for x in p.iter() {
        out.insert(x.name(), x.value().to_device(dev).unwrap(), x.trainable()).unwrap();
    }
    out
}

/// A tiny model (weights on the CPU), batches, the targets and the CPU's f32 estimate.
struct Case {
    model: Llama,
    cpu: Params,
    batches: Vec<loraga_core::model::Batch>,
    targets: Vec<String>,
    want: GradientEstimate,
}

fn case() -> Case {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let c = tiny_config();
    let (model, mut cpu) = random_model(&c, &mut rng);
    let batches = random_batches(&c, &mut rng, 3, 7);
    let targets = target_weights(&c, &lora_config(1, 1.0, false));
    let want = estimate_gradients(&model, &mut cpu, targets.clone(), &batches, &EstimateOptions::default()).unwrap();
    Case { model, cpu, batches, targets, want }
}

/// Each layer's estimate against the CPU's, relative error under `tol`.
fn check_estimate(what: &str, got: &GradientEstimate, c: &Case, tol: f64) {
    for t in &c.targets {
        let (a, b) = (got.get(t).unwrap(), c.want.get(t).unwrap());
        assert_eq!(a.dtype(), loraga_core::DType::F32, "{what} {t}");
        let e = rel_error(&a.to_vec::<f32>().unwrap(), &wide(&b.to_vec::<f32>().unwrap()));
        eprintln!("{what} {t}: relative error {e:.2e}");
        assert!(e < tol, "{what} {t}: {e:.2e}");
    }
}

/// The gradient estimate of a model on the GPU (f32) equals the CPU's up to f32 rounding in
/// another order: relative error ≤ 1e-4 per layer (the model-parity tolerance; the per-op GPU
/// checks hold 1e-5, and these gradients are sums whose terms partly cancel, e.g. through the
/// softmax for q/k), with device or host accumulators.
#[test]
#[ignore = "needs a CUDA GPU"]
fn estimation_on_the_gpu_matches_the_cpu() {
    let dev = gpu();
    let c = case();
    for placement in [AccumulatorPlacement::Device, AccumulatorPlacement::Host] {
        let mut g = on(&c.cpu, &dev);
        let opts = EstimateOptions { placement, memory_budget: None };
        let est = GradientEstimator::new(&g, c.targets.clone(), &opts).unwrap();
        assert_eq!(est.memory().device.is_cuda(), placement == AccumulatorPlacement::Device);
        let got = estimate_gradients(&c.model, &mut g, c.targets.clone(), &c.batches, &opts).unwrap();
        for t in &c.targets {
            assert_eq!(got.get(t).unwrap().device().is_cuda(), placement == AccumulatorPlacement::Device, "{t}");
        }
        check_estimate(&format!("{placement:?}"), &got, &c, 1e-4);
    }
}

/// The bound of a bf16-activation estimate against the f32 CPU one: see [`estimation_in_mixed_precision`].
const BF16_TOL: f64 = 3e-1;

/// Mixed precision (bf16 activations over f32 master weights on the GPU): the estimate is f32,
/// within bf16 rounding of the CPU's f32 one. Weight gradients are sums over tokens of products of
/// bf16-rounded activations and upstream gradients, as the LoRA gradients of the bf16 Llama parity
/// test (measured 4-6e-2 there). Here, the worst layer over 25 seeds (LORAGA_TEST_SEED=1..=24 and
/// one from the clock, H200, 2026-11-29): median 4.1e-2, then 6.3e-2, 8.6e-2, 1.04e-1 (seed 12) and
/// 1.63e-1 (seed 1795977461716919807), mostly q_proj of layer 0, whose gradient goes through the
/// softmax's cancellations. Bound 3e-1, twice the worst seen (it was 1e-1, set from one seed, and
/// failed those two): a wrong gradient is off by O(1).
#[test]
#[ignore = "needs a CUDA GPU"]
fn estimation_in_mixed_precision() {
    let dev = gpu();
    let mut c = case();
    c.model.dtype = loraga_core::DType::BF16;
    let mut g = on(&c.cpu, &dev);
    let got = estimate_gradients(&c.model, &mut g, c.targets.clone(), &c.batches, &EstimateOptions::default()).unwrap();
    check_estimate("bf16 activations", &got, &c, BF16_TOL);
}

/// The plain tape's gradients on the CPU, summed over the batches and divided by their count:
/// a reference independent of the estimator (no sink, no hook).
fn tape_mean(c: &Case) -> Vec<Vec<f64>> {
    let mut p = on(&c.cpu, &Device::Cpu);
    for x in c.cpu.iter() {
        p.set_trainable(x.name(), c.targets.iter().any(|t| t == x.name())).unwrap();
    }
    for b in &c.batches {
        let mut tape = Tape::new();
        let out = c.model.forward(&mut tape, &p, b).unwrap();
        tape.backward(out.loss.unwrap(), &mut p, None).unwrap();
    }
    let n = c.batches.len() as f64;
    c.targets
        .iter()
        .map(|t| wide(&p.grad(t).unwrap().unwrap().to_vec::<f32>().unwrap()).iter().map(|g| g / n).collect())
        .collect()
}

/// Device accumulators are gradient sinks (the linear backward adds dYᵀX into them in place,
/// no dW tensor); host accumulators take each materialised dW through the hook. Over 3 batches,
/// with f32 and with bf16 activations: the sink estimate equals the hook path's up to fp32
/// summation order (same dY and X: 1e-5), the plain CPU tape's mean at that dtype's bound (f32
/// 1e-4, bf16 BF16_TOL as above), and a second sink run bit for bit. A sink buffer off the weight's
/// device is an error naming the weight.
#[test]
#[ignore = "needs a CUDA GPU"]
fn estimation_through_sinks_matches_the_hook_path_and_the_cpu_tape() {
    let dev = gpu();
    let mut c = case();
    let reference = tape_mean(&c);
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, BF16_TOL)] {
        c.model.dtype = dtype;
        let run = |placement| {
            let mut g = on(&c.cpu, &dev);
            let opts = EstimateOptions { placement, memory_budget: None };
            estimate_gradients(&c.model, &mut g, c.targets.clone(), &c.batches, &opts).unwrap()
        };
        let (sunk, again, hooked) =
            (run(AccumulatorPlacement::Device), run(AccumulatorPlacement::Device), run(AccumulatorPlacement::Host));
        for (t, want) in c.targets.iter().zip(&reference) {
            let got = sunk.get(t).unwrap();
            assert!(got.device().is_cuda() && got.dtype() == DType::F32, "{dtype} {t}");
            let got = got.to_vec::<f32>().unwrap();
            assert_eq!(got, again.get(t).unwrap().to_vec::<f32>().unwrap(), "{dtype} {t}: a second run differs");
            let e_hook = rel_error(&got, &wide(&hooked.get(t).unwrap().to_vec::<f32>().unwrap()));
            let e_cpu = rel_error(&got, want);
            eprintln!("{dtype} {t}: sink vs hook {e_hook:.2e}, vs CPU tape {e_cpu:.2e}");
            assert!(e_hook < 1e-5, "{dtype} {t}: sink vs hook path {e_hook:.2e}");
            assert!(e_cpu < tol, "{dtype} {t}: sink vs CPU tape {e_cpu:.2e}");
        }
    }
    let g = on(&c.cpu, &dev);
    let name = &c.targets[0];
    let mut host = Tensor::zeros(g.get(name).unwrap().dims(), DType::F32, &Device::Cpu).unwrap();
    let e = GradSinks::new().insert(&g, name, &mut host, 1.0).unwrap_err().to_string();
    assert!(e.contains(name.as_str()) && e.contains("on cpu"), "{e}");
}

/// LoRA-GA on a GPU model, end to end: A, B and W_frz on the device; W_frz + s·B·A = W0 to f32
/// rounding (1e-6); the construction s²(G A0ᵀA0 + B0 B0ᵀ G) = s²c²·G_2r as on the CPU (r = 4, so
/// q = min(m, n) and the randomized SVD is exact but for its f32 rounding, which moves a triplet
/// by ~1e-7·σ₁/gap: tolerance 1e-5·(1 + σ₁/smallest gap among the top 2r + 1)); logits unchanged
/// (1e-5). Then the saved state, restored onto the GPU weights, gives the same W_frz.
#[test]
#[ignore = "needs a CUDA GPU"]
fn initialisation_on_the_gpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let c = tiny_config();
    let (model0, cpu) = random_model(&c, &mut rng);
    let batches = random_batches(&c, &mut rng, 3, 7);
    let lora = lora_config(4, 8.0, true);
    let mut w0 = on(&cpu, &dev);
    let grads =
        estimate_gradients(&model0, &mut w0, target_weights(&c, &lora), &batches, &EstimateOptions::default()).unwrap();
    let methods = [
        InitMethod::LoraGa(LoraGaConfig::default()),
        InitMethod::LoraGa(LoraGaConfig::peft()),
        InitMethod::Pissa(PissaConfig { svd: PissaSvd::Fast { niter: 4 }, seed: 1, adapter_dtype: None }),
        InitMethod::Lora { seed: 2 },
    ];
    for method in methods {
        let mut model = Llama::new(c.clone()).unwrap();
        let mut p = on(&cpu, &dev);
        let state = initialize(&mut model, &mut p, lora.clone(), &method, Some(&grads)).unwrap();
        let s = state.scaling();
        for l in &state.layers {
            let name = format!("{}.weight", l.module);
            let frz = p.get(&name).unwrap();
            assert!(frz.device().is_cuda() && l.a.device().is_cuda() && l.b.device().is_cuda(), "{method:?} {name}");
            let (a0, b0) = (mat(&l.a), mat(&l.b));
            let e = rel(&(mat(frz) + scaled(&(&b0 * &a0), s)), &mat(w0.get(&name).unwrap()));
            assert!(e < 1e-6, "{method:?} {name}: W_frz + sBA vs W0 {e:.2e}");
            if method == InitMethod::LoraGa(LoraGaConfig::default()) {
                let g = mat(grads.get(&name).unwrap());
                let gv = grads.get(&name).unwrap().to_vec::<f32>().unwrap();
                let k = 9.min(g.nrows()).min(g.ncols());
                let exact = svd_exact(&name, MatrixRef::new(&gv, g.nrows(), g.ncols()).unwrap(), k).unwrap();
                let sv = exact.s();
                let gap = (1..k).map(|i| (sv[i - 1] - sv[i]) as f64).fold(f64::INFINITY, f64::min);
                let tol = 1e-5 * (1.0 + sv[0] as f64 / gap);
                let nn = exact.cols();
                let g2r = Mat::from_fn(g.nrows(), nn, |i, j| {
                    (0..8).map(|t| sv[t] as f64 * exact.u()[i * k + t] as f64 * exact.vt()[t * nn + j] as f64).sum()
                });
                let c2 = (g.nrows() as f64).sqrt() / 16.0;
                let built = scaled(&(&g * a0.transpose() * &a0 + &b0 * b0.transpose() * &g), s * s);
                let e = rel(&built, &scaled(&g2r, s * s * c2));
                assert!(e < tol, "{name}: first-step construction {e:.2e} (tolerance {tol:.1e})");
            }
        }
        for b in &batches {
            let e = rel_error(&logits(&model, &p, b), &wide(&logits(&model0, &w0, b)));
            assert!(e < 1e-5, "{method:?}: logits {e:.2e}");
        }
        let dir = tempfile::tempdir().unwrap();
        state.save(dir.path().join("state")).unwrap();
        let mut model2 = Llama::new(c.clone()).unwrap();
        let mut p2 = on(&cpu, &dev);
        InitState::load(dir.path().join("state")).unwrap().restore(&mut model2, &mut p2).unwrap();
        for l in &state.layers {
            let name = format!("{}.weight", l.module);
            let (x, y) = (p.get(&name).unwrap(), p2.get(&name).unwrap());
            assert!(y.device().is_cuda(), "{name}");
            let e = rel_error(&y.to_vec::<f32>().unwrap(), &wide(&x.to_vec::<f32>().unwrap()));
            assert!(e < 1e-7, "{method:?} {name}: restored W_frz {e:.2e}");
        }
    }
}

/// The same layer from G on the GPU and G on the CPU: the GPU randomized SVD (f32) against the
/// CPU one (f64), same Ω. G has a harmonic spectrum, so the top 2r triplets are separated by gaps
/// of ≥ 1/(2r(2r+1)) ≈ 1.4% of σ₁ and f32 rounding moves them by ~1e-6/1.4e-2: compared after
/// aligning signs (A's rows, B's columns carry one triplet each), relative error ≤ 1e-3.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gradient_svd_on_the_gpu_feeds_the_same_layer() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let (m, n, r) = (96, 64, 4);
    let g = Tensor::from_vec(with_spectrum(&mut rng, m, n, harmonic), [m, n], &Device::Cpu).unwrap();
    let w = Tensor::from_vec(randn(&mut rng, m * n), [m, n], &Device::Cpu).unwrap();
    for variant in [Variant::Reference, Variant::Peft] {
        let cfg = LoraGaConfig { variant, seed: 42, ..Default::default() };
        let cpu = gradient_svd("layer.g", &g, r, &cfg).unwrap();
        let gpu_svd = gradient_svd("layer.g", &g.to_device(&dev).unwrap(), r, &cfg).unwrap();
        let e = rel_error(gpu_svd.s(), &wide(cpu.s()));
        assert!(e < 1e-5, "{variant:?}: singular values {e:.2e}");
        let sel = Selection::new(cfg.direction, variant, r, cfg.seed, "layer");
        let a = build("layer", &w, &cpu, &sel, None, r, 2.0, &cfg).unwrap();
        let b = build("layer", &w, &gpu_svd, &sel, None, r, 2.0, &cfg).unwrap();
        let (a1, a2, b1, b2) = (mat(&a.a), mat(&b.a), mat(&a.b), mat(&b.b));
        let fa = Mat::from_fn(r, n, |k, j| (0..n).map(|t| a1[(k, t)] * a2[(k, t)]).sum::<f64>().signum() * a2[(k, j)]);
        let fb = Mat::from_fn(m, r, |i, k| (0..m).map(|t| b1[(t, k)] * b2[(t, k)]).sum::<f64>().signum() * b2[(i, k)]);
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
fn host_only_steps_refuse_gpu_tensors_by_name() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    let w = Tensor::from_vec(randn(&mut rng, 24 * 16), [24, 16], &dev).unwrap();
    let g = Tensor::from_vec(randn(&mut rng, 24 * 16), [24, 16], &dev).unwrap();
    let exact = LoraGaConfig { svd: SvdMethod::Exact, ..Default::default() };
    let e = lora_ga_layer("model.layers.0.mlp.up_proj", &w, &g, 2, 1.0, &exact).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("CUDA device"), "{e}");
    let e = pissa_layer("model.layers.0.mlp.up_proj", &w, 2, 1.0, &PissaConfig::default()).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("CUDA device"), "{e}");
    // Vanilla LoRA needs no host work: A and B are made on the weight's device.
    let l = lora_layer("up", &w, 2, &mut rng).unwrap();
    assert!(l.a.device().is_cuda() && l.b.device().is_cuda());
    assert!(l.a.to_vec::<f32>().unwrap().iter().all(|x| x.abs() <= 0.25 && *x != 0.0));
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
    let gpu_params = on(&cpu_params, &dev);
    let mut tensors = Vec::new();
    for m in target_modules(&c, &lora) {
        let w = cpu_params.get(&format!("{m}.weight")).unwrap();
        let l = lora_layer(&m, w, lora.r, &mut rng).unwrap();
        let out = w.dims()[0];
        let b = Tensor::from_vec(randn(&mut rng, out * lora.r), [out, lora.r], &Device::Cpu).unwrap();
        tensors.push((lora_a_name(&m), l.a));
        tensors.push((lora_b_name(&m), b));
    }
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_adapter(dir.path().join("a"), &AdapterConfig::from_lora(&lora, None), &refs, &[]).unwrap();
    let (_, read) = read_adapter(dir.path().join("a")).unwrap().tensors_for(&model, &gpu_params).unwrap();
    for ((n1, t1), (n2, t2)) in read.iter().zip(&tensors) {
        assert_eq!(n1, n2);
        assert!(t1.device().is_cuda(), "{n1}");
        assert_eq!(t1.to_vec::<f32>().unwrap(), t2.to_vec::<f32>().unwrap(), "{n1}");
    }
}
