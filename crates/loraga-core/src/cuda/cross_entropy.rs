//! Mean cross-entropy with an ignore index on the device, with the semantics of the CPU op in
//! [`crate::autograd::loss`]: loss = mean over rows r with `t[r] != -100` of
//! `logsumexp(x[r]) − x[r, t[r]]`, and `d loss / d x[r] = (softmax(x[r]) − onehot(t[r])) · g / count`
//! (zero rows where `t[r] = -100`).
//!
//! Kernels in `kernels/cross_entropy.cu`: one block per row makes one online (max, sum) pass and
//! keeps (max, sum) per row for the backward, so the backward is one read of the logits and one
//! write of the gradient, with no reduction. The mean is a second, one-block kernel that sums the
//! rows' losses in f64 in a fixed order (deterministic, no atomics). Logits are f32 or bf16, the
//! arithmetic f32, the loss f32; the gradient has the logits' dtype. Memory-bound: the logits are
//! read once forward and once backward and the gradient written once (SmolLM2 at 8 × 1024 tokens:
//! 0.8 GB of bf16 logits, ~0.25 ms per pass at H200 bandwidth, estimated); besides the gradient,
//! the state kept between the passes is 8 bytes per row plus the targets.
//!
//! Targets are checked on the host before anything runs (as on the CPU): a target outside
//! [0, vocab) that is not the ignore index, or no target that counts, is an error.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::storage::CudaStorage;
use super::typed::DeviceElem;
use crate::autograd::loss::{check_targets, count_targets};
use crate::dtype::DType;
use crate::error::{Error, Result};

const OP: &str = "cross_entropy";
/// Threads per block of every kernel in `kernels/cross_entropy.cu` (its `THREADS`).
const THREADS: u32 = 256;

/// What the forward pass leaves for the backward: the targets on the device, each row's maximum
/// and sum of exp(x − max), and the number of rows that count.
pub struct CrossEntropyState {
    targets: CudaSlice<i64>,
    row_max: CudaSlice<f32>,
    row_sum: CudaSlice<f32>,
    n: usize,
    vocab: usize,
    count: usize,
    device: CudaDevice,
}

/// The mean cross-entropy of `logits` [n, vocab] against `targets` into `loss` (f32, one
/// element), and the state its backward needs.
pub fn forward(
    logits: &CudaStorage,
    n: usize,
    vocab: usize,
    targets: &[i64],
    loss: &mut CudaStorage,
) -> Result<CrossEntropyState> {
    let count = count_targets(n, vocab, targets)?;
    check_logits(logits, n, vocab, "the logits")?;
    check_scalar(logits, loss, "the loss")?;
    let (state, row_loss) = CrossEntropyState::rows(logits, n, vocab, targets, count)?;
    let dev = &state.device;
    let stream = dev.stream();
    let out =
        f32::slice_mut(&mut loss.slice).ok_or_else(|| Error::DType { op: OP, msg: "the loss must be f32".into() })?;
    let f = dev.function("cross_entropy", "cross_entropy_mean_f32")?;
    let (rows, counted) = (n as i32, count as i32);
    let mut launch = stream.launch_builder(&f);
    launch.arg(&row_loss).arg(&rows).arg(&counted).arg(out);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: cross_entropy_mean_f32(const float*, int n, int count, float*): row_loss holds n,
    // the loss one element.
    unsafe { launch.launch(one) }.map_err(Error::cuda("cuLaunchKernel(cross_entropy_mean)"))?;
    Ok(state)
}

/// Each row's cross-entropy `logsumexp(x[r]) − x[r, t[r]]` (0 where `t[r] = -100`), f32 on the
/// device: what evaluation needs without bringing [n, vocab] logits to the host.
pub fn row_losses(logits: &CudaStorage, n: usize, vocab: usize, targets: &[i64]) -> Result<CudaSlice<f32>> {
    let count = check_targets(n, vocab, targets)?;
    check_logits(logits, n, vocab, "the logits")?;
    Ok(CrossEntropyState::rows(logits, n, vocab, targets, count)?.1)
}

/// d loss / d logits into `dlogits` (the logits' shape and dtype), for the upstream gradient `g`
/// of the loss (f32, one element, on the same device).
pub fn backward(
    logits: &CudaStorage,
    state: &CrossEntropyState,
    g: &CudaStorage,
    dlogits: &mut CudaStorage,
) -> Result<()> {
    let (n, vocab) = (state.n, state.vocab);
    check_logits(logits, n, vocab, "the logits")?;
    check_logits(dlogits, n, vocab, "the gradient")?;
    check_scalar(logits, g, "the upstream gradient")?;
    if logits.device != state.device || dlogits.device != state.device {
        return Err(Error::DeviceMismatch {
            op: OP,
            lhs: format!("the forward pass on {:?}", state.device),
            rhs: format!("logits on {:?} and their gradient on {:?}", logits.device, dlogits.device),
        });
    }
    if dlogits.dtype() != logits.dtype() {
        return Err(Error::DType {
            op: OP,
            msg: format!("logits are {} but their gradient is {}", logits.dtype(), dlogits.dtype()),
        });
    }
    match logits.dtype() {
        DType::F32 => state.gradient::<f32>(logits, g, dlogits),
        DType::BF16 => state.gradient::<half::bf16>(logits, g, dlogits),
    }
}

