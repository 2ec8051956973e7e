//! The GPU randomized SVD (`loraga_core::linalg::rsvd_cuda`) at LoRA-GA's sizes, niter = 4:
//! 4096x4096 and 11008x4096 with q = 32, 128, 512 (full fp32, and TF32 products), against
//! cuSOLVER's own randomized SVD `cusolverDnXgesvdr` (fp32, k = q/2 kept, oversampling q/2,
//! niters = 4: the same q columns) in the same run; then the 224 layer shapes of a Llama-2-7B
//! (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008; x 32 layers) at r = 8 and 32
//! (q = 4r, k = 2r), total time per batch, ours and gesvdr layer by layer.
//!
//! Timed with CUDA events around each run. "loraga fp32" and "tf32" leave U and Vᵀ on the device
//! (`run_device`, as torch.svd_lowrank does); "to host" includes copying them to the host (`run`),
//! as gesvdr's rows include its downloads. Ω is drawn once per (shape, q) by the
//! reusable plan, outside the timing; gesvdr's input copy (it destroys A) is inside. Inputs are
//! Gaussian (timing only; accuracy is tests/rsvd_cuda.rs's job) and rotate over three matrices
//! per shape (two per shape in the batch: each matrix is over the 60 MB L2 anyway). The summary's
//! last column is time / gesvdr's time for the same problem. A line per configuration reports how
//! many layers fell back to the host-assisted path (expected: 0 on these inputs).
//! Compare with `python3 scripts/bench/torch_svd_lowrank.py` run on the same machine.
//!
//! First, the ten products' kernels alone: out = A V and Aᵀ V for those two A and q = 32, 128,
//! 512, our 3xTF32 kernel (mma.sync at q ≤ 32, wgmma above on Hopper) against cuBLAS's SGEMM
//! (CUBLAS_COMPUTE_32F, f32 accurate like ours) on the same operands.

mod common;

use std::collections::HashMap;

use common::{group, measure, setup};
use loraga::summary::{self, Row};
use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::timing::median_ms;
use loraga_core::cuda::{CudaDevice, CudaStorage};
use loraga_core::linalg::{CudaMatrixRef, CudaRsvd, CusolverGesvdr, GemmMath, RsvdConfig, SkinnyProducts};
use loraga_core::testing::randn;
use rand::SeedableRng;
use rand::rngs::StdRng;

const NITER: usize = 4;
const GESVDR: &str = "cusolver gesvdr";
const CUBLAS: &str = "cublas sgemm";

