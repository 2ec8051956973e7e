//! Optimizers for the training loop, each matching its PyTorch / transformers counterpart:
//!
//! - [`AdamW`]: `torch.optim.AdamW` (decoupled weight decay, bias correction), on the CPU and as
//!   one fused multi-tensor kernel on the GPU (`kernels/adamw.cu`); its state saves and loads
//!   through safetensors for checkpoint resume.
//! - [`clip_grad_norm`]: `torch.nn.utils.clip_grad_norm_` over every trainable parameter
//!   (`kernels/grad_norm.cu` on the GPU).
//! - [`LrSchedule`]: transformers' constant, linear and cosine schedules with linear warmup.
//!
//! A training step is: backward passes (gradients accumulate in [`Params`](crate::autograd::Params)),
//! drop the tapes, `clip_grad_norm`, `opt.set_lr(schedule.lr_at(steps_done))`, `opt.step`,
//! `params.zero_grad()`. Parameters are the f32 master copies; on the GPU the bf16 copies the
//! forward pass uses are made from them on the tape, not here.

mod adamw;
mod clip;
mod cuda;
mod schedule;

#[cfg(test)]
mod tests;

pub use adamw::{AdamW, AdamWConfig, ParamState};
pub use clip::clip_grad_norm;
pub use schedule::{Decay, LrSchedule, warmup_steps_from_ratio};

use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// Splits `items` by where their tensor lives: the CPU ones, then one group per CUDA device in
/// order of first appearance, each keeping the items' order (so one launch per device).
pub(crate) fn by_device<T>(items: Vec<T>, storage: impl Fn(&T) -> &Storage) -> (Vec<T>, Vec<(CudaDevice, Vec<T>)>) {
    let mut cpu = Vec::new();
    let mut gpus: Vec<(CudaDevice, Vec<T>)> = Vec::new();
    for item in items {
        let dev = match storage(&item) {
            Storage::Cpu(_) => None,
            Storage::Cuda(s) => Some(s.device.clone()),
        };
        match dev {
            None => cpu.push(item),
            Some(dev) => match gpus.iter_mut().find(|(d, _)| *d == dev) {
                Some((_, group)) => group.push(item),
                None => gpus.push((dev, vec![item])),
            },
        }
    }
    (cpu, gpus)
}

/// The error for a gradient known to hold a NaN or Inf: where the first one is and its value
/// (the gradient is copied to the host to find it; this is the failure path only).
pub(crate) fn nonfinite_error(op: &'static str, name: &str, grad: &Tensor) -> Result<Error> {
    let values = grad.to_f32_vec()?;
    let Some(idx) = values.iter().position(|x| !x.is_finite()) else {
        return Ok(Error::layer(op, name, "the gradient's sum of squares is not finite"));
    };
    // Position as [row, col] of the last dimension (a vector is one row).
    let cols = match grad.dims() {
        [.., c] if grad.dims().len() >= 2 => (*c).max(1),
        _ => values.len().max(1),
    };
    Ok(Error::NonFinite { op, name: name.to_string(), row: idx / cols, col: idx % cols, value: values[idx] })
}
