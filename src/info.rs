//! `loraga info`: what this machine offers loraga, and a self-check of the GEMM on each device.

use std::fmt::Write as _;
use std::time::Instant;

use loraga_core::cuda::{self, CudaDevice, GemmPath};
use loraga_core::gemm::{Gemm, gemm, gemm_cuda};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;

/// The report as text. Never fails for lack of a GPU: that is reported, and the CPU is checked.
pub fn report() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "loraga {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "cpu: {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()));
    match cpu_self_check() {
        Ok(line) => {
            let _ = writeln!(out, "cpu gemm self-check: {line}");
        }
        Err(e) => {
            let _ = writeln!(out, "cpu gemm self-check FAILED: {e}");
        }
    }
    let t0 = Instant::now();
    match CudaDevice::new(0) {
        Err(e) => {
            let _ = writeln!(out, "gpu: none usable ({e}); loraga runs on the CPU");
        }
        Ok(dev) => {
            let ctx_ms = t0.elapsed().as_secs_f64() * 1e3;
            let (free, total) = dev.memory().unwrap_or((0, 0));
            let _ = writeln!(
                out,
                "gpu: {} ({}), {:.1} of {:.1} GiB free, context in {ctx_ms:.0} ms",
                dev.name(),
                dev.arch(),
                gib(free),
                gib(total)
            );
            let _ = writeln!(
                out,
                "kernel cache: {}",
                dev.kernel_cache().dir().map_or("off".into(), |d| d.display().to_string())
            );
            // The self-check runs first so that its first-launch time includes everything a
            // fresh process pays before its first kernel (opening NVRTC for the cache key too).
            match gpu_self_check(&dev) {
                Ok(lines) => out.push_str(&lines),
                Err(e) => {
                    let _ = writeln!(out, "gpu self-check FAILED: {e}");
                }
            }
            match cuda::nvrtc::version() {
                Ok((a, b)) => {
                    let _ = writeln!(out, "nvrtc: {a}.{b}");
                }
                Err(e) => {
                    let _ = writeln!(out, "nvrtc: {e}");
                }
            }
        }
    }
    out
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

const N: usize = 384;

fn inputs(device: &Device, dtype: DType) -> Result<(Tensor, Tensor, Vec<f64>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (a, b) = (randn(&mut rng, N * N), randn(&mut rng, N * N));
    let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    let mut r = vec![0.0; N * N];
    let g = Gemm::default();
    loraga_core::cpu::gemm::gemm_f64(&g, g.dims(&[N, N], &[N, N], &[N, N])?, &a64, &b64, &mut r);
    let ta = Tensor::from_vec(a, [N, N], &Device::Cpu)?;
    let tb = Tensor::from_vec(b, [N, N], &Device::Cpu)?;
    let _ = dtype;
    Ok((ta.to_device(device)?, tb.to_device(device)?, r))
}

fn cpu_self_check() -> Result<String> {
    let (a, b, r) = inputs(&Device::Cpu, DType::F32)?;
    let mut c = Tensor::full([N, N], DType::F32, f32::NAN, &Device::Cpu)?;
    let t = Instant::now();
    gemm(&Gemm::default(), &a, &b, &mut c)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(format!("f32 {N}^3 rel. error {:.1e}, {ms:.2} ms", rel_error(&c.to_f32_vec()?, &r)))
}

/// Runs the naive kernel once (timing the first launch: module from cache or NVRTC, plus the
/// launch) and cuBLAS once, each against the f64 reference.
fn gpu_self_check(dev: &CudaDevice) -> Result<String> {
    let device = Device::Cuda(dev.clone());
    let (a, b, r) = inputs(&device, DType::F32)?;
    let mut out = String::new();
    for path in [GemmPath::Naive, GemmPath::Cublas] {
        let mut c = Tensor::full([N, N], DType::F32, f32::NAN, &device)?;
        let t = Instant::now();
        gemm_cuda(path, &Gemm::default(), &a, &b, &mut c)?;
        dev.synchronize()?;
        let first_ms = t.elapsed().as_secs_f64() * 1e3;
        let origin = match path {
            GemmPath::Naive => {
                let (_, load) = dev.module("gemm_naive")?;
                format!("module {:?} in {:.1} ms", load.origin, load.millis)
            }
            _ => "cuBLAS handle created on first use".into(),
        };
        let err = rel_error(&c.to_f32_vec()?, &r);
        let _ = writeln!(
            out,
            "gpu gemm {} f32 {N}^3: rel. error {err:.1e}; first launch {first_ms:.1} ms ({origin})",
            path.name()
        );
    }
    Ok(out)
}
