//! The GPU optimizers (kernels/adamw.cu, kernels/grad_norm.cu) against the CPU implementation on
//! the same random inputs: several tensors at once (one multi-tensor launch), sizes that are not
//! multiples of the 4096-element chunks or of the 256-thread blocks, f32 and bf16 gradients.
//! The CPU and GPU paths perform the same rounded f32 operations, so they should agree exactly;
//! the bound is the brief's 1e-6 relative error. Every element of every tensor changes in every
//! step (random non-zero gradients), so an element the kernel skipped keeps its old value and
//! fails the comparison: the in-place update is its own poison.
//!
//! Every test needs a CUDA GPU and fails without one (run with `--include-ignored`). Inputs are
//! fresh each run: the seed comes from the clock (or LORAGA_TEST_SEED to replay a failure).

mod common;

use common::spectra::test_seed;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use loraga_core::autograd::Params;
use loraga_core::cuda::CudaDevice;
use loraga_core::optim::{AdamW, AdamWConfig, clip_grad_norm};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Tensor};

const TOL: f64 = 1e-6;

/// Ragged sizes: one element, under a block, under a chunk, just over one chunk, several chunks.
const SHAPES: [(&str, &[usize]); 6] = [
    ("layers.0.q_proj.lora_A.weight", &[1]),
    ("layers.0.q_proj.lora_B.weight", &[7, 13]),
    ("layers.0.norm.bias", &[577]),
    ("layers.1.v_proj.lora_A.weight", &[4097]),
    ("layers.1.v_proj.lora_B.weight", &[3, 4101]),
    ("lm_head.weight", &[5, 7, 611]),
];

fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// The GPU, a fresh random generator, and the same random parameters on the CPU and the GPU.
struct Setup {
    dev: Device,
    rng: StdRng,
    cpu: Params,
    gpu: Params,
}

fn setup() -> Setup {
    let dev = Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"));
    let mut rng = StdRng::seed_from_u64(test_seed());
    let (mut cpu, mut gpu) = (Params::new(), Params::new());
    for (name, dims) in SHAPES {
        let v = randn(&mut rng, numel(dims));
        cpu.insert(name, Tensor::from_vec(v.clone(), dims.to_vec(), &Device::Cpu).unwrap(), true).unwrap();
        gpu.insert(name, Tensor::from_vec(v, dims.to_vec(), &dev).unwrap(), true).unwrap();
    }
    Setup { dev, rng, cpu, gpu }
}

