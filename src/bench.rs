//! `loraga bench`: the kernel summary table on the current GPU, every kernel against its
//! baseline in one run:
//!
//! - GEMM, bf16 operands, fp32 accumulation, `C = A Bᵀ`: the GEMM engine vs cuBLAS
//!   (cublasGemmEx) and cuBLASLt;
//! - the LoRA layer at M = 8192 tokens, K = N = 4096: fused (engine, two K sources) vs the
//!   cuBLAS composition PEFT uses vs the base GEMM alone, forward and forward+backward;
//! - LoRA-GA's `G += dYᵀ X` into an f32 G: the engine vs cuBLAS with beta = 1;
//! - the randomized SVD (niter = 4) of a 4096x4096 f32 matrix at q = 32 and 128, fp32 and TF32
//!   products.
//!
//! Each time is the median over single runs bracketed by CUDA events, after untimed warm-up runs;
//! consecutive runs rotate over three input sets, each larger than the H200's 60 MB L2 together
//! with the others, so no run finds its inputs cached. Inputs are Gaussian: this measures speed,
//! the tests measure accuracy. Ratios are time / baseline time of the same problem.

use std::fmt::Write as _;

use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::timing::median_ms;
use loraga_core::cuda::{CudaDevice, CudaStorage, GemmPath};
use loraga_core::gemm::{Gemm, gemm_cuda};
use loraga_core::linalg::{CudaMatrixRef, CudaRsvd, GemmMath, RsvdConfig};
use loraga_core::lora_linear::{self as lora, Forward, Grads, Lora, LoraPath};
use loraga_core::testing::randn;
use loraga_core::{DType, Device, Error, Result, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::summary::{self, Row};

/// Input sets each timed run rotates over.
const SETS: usize = 3;
/// Power iterations of the randomized SVD (LoRA-GA's and torch.svd_lowrank's default).
const NITER: usize = 4;

/// One table: rows of several problems, ratios against `baseline` of the same problem.
#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    pub baseline: &'static str,
    pub rows: Vec<Row>,
    /// A line under the table (e.g. a reference measured elsewhere), or empty.
    pub note: String,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub device: String,
    pub warmup: usize,
    pub reps: usize,
    pub sections: Vec<Section>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## loraga kernel summary on {}\n", self.device);
        let _ = writeln!(
            out,
            "Median of {} single runs timed with CUDA events after {} warm-up runs; inputs rotate over {SETS} \
             Gaussian sets larger than L2 together; ratios are time / the baseline's time.\n",
            self.reps, self.warmup
        );
        for s in &self.sections {
            out.push_str(&summary::markdown(&s.title, &s.rows, s.baseline));
            if !s.note.is_empty() {
                let _ = writeln!(out, "\n{}", s.note);
            }
            out.push('\n');
        }
        out
    }
}

/// Runs every benchmark (`quick`: fewer shapes and runs, about a minute on an H200 including the
/// kernels' first compile). Without a usable GPU: an error saying what is missing.
pub fn run(quick: bool) -> Result<Report> {
    let dev = CudaDevice::new(0).map_err(|e| Error::GpuRequired("loraga bench", Box::new(e)))?;
    let (warmup, reps) = if quick { (3, 10) } else { (10, 50) };
    let engine = dev.arch().has_wgmma();
    let rng = StdRng::seed_from_u64(8);
    let mut b = Bench { dev: dev.clone(), device: Device::Cuda(dev.clone()), rng, warmup, reps, engine };
    eprintln!("loraga bench on {} ({}): {}", dev.name(), dev.arch(), if quick { "quick" } else { "full" });
    let mut sections = vec![b.gemm(quick)?, b.lora_layer(quick)?, b.weight_grad()?, b.rsvd(quick)?];
    if !engine {
        sections[0].note = format!(
            "The GEMM engine needs sm_90a (wgmma) and this device is {}: its rows (engine, lora fused) are left out.",
            dev.arch()
        );
    }
    Ok(Report { device: format!("{} ({})", dev.name(), dev.arch()), warmup, reps, sections })
}

struct Bench {
    dev: CudaDevice,
    device: Device,
    rng: StdRng,
    warmup: usize,
    reps: usize,
    /// Whether the device runs the GEMM engine (Hopper); without it, engine rows are left out.
    engine: bool,
}

impl Bench {
    /// A bf16 [rows, cols] tensor of Gaussian values times `std`, on the device.
    fn bf16(&mut self, rows: usize, cols: usize, std: f32) -> Result<Tensor> {
        let v: Vec<f32> = randn(&mut self.rng, rows * cols).into_iter().map(|x| x * std).collect();
        Tensor::from_cpu(CpuStorage::from_f32_vec(DType::BF16, v), [rows, cols].into(), &self.device)
    }

    fn sets(&mut self, rows: usize, cols: usize, std: f32) -> Result<Vec<Tensor>> {
        (0..SETS).map(|_| self.bf16(rows, cols, std)).collect()
    }

