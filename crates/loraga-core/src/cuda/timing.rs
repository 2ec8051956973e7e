//! Timing device work with CUDA events, as every loraga benchmark does: events bracket the work
//! on the stream, so host overhead and launch queueing stay out of the numbers.

use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;

use super::device::CudaDevice;
use crate::error::{Error, Result};

/// Device time of `iters` back-to-back runs of `f` (which only enqueues work on the device's
/// stream).
pub fn time_iters(device: &CudaDevice, iters: u64, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let stream = device.stream();
    // Timing events must not be created with the (default) DISABLE_TIMING flag.
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(Error::cuda("cuEventRecord"))?;
    for _ in 0..iters {
        f()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(Error::cuda("cuEventRecord"))?;
    let ms = start.elapsed_ms(&end).map_err(Error::cuda("cuEventElapsedTime"))?;
    Ok(Duration::from_secs_f64(ms as f64 * 1e-3))
}

/// Median milliseconds of `reps` single timed runs after `warmup` untimed ones.
pub fn median_ms(device: &CudaDevice, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(interleaved_median_ms(device, warmup, reps, 1, 1, |_| f())?[0])
}

/// Median milliseconds a run of each of `n` alternatives, from `reps` timed samples of each taken
/// in rounds (a sample of 0, of 1, ..., of n - 1, then the next round) after `warmup` untimed
/// rounds; a sample is `batch` back-to-back runs (its time / `batch`); `f(j)` enqueues one run of
/// alternative j. Rounds put every alternative under the same clocks and power state, which drift
/// over a benchmark's seconds: the ratios between the medians are what to compare, and they hold
/// better than those of alternatives timed one after the other. A batch of 1 times single runs,
/// with the GPU idle between samples; larger batches keep it busy, as training does (clocks under
/// sustained load are lower).
pub fn interleaved_median_ms(
    device: &CudaDevice,
    warmup: usize,
    reps: usize,
    batch: usize,
    n: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let batch = batch.max(1);
    for _ in 0..warmup {
        for j in 0..n {
            f(j)?;
        }
    }
    let mut times = vec![Vec::with_capacity(reps); n];
    for _ in 0..reps {
        for (j, t) in times.iter_mut().enumerate() {
            t.push(time_iters(device, batch as u64, || f(j))?.as_secs_f64() * 1e3 / batch as f64);
        }
    }
    Ok(times.iter_mut().map(|t| median(t)).collect())
}

/// The median of a non-empty sample (mean of the middle two for even sizes).
pub fn median(xs: &mut [f64]) -> f64 {
    assert!(!xs.is_empty(), "median of an empty sample");
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) }
}