/// A random gradient, f32 or bf16, on the CPU and the GPU; `scale` spreads magnitudes.
fn twin_grad(rng: &mut StdRng, dims: &[usize], bf16_grad: bool, scale: f32, gpu: &Device) -> (Tensor, Tensor) {
    let v: Vec<f32> = randn(rng, numel(dims)).iter().map(|x| x * scale).collect();
    let t = if bf16_grad {
        let h: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
        Tensor::from_vec(h, dims.to_vec(), &Device::Cpu).unwrap()
    } else {
        Tensor::from_vec(v, dims.to_vec(), &Device::Cpu).unwrap()
    };
    let d = t.to_device(gpu).unwrap();
    (t, d)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

fn compare(what: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (host(got), host(want));
    let wide: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let e = rel_error(&g, &wide);
    let max_diff = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("{what}: rel error {e:.3e}, max |diff| {max_diff:.3e}");
    assert!(e <= TOL, "{what}: GPU vs CPU rel error {e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_cuda_matches_the_cpu_path() {
    let Setup { dev, mut rng, mut cpu, gpu: mut gpu_params } = setup();
    let config = AdamWConfig { lr: 1e-2, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.05 };
    let no_decay = |n: &str| n.ends_with(".bias");
    let mut opt_cpu = AdamW::new(config).unwrap().with_no_decay(no_decay);
    let mut opt_gpu = AdamW::new(config).unwrap().with_no_decay(no_decay);
    for step in 0..5 {
        opt_cpu.set_lr(1e-2 * (1.0 - 0.1 * step as f64)).unwrap();
        opt_gpu.set_lr(1e-2 * (1.0 - 0.1 * step as f64)).unwrap();
        for (k, (name, dims)) in SHAPES.iter().enumerate() {
            // The second tensor sits out odd steps: its step count, and bias correction, lag.
            if k == 1 && step % 2 == 1 {
                continue;
            }
            let scale = 10f32.powi(rng.random_range(-3..2));
            let (c, g) = twin_grad(&mut rng, dims, (k + step) % 2 == 0, scale, &dev);
            cpu.set_grad(name, Some(c)).unwrap();
            gpu_params.set_grad(name, Some(g)).unwrap();
        }
        opt_cpu.step(&mut cpu).unwrap();
        opt_gpu.step(&mut gpu_params).unwrap();
        cpu.zero_grad();
        gpu_params.zero_grad();
    }
    for (name, _) in SHAPES {
        let (sc, sg) = (opt_cpu.state(name).unwrap(), opt_gpu.state(name).unwrap());
        assert_eq!(sc.step(), sg.step(), "{name}");
        assert!(sg.exp_avg().device().is_cuda() && sg.exp_avg().dtype() == DType::F32);
        compare(&format!("{name} param"), gpu_params.get(name).unwrap(), cpu.get(name).unwrap());
        compare(&format!("{name} exp_avg"), sg.exp_avg(), sc.exp_avg());
        compare(&format!("{name} exp_avg_sq"), sg.exp_avg_sq(), sc.exp_avg_sq());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_cuda_rejects_a_nonfinite_gradient_before_touching_anything() {
    let Setup { dev, mut rng, gpu: mut params, .. } = setup();
    let mut opt = AdamW::new(AdamWConfig::new(1e-2)).unwrap();
    let before: Vec<Vec<f32>> = SHAPES.iter().map(|(n, _)| host(params.get(n).unwrap())).collect();
    for (k, (name, dims)) in SHAPES.iter().enumerate() {
        let mut v = randn(&mut rng, numel(dims));
        if k == 4 {
            v[4101 + 7] = f32::NAN; // row 1, column 7 of [3, 4101]
        }
        params.set_grad(name, Some(Tensor::from_vec(v, dims.to_vec(), &dev).unwrap())).unwrap();
    }
    let e = opt.step(&mut params).unwrap_err().to_string();
    assert!(e.contains("`layers.1.v_proj.lora_B.weight`") && e.contains("NaN at [1, 7]"), "{e}");
    let after: Vec<Vec<f32>> = SHAPES.iter().map(|(n, _)| host(params.get(n).unwrap())).collect();
    assert_eq!(before, after, "a rejected step must leave every parameter as it was");
    assert!(SHAPES.iter().all(|(n, _)| opt.state(n).is_none()));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn clip_cuda_matches_the_cpu_path() {
    let Setup { dev, mut rng, mut cpu, gpu: mut gpu_params } = setup();
    for (k, (name, dims)) in SHAPES.iter().enumerate() {
        let (c, g) = twin_grad(&mut rng, dims, k % 2 == 1, 1.0 + k as f32, &dev);
        cpu.set_grad(name, Some(c)).unwrap();
        gpu_params.set_grad(name, Some(g)).unwrap();
    }
    // Measure only, then clip to a third of the norm.
    let norm_cpu = clip_grad_norm(&mut cpu, f32::INFINITY).unwrap();
    let norm_gpu = clip_grad_norm(&mut gpu_params, f32::INFINITY).unwrap();
    eprintln!("norm: CPU {norm_cpu}, GPU {norm_gpu}");
    assert!(((norm_gpu - norm_cpu) / norm_cpu).abs() as f64 <= TOL, "norm {norm_gpu} vs {norm_cpu}");
    let max_norm = norm_cpu / 3.0;
    clip_grad_norm(&mut cpu, max_norm).unwrap();
    clip_grad_norm(&mut gpu_params, max_norm).unwrap();
    for (name, _) in SHAPES {
        let (g, c) = (gpu_params.grad(name).unwrap().unwrap(), cpu.grad(name).unwrap().unwrap());
        assert_eq!(g.dtype(), c.dtype());
        compare(&format!("{name} clipped grad"), g, c);
    }
    let after = clip_grad_norm(&mut gpu_params, f32::INFINITY).unwrap();
    assert!((after - max_norm).abs() <= 4e-3 * max_norm, "norm after clipping {after} vs {max_norm}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn clip_cuda_names_the_first_nonfinite_gradient() {
    let Setup { dev, mut rng, gpu: mut params, .. } = setup();
    for (k, (name, dims)) in SHAPES.iter().enumerate() {
        let mut v = randn(&mut rng, numel(dims));
        match k {
            3 => v[4096] = f32::INFINITY, // the first element of the tensor's second chunk
            5 => v[0] = f32::NAN,
            _ => {}
        }
        params.set_grad(name, Some(Tensor::from_vec(v, dims.to_vec(), &dev).unwrap())).unwrap();
    }
    let before = host(params.grad(SHAPES[1].0).unwrap().unwrap());
    let e = clip_grad_norm(&mut params, 1e-3).unwrap_err().to_string();
    assert!(e.contains("`layers.1.v_proj.lora_A.weight`") && e.contains("inf at [0, 4096]"), "{e}");
    assert_eq!(host(params.grad(SHAPES[1].0).unwrap().unwrap()), before);
}

/// Steps on the GPU, a save, a load onto CPU parameters: the CPU then continues exactly as the
/// GPU does (the two paths are bit-identical), so a checkpoint resumes on either device.
#[test]
#[ignore = "needs a CUDA GPU"]
fn state_saved_on_the_gpu_resumes_on_the_cpu() {
    let Setup { dev, mut rng, mut cpu, gpu: mut gpu_params } = setup();
    let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::new(3e-3) };
    let mut opt_gpu = AdamW::new(config).unwrap();
    let grads = |rng: &mut StdRng| -> Vec<(Tensor, Tensor)> {
        SHAPES.iter().map(|(_, dims)| twin_grad(rng, dims, false, 1.0, &dev)).collect()
    };
    for (k, (_, g)) in grads(&mut rng).into_iter().enumerate() {
        gpu_params.set_grad(SHAPES[k].0, Some(g)).unwrap();
    }
    opt_gpu.step(&mut gpu_params).unwrap();
    gpu_params.zero_grad();
    for (name, _) in SHAPES {
        cpu.set_value(name, gpu_params.get(name).unwrap().to_device(&Device::Cpu).unwrap()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    opt_gpu.save_state(&path).unwrap();
    let mut opt_cpu = AdamW::new(config).unwrap();
    opt_cpu.load_state(&path, &cpu).unwrap();
    for (k, (c, g)) in grads(&mut rng).into_iter().enumerate() {
        cpu.set_grad(SHAPES[k].0, Some(c)).unwrap();
        gpu_params.set_grad(SHAPES[k].0, Some(g)).unwrap();
    }
    opt_cpu.step(&mut cpu).unwrap();
    opt_gpu.step(&mut gpu_params).unwrap();
    for (name, _) in SHAPES {
        assert_eq!(opt_cpu.state(name).unwrap().step(), 2);
        compare(&format!("{name} after resume"), gpu_params.get(name).unwrap(), cpu.get(name).unwrap());
    }
}
