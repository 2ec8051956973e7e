//! Shared by the benches: a Criterion group set up for GPU work, and CUDA-event timing of one
//! implementation over rotating input sets.

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use loraga_core::Result;
use loraga_core::cuda::CudaDevice;
use loraga_core::cuda::timing::{median, time_iters};

/// The GPU and a Criterion set up for GPU benches (1 s warm-up, 3 s of samples, command-line
/// options honoured). Without a usable GPU the bench says why and exits with status 1.
pub fn setup(bench: &str) -> (CudaDevice, Criterion) {
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("the {bench} bench needs a CUDA GPU: {e}");
            std::process::exit(1);
        }
    };
    let criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    (dev, criterion)
}

/// A group with Flat sampling (every sample the same number of runs) of 10 samples; Criterion's
/// "elements" are the floating-point operations of one run, so its Gelem/s reads as GFLOP/s.
pub fn group<'a>(c: &'a mut Criterion, name: &str, flops: f64) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat).sample_size(10).throughput(Throughput::Elements(flops as u64));
    g
}

/// Benchmarks `run(set_index)` with CUDA-event timing, rotating over three operand sets, and
/// returns the median milliseconds per run over Criterion's samples, or NaN when a Criterion
/// filter on the command line skipped it (the summary leaves such rows out).
pub fn measure(
    dev: &CudaDevice,
    group: &mut BenchmarkGroup<WallTime>,
    name: &str,
    mut run: impl FnMut(usize) -> Result<()>,
) -> f64 {
    let mut per_iter_ms = Vec::new();
    let mut turn = 0usize;
    let mut warm = false;
    group.bench_function(name, |b| {
        // Warm-up (module load, handles, clocks) inside, so a function the filter skips runs nothing.
        if !warm {
            (0..3).for_each(|i| run(i).unwrap());
            warm = true;
        }
        b.iter_custom(|iters| {
            let t = time_iters(dev, iters, || {
                turn = (turn + 1) % 3;
                run(turn)
            })
            .unwrap();
            per_iter_ms.push(t.as_secs_f64() * 1e3 / iters as f64);
            t
        })
    });
    if per_iter_ms.is_empty() { f64::NAN } else { median(&mut per_iter_ms) }
}