impl CrossEntropyState {
    /// The state of a forward pass over checked logits and targets, and every row's loss.
    fn rows(
        logits: &CudaStorage,
        n: usize,
        vocab: usize,
        targets: &[i64],
        count: usize,
    ) -> Result<(CrossEntropyState, CudaSlice<f32>)> {
        let dev = logits.device.clone();
        let stream = dev.stream();
        let alloc = || {
            // SAFETY: cross_entropy_fwd writes every row's entry.
            unsafe { stream.alloc::<f32>(n) }.map_err(Error::cuda("cuMemAlloc"))
        };
        let mut state = CrossEntropyState {
            targets: stream.clone_htod(targets).map_err(Error::cuda("cuMemcpyHtoD"))?,
            row_max: alloc()?,
            row_sum: alloc()?,
            n,
            vocab,
            count,
            device: dev.clone(),
        };
        let mut row_loss = alloc()?;
        match logits.dtype() {
            DType::F32 => state.row_losses::<f32>(logits, &mut row_loss)?,
            DType::BF16 => state.row_losses::<half::bf16>(logits, &mut row_loss)?,
        }
        Ok((state, row_loss))
    }

    /// Each row's max and sum into the state, its loss into `row_loss`.
    fn row_losses<T: DeviceElem>(&mut self, logits: &CudaStorage, row_loss: &mut CudaSlice<f32>) -> Result<()> {
        let x = T::slice(&logits.slice).ok_or_else(|| dtype_error::<T>("the logits"))?;
        let f = self.device.function("cross_entropy", &format!("cross_entropy_fwd_{}", T::DTYPE))?;
        let vocab = self.vocab as i32;
        let mut launch = self.device.stream().launch_builder(&f);
        launch.arg(x).arg(&self.targets).arg(&mut self.row_max).arg(&mut self.row_sum).arg(row_loss).arg(&vocab);
        // SAFETY: cross_entropy_fwd_<T>(const T*, const i64*, float*, float*, float*, int vocab):
        // logits hold n·vocab elements (checked), the others n; every target is -100 or in
        // [0, vocab) (count_targets); one block per row.
        unsafe { launch.launch(per_row(self.n)) }.map_err(Error::cuda("cuLaunchKernel(cross_entropy_fwd)"))?;
        Ok(())
    }

    fn gradient<T: DeviceElem>(&self, logits: &CudaStorage, g: &CudaStorage, dlogits: &mut CudaStorage) -> Result<()> {
        let x = T::slice(&logits.slice).ok_or_else(|| dtype_error::<T>("the logits"))?;
        let g = f32::slice(&g.slice).ok_or_else(|| dtype_error::<f32>("the upstream gradient"))?;
        let dx = T::slice_mut(&mut dlogits.slice).ok_or_else(|| dtype_error::<T>("the gradient"))?;
        let f = self.device.function("cross_entropy", &format!("cross_entropy_bwd_{}", T::DTYPE))?;
        let (count, vocab) = (self.count as i32, self.vocab as i32);
        let mut launch = self.device.stream().launch_builder(&f);
        launch.arg(x).arg(&self.targets).arg(&self.row_max).arg(&self.row_sum).arg(g).arg(&count).arg(dx).arg(&vocab);
        // SAFETY: cross_entropy_bwd_<T>(const T*, const i64*, const float*, const float*,
        // const float* g, int count, T*, int vocab): logits and gradient hold n·vocab elements
        // (checked), the state's buffers n, g one; targets were checked by the forward.
        unsafe { launch.launch(per_row(self.n)) }.map_err(Error::cuda("cuLaunchKernel(cross_entropy_bwd)"))?;
        Ok(())
    }
}

fn dtype_error<T: DeviceElem>(what: &str) -> Error {
    Error::DType { op: OP, msg: format!("{what} must be {}", T::DTYPE) }
}

/// `what` holds n·vocab elements, within the kernels' 32-bit row and vocabulary limits.
fn check_logits(x: &CudaStorage, n: usize, vocab: usize, what: &str) -> Result<()> {
    if Some(x.len()) != n.checked_mul(vocab) {
        return Err(Error::shape(OP, format!("{what} has {} elements, not [{n}, {vocab}]", x.len())));
    }
    if n > i32::MAX as usize || vocab > i32::MAX as usize {
        return Err(Error::shape(OP, format!("[{n}, {vocab}] exceeds the 32-bit limit of the kernels")));
    }
    Ok(())
}

/// A one-element f32 buffer on the logits' device.
fn check_scalar(logits: &CudaStorage, x: &CudaStorage, what: &str) -> Result<()> {
    if x.device != logits.device {
        return Err(Error::DeviceMismatch {
            op: OP,
            lhs: format!("logits on {:?}", logits.device),
            rhs: format!("{what} on {:?}", x.device),
        });
    }
    if x.dtype() != DType::F32 || x.len() != 1 {
        return Err(Error::DType { op: OP, msg: format!("{what} must be one f32, got {} x{}", x.dtype(), x.len()) });
    }
    Ok(())
}

fn per_row(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}
