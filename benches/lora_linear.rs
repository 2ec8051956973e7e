//! The LoRA layer on the GPU, every path side by side: fused (GEMM engine, two K sources), PEFT's
//! eager sequence on cuBLAS (`cublas-peft`: base, A, B GEMMs, `* s` and `+` kernels; autograd's
//! backward), the adapter folded into beta = 1 cuBLAS GEMMs (`cublas-folded`), against cuBLAS's
//! base GEMMs alone (X Wᵀ forward, + dY W backward); and LoRA-GA's in-place accumulation
//! G += dYᵀ X (f32 G) by the engine and by cuBLAS GemmEx with beta = 1. bf16 operands, s = 2.
//!
//! Two parts, chosen by `LORA_BENCH` (`criterion`, `grid`, or unset for both), and a third for
//! profilers (`LORA_BENCH=kernels`, below):
//! - Criterion groups at M = 8192, K = N = 4096, r in {16, 64}, ending with the markdown summary;
//!   where the one-pass kernel applies (r = 16), V' and dB by it and by cuBLAS's two GEMMs.
//! - The grid of issue 4 (M in {4096, 8192, 16384}; (K, N) in {(4096, 4096), (4096, 11008),
//!   (11008, 4096)}; r in {8, 16, 64, 128}) timed directly: a shape's alternatives run in rounds
//!   (a sample of each, `LORA_REPS` rounds, default 20, after 3 warm-up rounds; CUDA events per
//!   sample), so that they share the clocks of the moment, and each gets the median of its
//!   samples. A sample is `LORA_BATCH` back-to-back runs (default 1: single runs, the GPU idle
//!   between samples; 10 keeps it busy as training does, at the lower clocks of sustained load).
//!   One table row per shape. `LORA_FILTER` keeps the shapes whose label ("M=8192 K=4096
//!   N=11008 r=16") contains every comma-separated term, e.g. `LORA_FILTER=M=8192,r=16`. The
//!   whole grid runs in about a minute on an H200 (single runs).
//!
//! - `kernels`: for each kept shape, one piece of work (`LORA_WORK`: `base`, `fused` or `peft`
//!   forward+backward) run 5 times after 2 warm-ups, untimed, for a kernel profiler to time each
//!   launch (`ncu --clock-control none --metrics gpu__time_duration.sum`).
//!
//! Inputs rotate over three sets (each larger than L2) and outputs are preallocated; the PEFT
//! path's temporaries come from the stream-ordered pool inside the timing, as PyTorch's come from
//! its caching allocator. `scripts/bench/torch_lora.py` prints PyTorch's numbers for the same grid.

mod common;

use common::{group, measure, setup};
use loraga::summary::{self, Row};
use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::timing::interleaved_median_ms;
use loraga_core::cuda::{CudaDevice, GemmPath, lora_dy};
use loraga_core::gemm::{Gemm, gemm_cuda};
use loraga_core::lora_linear::{self as lora, Forward, Grads, Lora, LoraPath};
use loraga_core::testing::randn;
use loraga_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;

const NT: Gemm = Gemm { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0, deterministic: false };
const NN: Gemm = Gemm { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0, deterministic: false };
const TN: Gemm = Gemm { trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0, deterministic: false };
/// The composed and fused paths timed (the naive one is orders of magnitude slower).
const PATHS: [LoraPath; 3] = [LoraPath::Cublas, LoraPath::CublasFolded, LoraPath::Fused];

fn main() {
    let part = std::env::var("LORA_BENCH").unwrap_or_default();
    let (dev, mut c) = setup("lora_linear");
    let mut inputs = Inputs::new(&dev);
    if part.is_empty() || part == "criterion" {
        criterion_groups(&dev, &mut c, &mut inputs);
    }
    if part.is_empty() || part == "grid" {
        grid(&dev, &mut inputs).unwrap();
    }
    if part == "kernels" {
        kernels(&dev, &mut inputs).unwrap();
    }
}

