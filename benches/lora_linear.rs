//! The LoRA layer on the GPU: fused (GEMM engine, two K sources) vs the cuBLAS composition PEFT
//! and unsloth use, against cuBLAS's base GEMMs alone (X Wᵀ forward, + dY W backward), at
//! M = 8192 tokens, K = N = 4096, bf16, r in {16, 64}. Also LoRA-GA's in-place weight-gradient
//! accumulation G += dYᵀ X (f32 G) by the engine and by cuBLAS GemmEx with beta = 1.
//!
//! CUDA-event timing per Criterion batch, three rotating input sets (each larger than L2),
//! outputs preallocated; ends with the markdown summary (ratios to the cuBLAS base).

mod common;

use common::{group, measure, setup};
use loraga::summary::{self, Row};
use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::GemmPath;
use loraga_core::gemm::{Gemm, gemm_cuda};
use loraga_core::lora_linear::{self as lora, Forward, Grads, Lora, LoraPath};
use loraga_core::testing::randn;
use loraga_core::{DType, Device, Tensor};
use rand::SeedableRng;

fn main() {
    let (dev, mut c) = setup("lora_linear");
    let device = Device::Cuda(dev.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut t = |rows: usize, cols: usize, std: f32| {
        let v: Vec<f32> = randn(&mut rng, rows * cols).into_iter().map(|x| x * std).collect();
        Tensor::from_cpu(CpuStorage::from_f32_vec(DType::BF16, v), [rows, cols].into(), &device).unwrap()
    };
    let (m, k, n) = (8192usize, 4096usize, 4096usize);
    let xs: Vec<Tensor> = (0..3).map(|_| t(m, k, 1.0)).collect();
    let dys: Vec<Tensor> = (0..3).map(|_| t(m, n, 1.0)).collect();
    let w = t(n, k, 0.02);
    let mut rows = Vec::new();
    let base_flops = 2.0 * (m * n * k) as f64;

    for r in [16usize, 64] {
        let (a, b) = (t(r, k, 0.02), t(n, r, 0.02));
        let l = Lora { w: &w, a: &a, b: &b, scale: 2.0 };
        let zeros = |rr: usize, cc: usize, dt: DType| Tensor::zeros([rr, cc], dt, &device).unwrap();
        let mut fwd = Forward { y: zeros(m, n, DType::BF16), u: zeros(m, r, DType::BF16) };
        let mut grads =
            Grads { dx: zeros(m, k, DType::BF16), da: zeros(r, k, DType::F32), db: zeros(n, r, DType::F32) };
        let mut v = zeros(m, r, DType::BF16);
        let mut dx_base = zeros(m, k, DType::BF16);

        let problem = format!("forward M={m} K={k} N={n} r={r}");
        let mut g = group(&mut c, &format!("lora_fwd_r{r}"), base_flops);
        let ms = measure(&dev, &mut g, "cublas base X W^T", |i| {
            gemm_cuda(GemmPath::Cublas, &Gemm { trans_b: true, ..Gemm::default() }, &xs[i], &w, &mut fwd.y)
        });
        rows.push(row(&problem, "cublas", ms, base_flops));
        for path in [LoraPath::Cublas, LoraPath::Fused] {
            let ms = measure(&dev, &mut g, &format!("lora {}", path.name()), |i| {
                lora::forward_into(path, &l, &xs[i], &mut fwd)
            });
            rows.push(row(&problem, &format!("lora {}", path.name()), ms, base_flops));
        }
        g.finish();

        let problem = format!("forward+backward M={m} K={k} N={n} r={r}");
        let mut g = group(&mut c, &format!("lora_fwd_bwd_r{r}"), 2.0 * base_flops);
        let ms = measure(&dev, &mut g, "cublas base X W^T + dY W", |i| {
            gemm_cuda(GemmPath::Cublas, &Gemm { trans_b: true, ..Gemm::default() }, &xs[i], &w, &mut fwd.y)?;
            gemm_cuda(GemmPath::Cublas, &Gemm::default(), &dys[i], &w, &mut dx_base)
        });
        rows.push(row(&problem, "cublas", ms, 2.0 * base_flops));
        for path in [LoraPath::Cublas, LoraPath::Fused] {
            let ms = measure(&dev, &mut g, &format!("lora {}", path.name()), |i| {
                lora::forward_into(path, &l, &xs[i], &mut fwd)?;
                lora::backward_into(path, &l, &xs[i], &fwd.u, &dys[i], &mut v, &mut grads)
            });
            rows.push(row(&problem, &format!("lora {}", path.name()), ms, 2.0 * base_flops));
        }
        g.finish();
    }

    // G += dYᵀ X, G f32 [N, K] in place.
    let mut gbuf = Tensor::zeros([n, k], DType::F32, &device).unwrap();
    let problem = format!("G += dY^T X, M={m}, G {n}x{k} f32");
    let mut g = group(&mut c, "weight_grad_accumulate", base_flops);
    for (name, path) in [("cublas", LoraPath::Cublas), ("fused", LoraPath::Fused)] {
        let ms = measure(&dev, &mut g, name, |i| lora::accumulate_weight_grad(path, &mut gbuf, &dys[i], &xs[i], 1.0));
        rows.push(row(&problem, name, ms, base_flops));
    }
    g.finish();

    c.final_summary();
    summary::emit("lora_linear", "LoRA layer, bf16, fp32 accumulation (CUDA events, median per run)", &rows, "cublas");
}

fn row(problem: &str, implementation: &str, median_ms: f64, flops: f64) -> Row {
    Row { problem: problem.into(), implementation: implementation.into(), median_ms, flops }
}