fn main() {
    let (dev, mut criterion) = setup("rsvd");
    let mut rng = StdRng::seed_from_u64(1);
    let (mut rows, mut product_rows) = (Vec::new(), Vec::new());

    for (m, n) in [(4096, 4096), (11008, 4096)] {
        let inputs: Vec<CudaStorage> = (0..3).map(|_| gaussian(&dev, &mut rng, m, n)).collect();
        products(&dev, &mut criterion, &mut rng, &inputs, m, n, &mut product_rows);
        let mut gesvdr = CusolverGesvdr::new(&dev).expect("cuSOLVER");
        for q in [32, 128, 512] {
            let flops = ((2 * NITER + 2) * 2 * m * n * q) as f64;
            let problem = format!("{m}x{n} q={q}");
            let cfg = RsvdConfig::new(q, q, NITER, 7);
            let mut group = group(&mut criterion, &format!("rsvd_{m}x{n}_q{q}"), flops);
            for (math, on_device, label) in [
                (GemmMath::Fp32, true, "loraga fp32"),
                (GemmMath::Fp32, false, "loraga fp32 to host"),
                (GemmMath::Tf32, true, "loraga tf32"),
            ] {
                let mut plan = CudaRsvd::new(&dev, math);
                let ms = measure(&dev, &mut group, label, |i| {
                    let a = CudaMatrixRef::new(&inputs[i], m, n)?;
                    if on_device {
                        plan.run_device("bench", a, &cfg).map(drop)
                    } else {
                        plan.run("bench", a, &cfg).map(drop)
                    }
                });
                eprintln!("{problem} {label}: {} host fallbacks", plan.fallbacks());
                rows.push(Row { problem: problem.clone(), implementation: label.into(), median_ms: ms, flops });
            }
            // A baseline that cannot run here is reported and skipped, not allowed to stop the bench.
            match gesvdr.run("bench", CudaMatrixRef::new(&inputs[0], m, n).unwrap(), q, NITER) {
                Err(e) => eprintln!("{problem}: {GESVDR} skipped: {e}"),
                Ok(_) => {
                    let ms = measure(&dev, &mut group, GESVDR, |i| {
                        gesvdr.run("bench", CudaMatrixRef::new(&inputs[i], m, n)?, q, NITER).map(drop)
                    });
                    rows.push(Row { problem: problem.clone(), implementation: GESVDR.into(), median_ms: ms, flops });
                }
            }
            group.finish();
        }
    }
    criterion.final_summary();

    // The Llama-2-7B batch: 32 layers x (4 of 4096x4096, 2 of 11008x4096, 1 of 4096x11008).
    let shapes = [(4096, 4096), (11008, 4096), (4096, 11008)];
    let pool: Vec<Vec<CudaStorage>> =
        shapes.iter().map(|&(m, n)| (0..2).map(|_| gaussian(&dev, &mut rng, m, n)).collect()).collect();
    let kinds = [("q", 0), ("k", 0), ("v", 0), ("o", 0), ("gate", 1), ("up", 1), ("down", 2)];
    let names: Vec<(String, usize, usize)> = (0..32)
        .flat_map(|l| {
            kinds.iter().enumerate().map(move |(j, &(kind, s))| (format!("layers.{l}.{kind}"), s, (l + j) % 2))
        })
        .collect();
    let items: Vec<(&str, CudaMatrixRef)> = names
        .iter()
        .map(|(name, s, copy)| {
            let (m, n) = shapes[*s];
            (name.as_str(), CudaMatrixRef::new(&pool[*s][*copy], m, n).unwrap())
        })
        .collect();
    // One gesvdr per shape, so its full-size U and V buffers are not reallocated between layers.
    let mut gesvdrs: HashMap<(usize, usize), CusolverGesvdr> =
        shapes.iter().map(|&s| (s, CusolverGesvdr::new(&dev).expect("cuSOLVER"))).collect();
    for r in [8, 32] {
        let cfg = RsvdConfig::lora_ga(r, 7);
        let q = 4 * r;
        let flops: f64 = items.iter().map(|(_, a)| ((2 * NITER + 2) * 2 * a.rows() * a.cols() * q) as f64).sum();
        let problem = format!("Llama-2-7B 224 layers r={r} q={q}");
        let mut plan = CudaRsvd::new(&dev, GemmMath::Fp32);
        let ms = median_ms(&dev, 1, 3, || plan.run_batch_device(&items, &cfg).map(drop)).unwrap();
        eprintln!("{problem}: loraga {ms:.1} ms, {} host fallbacks", plan.fallbacks());
        rows.push(Row { problem: problem.clone(), implementation: "loraga fp32 batch".into(), median_ms: ms, flops });
        let ms = median_ms(&dev, 1, 3, || plan.run_batch(&items, &cfg).map(drop)).unwrap();
        eprintln!("{problem}: loraga to host {ms:.1} ms, {} host fallbacks", plan.fallbacks());
        rows.push(Row {
            problem: problem.clone(),
            implementation: "loraga fp32 batch to host".into(),
            median_ms: ms,
            flops,
        });
        let gesvdr_batch = median_ms(&dev, 1, 3, || {
            for (name, a) in &items {
                let g = gesvdrs.get_mut(&(a.rows(), a.cols())).expect("one per shape");
                g.run(name, *a, q, NITER)?;
            }
            Ok(())
        });
        match gesvdr_batch {
            Err(e) => eprintln!("{problem}: {GESVDR} skipped: {e}"),
            Ok(ms) => {
                eprintln!("{problem}: gesvdr {ms:.1} ms");
                rows.push(Row { problem, implementation: GESVDR.into(), median_ms: ms, flops });
            }
        }
    }

    summary::emit(
        "rsvd_products",
        "the randomized SVD's products with A, f32 accurate (CUDA events, median per run; last column: time / cuBLAS SGEMM's)",
        &product_rows,
        CUBLAS,
    );
    summary::emit(
        "rsvd",
        "randomized SVD, niter = 4, f32 (CUDA events, median per run; last column: time / cusolver gesvdr's; \
         torch.svd_lowrank: scripts/bench/torch_svd_lowrank.py)",
        &rows,
        GESVDR,
    );
}

/// The products with the row-major A [m, n] (`inputs`, rotated): A V [m, q] (n) and Aᵀ V [n, q]
/// (t), ours against cuBLAS SGEMM.
fn products(
    dev: &CudaDevice,
    criterion: &mut criterion::Criterion,
    rng: &mut StdRng,
    inputs: &[CudaStorage],
    m: usize,
    n: usize,
    rows: &mut Vec<Row>,
) {
    for q in [32, 128, 512] {
        for trans in [false, true] {
            let (out_rows, k) = if trans { (n, m) } else { (m, n) };
            let v = gaussian(dev, rng, k, q);
            let flops = (2 * m * n * q) as f64;
            let problem = format!("product {m}x{n} {} q={q}", if trans { "AᵀV" } else { "AV" });
            let mut group =
                group(criterion, &format!("rsvd_product_{m}x{n}_{}_q{q}", if trans { "t" } else { "n" }), flops);
            let mut plan = SkinnyProducts::new(dev, trans, out_rows, k, q).expect("product buffers");
            let ours = format!("loraga 3xTF32 ({})", plan.kernel().unwrap_or("none"));
            let ms = measure(dev, &mut group, &ours, |i| plan.ours(&inputs[i], 0, &v));
            rows.push(Row { problem: problem.clone(), implementation: ours, median_ms: ms, flops });
            let ms = measure(dev, &mut group, CUBLAS, |i| plan.cublas(&inputs[i], 0, &v));
            rows.push(Row { problem, implementation: CUBLAS.into(), median_ms: ms, flops });
            group.finish();
        }
    }
}

fn gaussian(dev: &CudaDevice, rng: &mut StdRng, m: usize, n: usize) -> CudaStorage {
    CudaStorage::from_cpu(dev, &CpuStorage::F32(randn(rng, m * n))).unwrap()
}