/// Random bf16 tensors, cut from one pool of normal samples drawn once (drawing a fresh sample
/// for every element of the grid's inputs would take minutes on the host).
struct Inputs {
    device: Device,
    pool: Vec<f32>,
    offset: usize,
}

impl Inputs {
    fn new(dev: &CudaDevice) -> Inputs {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        Inputs { device: Device::Cuda(dev.clone()), pool: randn(&mut rng, (1 << 22) + 17), offset: 0 }
    }

    fn t(&mut self, rows: usize, cols: usize, std: f32) -> Tensor {
        let p = self.pool.len();
        let start = self.offset;
        self.offset = (self.offset + 7919) % p;
        let v: Vec<f32> = (0..rows * cols).map(|i| self.pool[(start + i) % p] * std).collect();
        Tensor::from_cpu(CpuStorage::from_f32_vec(DType::BF16, v), [rows, cols].into(), &self.device).unwrap()
    }

    fn zeros(&self, rows: usize, cols: usize, dtype: DType) -> Tensor {
        Tensor::zeros([rows, cols], dtype, &self.device).unwrap()
    }
}

/// One problem's operands and preallocated outputs.
struct Layer {
    xs: Vec<Tensor>,
    dys: Vec<Tensor>,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    fwd: Forward,
    grads: Grads,
    v: Tensor,
    dx_base: Tensor,
    g: Tensor,
}

impl Layer {
    fn new(inp: &mut Inputs, m: usize, k: usize, n: usize) -> Layer {
        Layer {
            xs: (0..3).map(|_| inp.t(m, k, 1.0)).collect(),
            dys: (0..3).map(|_| inp.t(m, n, 1.0)).collect(),
            w: inp.t(n, k, 0.02),
            a: inp.zeros(1, k, DType::BF16),
            b: inp.zeros(n, 1, DType::BF16),
            fwd: Forward { y: inp.zeros(m, n, DType::BF16), u: inp.zeros(m, 1, DType::BF16) },
            grads: Grads {
                dx: inp.zeros(m, k, DType::BF16),
                da: inp.zeros(1, k, DType::F32),
                db: inp.zeros(n, 1, DType::F32),
            },
            v: inp.zeros(m, 1, DType::BF16),
            dx_base: inp.zeros(m, k, DType::BF16),
            g: inp.zeros(n, k, DType::F32),
        }
    }

    /// Sets the adapter to rank r (fresh A, B and the rank-sized buffers).
    fn rank(&mut self, inp: &mut Inputs, r: usize) {
        let (m, k, n) = (self.xs[0].dims()[0], self.xs[0].dims()[1], self.w.dims()[0]);
        self.a = inp.t(r, k, 0.02);
        self.b = inp.t(n, r, 0.02);
        self.fwd.u = inp.zeros(m, r, DType::BF16);
        self.grads.da = inp.zeros(r, k, DType::F32);
        self.grads.db = inp.zeros(n, r, DType::F32);
        self.v = inp.zeros(m, r, DType::BF16);
    }

    fn base_fwd(&mut self, i: usize) -> Result<()> {
        gemm_cuda(GemmPath::Cublas, &NT, &self.xs[i], &self.w, &mut self.fwd.y)
    }

    fn base_fwd_bwd(&mut self, i: usize) -> Result<()> {
        self.base_fwd(i)?;
        gemm_cuda(GemmPath::Cublas, &NN, &self.dys[i], &self.w, &mut self.dx_base)
    }

    fn fwd(&mut self, path: LoraPath, i: usize) -> Result<()> {
        let l = Lora { w: &self.w, a: &self.a, b: &self.b, scale: 2.0 };
        lora::forward_into(path, &l, &self.xs[i], &mut self.fwd)
    }

    fn fwd_bwd(&mut self, path: LoraPath, i: usize) -> Result<()> {
        self.fwd(path, i)?;
        let l = Lora { w: &self.w, a: &self.a, b: &self.b, scale: 2.0 };
        lora::backward_into(path, &l, &self.xs[i], &self.fwd.u, &self.dys[i], &mut self.v, &mut self.grads)
    }