    /// Median milliseconds of `f(set)`, the set rotating from run to run.
    fn time(&self, what: &str, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        let mut turn = 0;
        let ms = median_ms(&self.dev, self.warmup, self.reps, || {
            turn = (turn + 1) % SETS;
            f(turn)
        })?;
        eprintln!("  {what}: {ms:.4} ms");
        Ok(ms)
    }

    /// PEFT's cuBLAS sequence, the beta-folded cuBLAS composition, and the fused path where the
    /// engine runs.
    fn lora_paths(&self) -> Vec<LoraPath> {
        let mut paths = vec![LoraPath::Cublas, LoraPath::CublasFolded];
        if self.engine {
            paths.push(LoraPath::Fused);
        }
        paths
    }

    fn gemm(&mut self, quick: bool) -> Result<Section> {
        let mut shapes = vec![(8192, 4096, 4096), (4096, 4096, 4096)];
        if !quick {
            shapes.extend([(8192, 8192, 8192), (8192, 11008, 4096), (8192, 4096, 11008)]);
        }
        let nt = Gemm { trans_b: true, ..Gemm::default() };
        let mut rows = Vec::new();
        for (m, n, k) in shapes {
            let a = self.sets(m, k, 1.0)?;
            let bm = self.sets(n, k, 1.0)?;
            let mut c = Tensor::zeros([m, n], DType::BF16, &self.device)?;
            let problem = format!("{m}x{n}x{k} NT");
            let flops = 2.0 * (m * n * k) as f64;
            for path in [GemmPath::Cublas, GemmPath::CublasLt, GemmPath::Engine] {
                if path == GemmPath::Engine && !self.engine {
                    continue;
                }
                let ms = self.time(&format!("gemm {problem} {}", path.name()), |i| {
                    gemm_cuda(path, &nt, &a[i], &bm[i], &mut c)
                })?;
                rows.push(row(&problem, path.name(), ms, flops));
            }
        }
        Ok(Section {
            title: "GEMM C = A Bᵀ, bf16 operands and output, fp32 accumulation (M x N x K)".into(),
            baseline: "cublas",
            rows,
            note: String::new(),
        })
    }

    fn lora_layer(&mut self, quick: bool) -> Result<Section> {
        let (m, k, n) = (8192usize, 4096usize, 4096usize);
        let xs = self.sets(m, k, 1.0)?;
        let dys = self.sets(m, n, 1.0)?;
        let w = self.bf16(n, k, 0.02)?;
        let base_flops = 2.0 * (m * n * k) as f64;
        let nt = Gemm { trans_b: true, ..Gemm::default() };
        let ranks: &[usize] = if quick { &[16] } else { &[16, 64] };
        let mut rows = Vec::new();
        for &r in ranks {
            let (a, bm) = (self.bf16(r, k, 0.02)?, self.bf16(n, r, 0.02)?);
            let l = Lora { w: &w, a: &a, b: &bm, scale: 2.0 };
            let zeros = |rr: usize, cc: usize, dt: DType| Tensor::zeros([rr, cc], dt, &self.device);
            let mut fwd = Forward { y: zeros(m, n, DType::BF16)?, u: zeros(m, r, DType::BF16)? };
            let mut grads =
                Grads { dx: zeros(m, k, DType::BF16)?, da: zeros(r, k, DType::F32)?, db: zeros(n, r, DType::F32)? };
            let mut v = zeros(m, r, DType::BF16)?;
            let mut dx_base = zeros(m, k, DType::BF16)?;

            let problem = format!("forward M={m} K={k} N={n} r={r}");
            let ms =
                self.time(&format!("{problem} base"), |i| gemm_cuda(GemmPath::Cublas, &nt, &xs[i], &w, &mut fwd.y))?;
            rows.push(row(&problem, "cublas base GEMM", ms, base_flops));
            for path in self.lora_paths() {
                let name = format!("lora {}", path.name());
                let ms = self.time(&format!("{problem} {name}"), |i| lora::forward_into(path, &l, &xs[i], &mut fwd))?;
                rows.push(row(&problem, &name, ms, base_flops));
            }

            let problem = format!("forward+backward M={m} K={k} N={n} r={r}");
            let ms = self.time(&format!("{problem} base"), |i| {
                gemm_cuda(GemmPath::Cublas, &nt, &xs[i], &w, &mut fwd.y)?;
                gemm_cuda(GemmPath::Cublas, &Gemm::default(), &dys[i], &w, &mut dx_base)
            })?;
            rows.push(row(&problem, "cublas base GEMM", ms, 2.0 * base_flops));
            for path in self.lora_paths() {
                let name = format!("lora {}", path.name());
                let ms = self.time(&format!("{problem} {name}"), |i| {
                    lora::forward_into(path, &l, &xs[i], &mut fwd)?;
                    lora::backward_into(path, &l, &xs[i], &fwd.u, &dys[i], &mut v, &mut grads)
                })?;
                rows.push(row(&problem, &name, ms, 2.0 * base_flops));
            }
        }
        Ok(Section {
            title: "LoRA layer, bf16, fp32 accumulation (TFLOP/s count the base GEMMs' FLOPs only)".into(),
            baseline: "cublas base GEMM",
            rows,
            note:
                "`lora cublas-peft` is the sequence PEFT runs in eager PyTorch (base GEMM, two adapter GEMMs, a scale \
                   and an add; its backward as autograd runs it); `lora cublas-folded` folds the adds into beta = 1 \
                   GEMMs; `lora fused` runs each [X | U] [W | B]ᵀ product as one engine GEMM over two K sources."
                    .into(),
        })
    }

