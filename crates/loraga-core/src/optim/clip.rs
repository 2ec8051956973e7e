//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_` (L2, the default):
//!
//! ```text
//! norm = sqrt( Σ_params Σ_i g_i² )          over every trainable parameter that has a gradient
//! coef = max_norm / (norm + 1e-6)           (f32, as torch computes it on the norm tensor)
//! g   ← g · coef   for every gradient, when coef < 1
//! ```
//!
//! torch multiplies by `clamp(coef, max=1)` unconditionally; a product with 1 is exact, so
//! skipping it is the same result. As in torch, a norm just under `max_norm` (within 1e-6) is
//! still scaled, by a factor just under 1.
//!
//! The sums of squares are in f64 (torch sums in f32 per tensor, then takes the norm of the
//! norms; the difference is rounding, ~1e-7 relative), in a fixed order, so the result does not
//! depend on threads or launch shapes. On the GPU they come from `kernels/grad_norm.cu` (one
//! launch per device for all gradients, one sync to read the sums back); the scale is one more
//! launch. A NaN or Inf anywhere is an error naming the first parameter (in parameter order)
//! whose gradient holds one, and the gradients are then left as they were.

use rayon::prelude::*;

use super::{by_device, cuda, nonfinite_error};
use crate::autograd::Params;
use crate::cpu::CpuStorage;
use crate::dtype::WithDType;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// torch's `clip_grad_norm_` guard against a zero norm.
const NORM_EPS: f32 = 1e-6;
/// Elements per rayon task on the CPU.
const CPU_CHUNK: usize = 1 << 14;

/// Clips the gradients of every trainable parameter to a global L2 norm of `max_norm` and returns
/// the norm before clipping. `f32::INFINITY` measures without clipping.
pub fn clip_grad_norm(params: &mut Params, max_norm: f32) -> Result<f32> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::InvalidArgument(format!("clip_grad_norm: max_norm {max_norm} must be > 0")));
    }
    let grads: Vec<(&str, &Tensor)> =
        params.iter().filter(|p| p.trainable()).filter_map(|p| Some((p.name(), p.grad()?))).collect();
    let sums = sum_squares(&grads)?;
    check_finite("clip_grad_norm", &grads, &sums)?;
    let norm = sums.iter().sum::<f64>().sqrt() as f32;
    if !norm.is_finite() {
        return Err(Error::InvalidArgument(format!("clip_grad_norm: the gradient norm {norm} overflows f32")));
    }
    let coef = max_norm / (norm + NORM_EPS);
    if coef < 1.0 {
        let grads: Vec<&mut Tensor> =
            params.iter_mut().filter(|p| p.trainable()).filter_map(|p| p.grad_mut()).collect();
        scale(grads, coef)?;
    }
    Ok(norm)
}

/// An error naming the first gradient whose sum of squares is NaN or Inf: it holds a NaN/Inf.
pub(crate) fn check_finite(op: &'static str, grads: &[(&str, &Tensor)], sums: &[f64]) -> Result<()> {
    match grads.iter().zip(sums).find(|(_, s)| !s.is_finite()) {
        Some(((name, g), _)) => Err(nonfinite_error(op, name, g)?),
        None => Ok(()),
    }
}

/// Σ g² of each tensor in f64, in order; CPU tensors here, CUDA ones in one launch per device.
pub(crate) fn sum_squares(grads: &[(&str, &Tensor)]) -> Result<Vec<f64>> {
    let mut sums = vec![0.0; grads.len()];
    let (cpu, gpus) = by_device(grads.iter().enumerate().collect(), |(_, (_, g))| g.storage());
    for (i, (_, g)) in cpu {
        sums[i] = match g.storage() {
            Storage::Cpu(CpuStorage::F32(v)) => sum_squares_cpu(v),
            Storage::Cpu(CpuStorage::BF16(v)) => sum_squares_cpu(v),
            Storage::Cuda(_) => unreachable!("by_device put CUDA tensors in the GPU groups"),
        };
    }
    for (dev, items) in gpus {
        let storages: Vec<_> = items.iter().map(|(_, (_, g))| cuda_storage(g)).collect();
        for ((i, _), s) in items.iter().zip(cuda::sum_squares(&dev, &storages)?) {
            sums[*i] = s;
        }
    }
    Ok(sums)
}

/// Per-chunk partial sums collected in order, then added in order: the same result on any
/// number of threads.
fn sum_squares_cpu<T: WithDType>(v: &[T]) -> f64 {
    let partial: Vec<f64> =
        v.par_chunks(CPU_CHUNK).map(|c| c.iter().map(|&x| (x.to_f32() as f64).powi(2)).sum::<f64>()).collect();
    partial.iter().sum()
}

fn cuda_storage(t: &Tensor) -> &crate::cuda::CudaStorage {
    match t.storage() {
        Storage::Cuda(s) => s,
        Storage::Cpu(_) => unreachable!("by_device put CPU tensors in the CPU group"),
    }
}

/// g ← g · coef for every tensor (f32 product, rounded back to the tensor's dtype).
fn scale(grads: Vec<&mut Tensor>, coef: f32) -> Result<()> {
    let (cpu, gpus) = by_device(grads, |g| g.storage());
    for g in cpu {
        match g.storage_mut() {
            Storage::Cpu(CpuStorage::F32(v)) => {
                v.par_chunks_mut(CPU_CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x *= coef))
            }
            Storage::Cpu(CpuStorage::BF16(v)) => v
                .par_chunks_mut(CPU_CHUNK)
                .for_each(|c| c.iter_mut().for_each(|x| *x = half::bf16::from_f32(x.to_f32() * coef))),
            Storage::Cuda(_) => unreachable!("by_device put CUDA tensors in the GPU groups"),
        }
    }
    for (dev, items) in gpus {
        let mut storages: Vec<_> = items
            .into_iter()
            .map(|g| match g.storage_mut() {
                Storage::Cuda(s) => s,
                Storage::Cpu(_) => unreachable!("by_device put CPU tensors in the CPU group"),
            })
            .collect();
        cuda::scale(&dev, &mut storages, coef)?;
    }
    Ok(())
}