    fn accumulate(&mut self, path: LoraPath, i: usize) -> Result<()> {
        lora::accumulate_weight_grad(path, &mut self.g, &self.dys[i], &self.xs[i], 1.0)
    }

    /// The backward's V' and dB alone: one pass over dY, or cuBLAS's two GEMMs (what the fused
    /// path ran before the one-pass kernel).
    fn dy_products(&mut self, one_pass: bool, i: usize) -> Result<()> {
        let (m, n, r) = (self.dys[i].dims()[0], self.dys[i].dims()[1], self.b.dims()[1]);
        if one_pass {
            let dy = self.dys[i].cuda_storage("bench", "dY")?;
            let (b, u) = (self.b.cuda_storage("bench", "B")?, self.fwd.u.cuda_storage("bench", "U'")?);
            let (v, db) = (self.v.cuda_storage_mut("bench", "V'")?, self.grads.db.cuda_storage_mut("bench", "dB")?);
            return lora_dy::run(dy, b, u, (m, n, r), 2.0, v, db);
        }
        gemm_cuda(GemmPath::Cublas, &Gemm { alpha: 2.0, ..NN }, &self.dys[i], &self.b, &mut self.v)?;
        gemm_cuda(GemmPath::Cublas, &TN, &self.dys[i], &self.fwd.u, &mut self.grads.db)
    }

    /// The forward's skinny product U' = s X Aᵀ alone, by one GEMM path.
    fn skinny(&mut self, path: GemmPath, i: usize) -> Result<()> {
        gemm_cuda(path, &Gemm { alpha: 2.0, ..NT }, &self.xs[i], &self.a, &mut self.fwd.u)
    }
}

/// One timed piece of work of the grid.
#[derive(Clone, Copy)]
enum Work {
    BaseFwd,
    BaseFwdBwd,
    Fwd(LoraPath),
    FwdBwd(LoraPath),
    Accumulate(LoraPath),
    Skinny(GemmPath),
    /// V' = s dY B and dB = dYᵀ U': one pass over dY (true) or cuBLAS's two GEMMs.
    DyProducts(bool),
}

impl Layer {
    fn run(&mut self, work: Work, i: usize) -> Result<()> {
        match work {
            Work::BaseFwd => self.base_fwd(i),
            Work::BaseFwdBwd => self.base_fwd_bwd(i),
            Work::Fwd(path) => self.fwd(path, i),
            Work::FwdBwd(path) => self.fwd_bwd(path, i),
            Work::Accumulate(path) => self.accumulate(path, i),
            Work::Skinny(path) => self.skinny(path, i),
            Work::DyProducts(one_pass) => self.dy_products(one_pass, i),
        }
    }
}