    fn weight_grad(&mut self) -> Result<Section> {
        let (m, k, n) = (8192usize, 4096usize, 4096usize);
        let xs = self.sets(m, k, 1.0)?;
        let dys = self.sets(m, n, 1.0)?;
        let mut g = Tensor::zeros([n, k], DType::F32, &self.device)?;
        let problem = format!("G += dYᵀ X, M={m}, G {n}x{k} f32");
        let flops = 2.0 * (m * n * k) as f64;
        let mut rows = Vec::new();
        // Cublas and CublasFolded run the same cuBLAS beta = 1 GEMM here: one row for both.
        for path in self.lora_paths().into_iter().filter(|&p| p != LoraPath::CublasFolded) {
            let name = if path == LoraPath::Fused { "engine" } else { "cublas" };
            let ms = self.time(&format!("{problem} {name}"), |i| {
                lora::accumulate_weight_grad(path, &mut g, &dys[i], &xs[i], 1.0)
            })?;
            rows.push(row(&problem, name, ms, flops));
        }
        Ok(Section {
            title: "LoRA-GA's weight-gradient accumulation, bf16 operands into f32 G in place".into(),
            baseline: "cublas",
            rows,
            note: String::new(),
        })
    }

    fn rsvd(&mut self, quick: bool) -> Result<Section> {
        let mut shapes = vec![(4096usize, 4096usize)];
        if !quick {
            shapes.push((11008, 4096));
        }
        let mut rows = Vec::new();
        for (m, n) in shapes {
            let inputs: Vec<CudaStorage> = (0..SETS)
                .map(|_| CudaStorage::from_cpu(&self.dev, &CpuStorage::F32(randn(&mut self.rng, m * n))))
                .collect::<Result<_>>()?;
            for q in [32usize, 128] {
                let problem = format!("{m}x{n} q={q}");
                let flops = ((2 * NITER + 2) * 2 * m * n * q) as f64;
                let cfg = RsvdConfig::new(q, q, NITER, 7);
                for (math, name) in [(GemmMath::Fp32, "loraga fp32"), (GemmMath::Tf32, "loraga tf32")] {
                    let mut plan = CudaRsvd::new(&self.dev, math);
                    let ms = self.time(&format!("rsvd {problem} {name}"), |i| {
                        plan.run_device("bench", CudaMatrixRef::new(&inputs[i], m, n)?, &cfg).map(drop)
                    })?;
                    rows.push(row(&problem, name, ms, flops));
                }
            }
        }
        Ok(Section {
            title: format!("randomized SVD, niter = {NITER}, f32 input (end to end, U and Vᵀ left on the device)"),
            baseline: "loraga fp32",
            rows,
            note: "For comparison, torch.svd_lowrank(G, q, niter=4) in fp32 took 3.7 ms (q=32) and 11.9 ms (q=128) \
                   at 4096x4096, 5.0 / 16.6 ms at 11008x4096, on the H200 (PyTorch 2.11, \
                   scripts/bench/torch_svd_lowrank.py; not measured in this run)."
                .into(),
        })
    }
}

fn row(problem: &str, implementation: &str, median_ms: f64, flops: f64) -> Row {
    Row { problem: problem.into(), implementation: implementation.into(), median_ms, flops }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_one_table_per_section_with_its_own_baseline_and_note() {
        let section = |title: &str, baseline: &'static str, rows: &[(&str, f64)], note: &str| Section {
            title: title.into(),
            baseline,
            rows: rows.iter().map(|&(imp, ms)| row("p", imp, ms, 2e9)).collect(),
            note: note.into(),
        };
        let report = Report {
            device: "GPU X (sm_90a)".into(),
            warmup: 3,
            reps: 10,
            sections: vec![
                section("gemm", "cublas", &[("cublas", 2.0), ("engine", 1.0)], ""),
                section("rsvd", "loraga fp32", &[("loraga fp32", 4.0), ("loraga tf32", 3.0)], "torch: 3.7 ms"),
            ],
        };
        let md = report.markdown();
        assert!(md.starts_with("## loraga kernel summary on GPU X (sm_90a)\n"), "{md}");
        assert!(md.contains("Median of 10 single runs timed with CUDA events after 3 warm-up runs"), "{md}");
        assert!(md.contains("### gemm\n") && md.contains("| p | engine | 1.0000 | 2.0 | 0.500 |"), "{md}");
        assert!(
            md.contains("time / loraga fp32 |") && md.contains("| p | loraga tf32 | 3.0000 | 0.7 | 0.750 |"),
            "{md}"
        );
        assert!(md.contains("\ntorch: 3.7 ms\n"), "{md}");
    }
}
