//! GEMM throughput on the GPU: the naive kernel vs cuBLAS (and, as it lands, the GEMM engine),
//! bf16 operands and output with fp32 accumulation, at 4096^3 and 8192^3.
//!
//! Timed with CUDA events around each Criterion iteration batch; the operands rotate over three
//! buffer sets so no run finds its inputs in the 60 MB L2. Ends with the markdown summary.

use criterion::{Criterion, SamplingMode, Throughput};
use loraga::summary::{self, Row};
use loraga_core::cuda::timing::{median, time_iters};
use loraga_core::cuda::{CudaDevice, GemmPath};
use loraga_core::gemm::{Gemm, gemm_cuda};
use loraga_core::testing::randn;
use loraga_core::{DType, Device, Tensor};
use rand::SeedableRng;

fn main() {
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("the gemm bench needs a CUDA GPU: {e}");
            std::process::exit(1);
        }
    };
    let device = Device::Cuda(dev.clone());
    let mut criterion = Criterion::default().configure_from_args();
    let mut rows = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);

    for size in [4096usize, 8192] {
        let (m, n, k) = (size, size, size);
        let sets: Vec<(Tensor, Tensor)> = (0..3)
            .map(|_| {
                let a = Tensor::from_cpu(
                    loraga_core::cpu::CpuStorage::from_f32_vec(DType::BF16, randn(&mut rng, m * k)),
                    [m, k].into(),
                    &device,
                )
                .unwrap();
                let b = Tensor::from_cpu(
                    loraga_core::cpu::CpuStorage::from_f32_vec(DType::BF16, randn(&mut rng, n * k)),
                    [n, k].into(),
                    &device,
                )
                .unwrap();
                (a, b)
            })
            .collect();
        let mut c = Tensor::zeros([m, n], DType::BF16, &device).unwrap();
        // PyTorch's x @ W^T: W stored [N, K].
        let g = Gemm { trans_b: true, ..Gemm::default() };
        let flops = 2.0 * (m * n * k) as f64;
        let problem = format!("{m}x{n}x{k} bf16 NT");

        let mut group = criterion.benchmark_group(format!("gemm_bf16_{size}"));
        group.sampling_mode(SamplingMode::Flat).sample_size(10).throughput(Throughput::Elements(flops as u64));
        for path in [GemmPath::Cublas, GemmPath::Naive] {
            let mut per_iter_ms = Vec::new();
            let mut turn = 0usize;
            // Warm-up outside the timed region: module load, cuBLAS handle, clocks.
            for _ in 0..3 {
                gemm_cuda(path, &g, &sets[0].0, &sets[0].1, &mut c).unwrap();
            }
            group.bench_function(path.name(), |bch| {
                bch.iter_custom(|iters| {
                    let t = time_iters(&dev, iters, || {
                        turn = (turn + 1) % sets.len();
                        gemm_cuda(path, &g, &sets[turn].0, &sets[turn].1, &mut c)
                    })
                    .unwrap();
                    per_iter_ms.push(t.as_secs_f64() * 1e3 / iters as f64);
                    t
                })
            });
            rows.push(Row {
                problem: problem.clone(),
                implementation: path.name().into(),
                median_ms: median(&mut per_iter_ms),
                flops,
            });
        }
        group.finish();
    }
    criterion.final_summary();
    summary::emit("gemm", "GEMM, bf16 in/out, fp32 accumulation (CUDA events, median per run)", &rows, "cublas");
}