fn criterion_groups(dev: &CudaDevice, c: &mut criterion::Criterion, inp: &mut Inputs) {
    let (m, k, n) = (8192usize, 4096usize, 4096usize);
    let mut layer = Layer::new(inp, m, k, n);
    let mut rows = Vec::new();
    let base_flops = 2.0 * (m * n * k) as f64;
    let row = |problem: &str, implementation: &str, median_ms: f64, flops: f64| Row {
        problem: problem.into(),
        implementation: implementation.into(),
        median_ms,
        flops,
    };

    for r in [16usize, 64] {
        layer.rank(inp, r);
        let problem = format!("forward M={m} K={k} N={n} r={r}");
        let mut g = group(c, &format!("lora_fwd_r{r}"), base_flops);
        let ms = measure(dev, &mut g, "cublas base X W^T", |i| layer.base_fwd(i));
        rows.push(row(&problem, "cublas", ms, base_flops));
        for path in PATHS {
            let ms = measure(dev, &mut g, &format!("lora {}", path.name()), |i| layer.fwd(path, i));
            rows.push(row(&problem, &format!("lora {}", path.name()), ms, base_flops));
        }
        g.finish();

        let problem = format!("forward+backward M={m} K={k} N={n} r={r}");
        let mut g = group(c, &format!("lora_fwd_bwd_r{r}"), 2.0 * base_flops);
        let ms = measure(dev, &mut g, "cublas base X W^T + dY W", |i| layer.base_fwd_bwd(i));
        rows.push(row(&problem, "cublas", ms, 2.0 * base_flops));
        for path in PATHS {
            let ms = measure(dev, &mut g, &format!("lora {}", path.name()), |i| layer.fwd_bwd(path, i));
            rows.push(row(&problem, &format!("lora {}", path.name()), ms, 2.0 * base_flops));
        }
        g.finish();

        // The skinny product alone, to see which GEMM serves it best.
        let skinny_flops = 2.0 * (m * k * r) as f64;
        let problem = format!("U' = s X A^T M={m} K={k} r={r}");
        let mut g = group(c, &format!("lora_skinny_r{r}"), skinny_flops);
        for (name, path) in [("cublas", GemmPath::Cublas), ("engine", GemmPath::Engine)] {
            let ms = measure(dev, &mut g, name, |i| layer.skinny(path, i));
            rows.push(row(&problem, name, ms, skinny_flops));
        }
        g.finish();

        // The backward's two products that read dY, where the one-pass kernel takes them.
        if lora_dy::takes(dev, DType::BF16, m, n, r) {
            let dy_flops = 4.0 * (m * n * r) as f64;
            let problem = format!("V' = s dY B and dB = dY^T U' M={m} N={n} r={r}");
            let mut g = group(c, &format!("lora_dy_r{r}"), dy_flops);
            for (name, one_pass) in [("cublas", false), ("one pass", true)] {
                let ms = measure(dev, &mut g, name, |i| layer.dy_products(one_pass, i));
                rows.push(row(&problem, name, ms, dy_flops));
            }
            g.finish();
        }
    }

    let problem = format!("G += dY^T X, M={m}, G {n}x{k} f32");
    let mut g = group(c, "weight_grad_accumulate", base_flops);
    for (name, path) in [("cublas", LoraPath::CublasFolded), ("fused", LoraPath::Fused)] {
        let ms = measure(dev, &mut g, name, |i| layer.accumulate(path, i));
        rows.push(row(&problem, name, ms, base_flops));
    }
    g.finish();

    c.final_summary();
    summary::emit("lora_linear", "LoRA layer, bf16, fp32 accumulation (CUDA events, median per run)", &rows, "cublas");
}

/// Whether `LORA_FILTER` keeps a shape's label: it contains every comma-separated term.
fn kept(label: &str) -> bool {
    let filter = std::env::var("LORA_FILTER").unwrap_or_default();
    filter.split(',').filter(|t| !t.is_empty()).all(|t| label.contains(t))
}

/// The shapes `LORA_FILTER` keeps, as (label, M, K, N, r).
fn kept_shapes() -> Vec<(String, usize, usize, usize, usize)> {
    let mut shapes = Vec::new();
    for m in [4096usize, 8192, 16384] {
        for (k, n) in [(4096usize, 4096usize), (4096, 11008), (11008, 4096)] {
            for r in [8usize, 16, 64, 128] {
                let label = format!("M={m} K={k} N={n} r={r}");
                if kept(&label) {
                    shapes.push((label, m, k, n, r));
                }
            }
        }
    }
    shapes
}

/// `LORA_BENCH=kernels`: one piece of work per kept shape, 2 + 5 runs, for a kernel profiler.
fn kernels(dev: &CudaDevice, inp: &mut Inputs) -> Result<()> {
    let work = match std::env::var("LORA_WORK").as_deref() {
        Ok("base") => Work::BaseFwdBwd,
        Ok("fused") => Work::FwdBwd(LoraPath::Fused),
        Ok("peft") => Work::FwdBwd(LoraPath::Cublas),
        other => panic!("LORA_WORK must be base, fused or peft, got {other:?}"),
    };
    for (label, m, k, n, r) in kept_shapes() {
        let mut layer = Layer::new(inp, m, k, n);
        layer.rank(inp, r);
        dev.synchronize()?;
        eprintln!("{label}: 2 warm-up runs, then 5");
        for i in 0..7 {
            layer.run(work, i % 3)?;
        }
        dev.synchronize()?;
    }
    Ok(())
}

