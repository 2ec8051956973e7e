//! Gradient sinks: caller-owned f32 buffers that a backward pass adds named weights' gradients
//! into, `G += alpha * dL/dW`, instead of handing each gradient over as a new tensor.
//!
//! An op whose gradient with respect to a weight input is `dYᵀ X` (the linear layer, W [N, K],
//! X [M, K], dY [M, N]) declares so when it is recorded ([`super::Tape`]'s `push_weight_op`).
//! When that weight has a sink, the walk runs the accumulation GEMM `G += alpha * dYᵀ X` straight
//! into the buffer (fp32 accumulation, beta = 1: faer on the CPU, the GEMM engine's in-place fp32
//! epilogue on the GPU where it applies, else the naive kernel) and tells the op that it need not
//! compute dW, so no [N, K] gradient tensor is ever created. That is the call
//! `lora_linear::accumulate_weight_grad` makes, through the backend's automatic path rather than
//! a fixed one, so that f32 activations and GPUs without the engine (pre-Hopper) take the naive
//! kernel, as the linear op's own dW does, instead of an error. Gradient that reaches the weight by
//! any other route (a tied embedding, an op without the declaration) is added into the same
//! buffer, so the buffer always receives the whole `alpha * dL/dW`.
//!
//! A weight with a sink must be declared on the tape before the forward pass uses it
//! ([`super::Tape::sink`]): its gradient is then computed even when the parameter is frozen, and
//! neither the gradient hook nor the parameter's own gradient ever sees it.

use std::collections::HashMap;

use super::data::{add_assign, cuda, on_cuda};
use super::params::Params;
use crate::cpu::CpuStorage;
use crate::cuda::ops::elementwise as cuda_ew;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "gradient sink";

pub(crate) struct Sink<'a> {
    buffer: &'a mut Tensor,
    alpha: f32,
    /// Whether the current (or last) backward pass wrote into it.
    pub(crate) reached: bool,
}

/// The sinks of one backward pass, by weight name. Each buffer is f32 with the weight's shape,
/// on the weight's device.
#[derive(Default)]
pub struct GradSinks<'a> {
    sinks: HashMap<String, Sink<'a>>,
}

impl<'a> GradSinks<'a> {
    pub fn new() -> GradSinks<'a> {
        GradSinks::default()
    }

    /// Sends `alpha * dL/d(weight)` into `buffer`, which must be f32, of the weight's shape and on
    /// its device; anything else is an error naming the weight.
    pub fn insert(&mut self, params: &Params, weight: &str, buffer: &'a mut Tensor, alpha: f32) -> Result<()> {
        let w = params.get(weight)?;
        if buffer.dtype() != DType::F32 {
            return Err(Error::layer(OP, weight, format!("the buffer is {}; gradient sinks are f32", buffer.dtype())));
        }
        if buffer.dims() != w.dims() {
            return Err(Error::layer(
                OP,
                weight,
                format!("the buffer is {:?} but the weight is {:?}", buffer.dims(), w.dims()),
            ));
        }
        if buffer.device() != w.device() {
            return Err(Error::layer(
                OP,
                weight,
                format!("the buffer is on {} but the weight is on {}", buffer.device(), w.device()),
            ));
        }
        if self.sinks.contains_key(weight) {
            return Err(Error::layer(OP, weight, "given two sinks"));
        }
        self.sinks.insert(weight.to_string(), Sink { buffer, alpha, reached: false });
        Ok(())
    }

    /// Whether the last backward pass added anything into `weight`'s sink (false for a weight
    /// the forward pass never used).
    pub fn reached(&self, weight: &str) -> bool {
        self.sinks.get(weight).is_some_and(|s| s.reached)
    }

    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    pub(crate) fn contains(&self, weight: &str) -> bool {
        self.sinks.contains_key(weight)
    }

    pub(crate) fn get_mut(&mut self, weight: &str) -> Option<&mut Sink<'a>> {
        self.sinks.get_mut(weight)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.sinks.keys().map(String::as_str)
    }

    pub(crate) fn start_pass(&mut self) {
        self.sinks.values_mut().for_each(|s| s.reached = false);
    }
}

impl Sink<'_> {
    /// `G += alpha * dyᵀ x` for dy [M, N] and x [M, K], in place: the weight gradient of
    /// `y = x Wᵀ` without a dW tensor. On CUDA dy is taken in x's dtype, as the linear backward
    /// does.
    pub(crate) fn add_weight_grad(&mut self, dy: &Tensor, x: &Tensor, weight: &str) -> Result<()> {
        let g = Gemm { trans_a: true, trans_b: false, alpha: self.alpha, beta: 1.0, deterministic: true };
        let result = if on_cuda(OP, &[dy, x, &*self.buffer])? && dy.dtype() != x.dtype() {
            let dy = Tensor::from_storage(Storage::Cuda(cuda_ew::cast(cuda(dy, OP)?, x.dtype())?), dy.dims())?;
            gemm(&g, &dy, x, self.buffer)
        } else {
            gemm(&g, dy, x, self.buffer)
        };
        self.reached = true;
        result.map_err(|e| Error::layer(OP, weight, format!("G += dYᵀ X failed: {e}")))
    }

    /// `G += alpha * g` for a gradient `g` of the weight's shape that arrived by another route.
    pub(crate) fn add_grad(&mut self, g: &Tensor, weight: &str) -> Result<()> {
        self.reached = true;
        if self.alpha == 1.0 {
            return add_assign(self.buffer, g, weight);
        }
        let scaled = match g.storage() {
            Storage::Cuda(s) => Tensor::from_storage(Storage::Cuda(cuda_ew::scale(s, self.alpha)?), g.dims())?,
            Storage::Cpu(CpuStorage::F32(v)) => {
                Tensor::from_vec(v.iter().map(|x| x * self.alpha).collect(), g.dims().to_vec(), &g.device())?
            }
            Storage::Cpu(other) => {
                return Err(Error::layer(OP, weight, format!("a {} gradient on the CPU (f32 only)", other.dtype())));
            }
        };
        add_assign(self.buffer, &scaled, weight)
    }
}