/// The grid, one row per shape; prints the table and writes it to
/// `$LORAGA_BENCH_OUT/lora_linear_grid.md` when that is set.
fn grid(dev: &CudaDevice, inp: &mut Inputs) -> Result<()> {
    let reps: usize = std::env::var("LORA_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let batch: usize = std::env::var("LORA_BATCH").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut table = format!(
        "### LoRA layer grid (issue 4), bf16, s = 2, CUDA-event medians (ms), {batch} run(s) a sample\n\n\
         | M | K | N | r | base fwd | fused fwd | fused / base fwd | PEFT fwd / fused | base f+b | fused f+b \
         | fused / base f+b | PEFT f+b | PEFT / fused f+b | folded / fused f+b | U' engine | U' cuBLAS \
         | V' + dB cuBLAS | V' + dB one pass |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut g_table = String::from(
        "\n### G += dYᵀ X in place (f32 G [N, K]), ms\n\n\
         | M | K | N | cuBLAS GemmEx beta=1 | fused (engine TMA add) | fused / cuBLAS |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    // The kept shapes, a layer (operands of one M, K, N) at a time.
    let shapes = kept_shapes();
    for shape in shapes.chunk_by(|a, b| (a.1, a.2, a.3) == (b.1, b.2, b.3)) {
        let (_, m, k, n, _) = shape[0];
        let mut layer = Layer::new(inp, m, k, n);
        let mut turn = 0usize;
        let mut time = |layer: &mut Layer, work: &[Work]| -> Result<Vec<f64>> {
            interleaved_median_ms(dev, 3, reps, batch, work.len(), |j| {
                turn = (turn + 1) % 3;
                layer.run(work[j], turn)
            })
        };
        let acc = time(&mut layer, &[Work::Accumulate(LoraPath::CublasFolded), Work::Accumulate(LoraPath::Fused)])?;
        let (cublas_acc, fused_acc) = (acc[0], acc[1]);
        g_table += &format!("| {m} | {k} | {n} | {cublas_acc:.4} | {fused_acc:.4} | {:.3} |\n", fused_acc / cublas_acc);
        for &(ref label, .., r) in shape {
            layer.rank(inp, r);
            let t = time(
                &mut layer,
                &[
                    Work::BaseFwd,
                    Work::Fwd(LoraPath::Fused),
                    Work::Fwd(LoraPath::Cublas),
                    Work::BaseFwdBwd,
                    Work::FwdBwd(LoraPath::Fused),
                    Work::FwdBwd(LoraPath::Cublas),
                    Work::FwdBwd(LoraPath::CublasFolded),
                    Work::Skinny(GemmPath::Engine),
                    Work::Skinny(GemmPath::Cublas),
                ],
            )?;
            let [base, fused, peft, base_fb, fused_fb, peft_fb, folded_fb, u_engine, u_cublas] = t[..] else {
                unreachable!("nine alternatives")
            };
            let one_pass = lora_dy::takes(dev, DType::BF16, m, n, r);
            let dy = time(&mut layer, &[Work::DyProducts(false), Work::DyProducts(true)][..1 + one_pass as usize])?;
            let dy_cublas = dy[0];
            let dy_once = dy.get(1).map_or("–".to_string(), |t| format!("{t:.4}"));
            eprintln!("{label}: fused f+b {fused_fb:.4} ms");
            table += &format!(
                "| {m} | {k} | {n} | {r} | {base:.4} | {fused:.4} | {:.3} | {:.3} | {base_fb:.4} | {fused_fb:.4} \
                 | {:.3} | {peft_fb:.4} | {:.3} | {:.3} | {u_engine:.4} | {u_cublas:.4} | {dy_cublas:.4} | {dy_once} |\n",
                fused / base,
                peft / fused,
                fused_fb / base_fb,
                peft_fb / fused_fb,
                folded_fb / fused_fb,
            );
        }
    }
    let out = format!("{table}{g_table}");
    println!("\n{out}");
    loraga::summary::save("lora_linear_grid", &out);
    Ok(())
}
