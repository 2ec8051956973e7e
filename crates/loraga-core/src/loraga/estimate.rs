//! LoRA-GA's gradient estimate: G = (1/N) Σ_b ∂L_b/∂W for every target weight W, with L_b the
//! model's own loss on micro-batch b (the mean over that batch's label tokens), as the reference
//! computes it (sum over batches, then divide by the batch count; spec §2.1, §2.3).
//!
//! Only the target weights are trainable during a step, and no target's gradient is ever kept
//! in the parameters; the accumulators (4 bytes per target weight element) are the whole cost,
//! reported by [`MemoryPlan`] before anything is allocated.
//!
//! Where the accumulators live ([`AccumulatorPlacement`]) decides how a gradient gets there:
//! - `Device` (beside the weights, on the CPU or the weights' CUDA device): each accumulator is
//!   the target's gradient sink ([`GradSinks`]), so the linear op's backward adds dYᵀX straight
//!   into it with the accumulation GEMM (beta = 1; on the GPU the engine's in-place fp32 epilogue
//!   for bf16 activations) and no [m, n] dW tensor is created, per layer or at all.
//! - `Host` (host memory, for models whose accumulators do not fit beside them): the tape's
//!   gradient hook takes each target's dW the moment it is final, copies it down and adds it in
//!   f32, then drops it, so at most one layer's temporary gradient lives on the device at a time.
//!   (A device-side sink per layer would need the same [m, n] temporary, so this path keeps dW.)
//!
//! Batches are processed in the order given and every sum runs in a fixed order, so the estimate
//! is bit-for-bit deterministic for a given data order (the sinks ask the GEMM for
//! `deterministic`: no split K on the Hopper engine).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::path::Path;

use crate::autograd::{GradSinks, HookAction, Params, Tape};
use crate::cpu::CpuStorage;
use crate::cuda::ops::elementwise as cuda_ew;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::{SafetensorsCheckpoint, save_safetensors};
use crate::model::{Batch, Llama};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// The reference's estimation data (spec §2.1): the first 128 training examples, unshuffled, in
/// 64 micro-batches of 2, truncated to 1024 tokens. The caller builds the batches.
pub const REFERENCE_BATCHES: usize = 64;
pub const REFERENCE_BATCH_SIZE: usize = 2;
pub const REFERENCE_MAX_LENGTH: usize = 1024;

const OP: &str = "LoRA-GA gradient estimation";
const BATCHES_KEY: &str = "loraga.batches";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccumulatorPlacement {
    /// On the weights' device (GPU memory for a model on the GPU).
    #[default]
    Device,
    /// In host memory, for models whose accumulators do not fit beside them on the device.
    Host,
}

#[derive(Debug, Clone, Default)]
pub struct EstimateOptions {
    pub placement: AccumulatorPlacement,
    /// Refuse to start when the accumulators need more bytes than this.
    pub memory_budget: Option<u64>,
}

/// What the accumulators will cost, known before anything is allocated.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub bytes: u64,
    pub layers: usize,
    /// The largest target weight and its shape.
    pub largest: (String, [usize; 2]),
    pub placement: AccumulatorPlacement,
    /// Where they go: the host, or the weights' device.
    pub device: Device,
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, [m, n]) = &self.largest;
        write!(
            f,
            "{} f32 gradient accumulators for {} target weights on {} (largest: {name} [{m}, {n}])",
            human_bytes(self.bytes),
            self.layers,
            self.device
        )
    }
}

pub(crate) fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    let size = if b as f64 >= GIB {
        format!("{:.2} GiB", b as f64 / GIB)
    } else {
        format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
    };
    format!("{size} ({b} bytes)")
}

/// Runs micro-batches and accumulates the target weights' gradients.
pub struct GradientEstimator {
    names: Vec<String>,
    index: HashMap<String, usize>,
    acc: Vec<Tensor>,
    /// Backward passes that reached each target (PEFT divides by its per-module count).
    counts: Vec<usize>,
    batches: usize,
    plan: MemoryPlan,
    /// A step failed part-way: some accumulators hold part of a batch, so the sums are wrong.
    failed: bool,
}

impl GradientEstimator {
    /// The memory the accumulators for `targets` (weight names, e.g. from
    /// [`super::target_weights`]) will need.
    pub fn plan(params: &Params, targets: &[String], placement: AccumulatorPlacement) -> Result<MemoryPlan> {
        if targets.is_empty() {
            return Err(Error::InvalidArgument(format!("{OP}: no target weights")));
        }
        let mut bytes = 0u64;
        let mut largest = (String::new(), [0, 0]);
        let mut device = Device::Cpu;
        let mut seen = HashMap::new();
        for name in targets {
            if seen.insert(name.as_str(), ()).is_some() {
                return Err(Error::layer(OP, name, "listed twice among the targets"));
            }
            let w = params.get(name)?;
            let (m, n) = w.shape().dims2(OP, name)?;
            bytes += 4 * (m * n) as u64;
            if m * n > largest.1[0] * largest.1[1] {
                largest = (name.clone(), [m, n]);
            }
            if placement == AccumulatorPlacement::Device {
                device = w.device();
            }
        }
        Ok(MemoryPlan { bytes, layers: targets.len(), largest, placement, device })
    }

    /// Checks the plan against the budget, then allocates zeroed accumulators.
    pub fn new(params: &Params, targets: Vec<String>, opts: &EstimateOptions) -> Result<GradientEstimator> {
        let plan = Self::plan(params, &targets, opts.placement)?;
        if let Some(budget) = opts.memory_budget
            && plan.bytes > budget
        {
            return Err(Error::InvalidArgument(format!(
                "{OP} needs {plan}, over the budget of {}. Keep the accumulators in host memory \
                 (AccumulatorPlacement::Host), target fewer modules, or estimate groups of layers in \
                 separate passes over the same batches",
                human_bytes(budget)
            )));
        }
        let acc = targets
            .iter()
            .map(|name| {
                let device =
                    if opts.placement == AccumulatorPlacement::Host { Device::Cpu } else { params.get(name)?.device() };
                Tensor::zeros(params.get(name)?.dims(), DType::F32, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        let index = targets.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        let counts = vec![0; targets.len()];
        Ok(GradientEstimator { names: targets, index, acc, counts, batches: 0, plan, failed: false })
    }

    pub fn memory(&self) -> &MemoryPlan {
        &self.plan
    }

    pub fn batches(&self) -> usize {
        self.batches
    }

    /// One micro-batch: forward, loss, backward with only the targets trainable. Returns the loss.
    /// The parameters' trainable flags are restored afterwards, also on error; after an error in
    /// the backward pass the estimator refuses to go on (its sums hold part of a batch).
    pub fn step(&mut self, model: &Llama, params: &mut Params, batch: &Batch) -> Result<f32> {
        self.check_intact()?;
        if model.lora.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{OP}: the model already has LoRA adapters; estimate the gradient on the base model"
            )));
        }
        if batch.labels.is_none() {
            return Err(Error::InvalidArgument(format!("{OP}: batch {} has no labels", self.batches)));
        }
        let flags: Vec<(String, bool)> = params.iter().map(|p| (p.name().to_string(), p.trainable())).collect();
        for (name, _) in &flags {
            params.set_trainable(name, self.index.contains_key(name))?;
        }
        let result = self.run(model, params, batch);
        for (name, trainable) in &flags {
            params.set_trainable(name, *trainable)?;
        }
        let loss = result?;
        self.batches += 1;
        Ok(loss)
    }

    fn run(&mut self, model: &Llama, params: &mut Params, batch: &Batch) -> Result<f32> {
        let sink = self.plan.placement == AccumulatorPlacement::Device;
        let mut tape = Tape::new();
        if sink {
            for name in &self.names {
                tape.sink(name)?;
            }
        }
        let out = model.forward(&mut tape, params, batch)?;
        let loss = out.loss.ok_or_else(|| Error::InvalidArgument(format!("{OP}: the model computed no loss")))?;
        let value = tape.value(loss).to_f32_vec()?[0];
        if sink {
            let mut sinks = GradSinks::new();
            for (name, acc) in self.names.iter().zip(self.acc.iter_mut()) {
                sinks.insert(params, name, acc, 1.0)?;
            }
            // The forward pass touches no accumulator; a failed backward may have added to some.
            self.failed = true;
            tape.backward_into(loss, params, None, &mut sinks)?;
            for (name, count) in self.names.iter().zip(self.counts.iter_mut()) {
                *count += usize::from(sinks.reached(name));
            }
        } else {
            self.failed = true;
            let (index, acc, counts) = (&self.index, &mut self.acc, &mut self.counts);
            let mut hook = |name: &str, g: &Tensor| {
                let Some(&i) = index.get(name) else { return Ok(HookAction::Keep) };
                accumulate_on_host(&mut acc[i], g, name)?;
                counts[i] += 1;
                Ok(HookAction::Drop)
            };
            tape.backward(loss, params, Some(&mut hook))?;
        }
        self.failed = false;
        Ok(value)
    }

    fn check_intact(&self) -> Result<()> {
        if self.failed {
            return Err(Error::InvalidArgument(format!(
                "{OP}: an earlier step failed part-way, so the sums are incomplete; start a new estimator"
            )));
        }
        Ok(())
    }

    /// Divides each accumulator by the number of passes that reached it.
    pub fn finish(self) -> Result<GradientEstimate> {
        self.check_intact()?;
        let mut grads = Vec::with_capacity(self.names.len());
        for ((name, mut acc), count) in self.names.into_iter().zip(self.acc).zip(self.counts) {
            if count == 0 {
                return Err(Error::layer(
                    OP,
                    &name,
                    format!("received no gradient in {} batches (is it used by the forward pass?)", self.batches),
                ));
            }
            let acc = match acc.storage_mut() {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    v.iter_mut().for_each(|x| *x /= count as f32);
                    acc
                }
                // Times 1/count: within an ulp of the host's division.
                Storage::Cuda(s) => {
                    Tensor::from_storage(Storage::Cuda(cuda_ew::scale(s, 1.0 / count as f32)?), acc.dims())?
                }
                Storage::Cpu(other) => {
                    return Err(Error::layer(OP, &name, format!("the accumulator is {}, not f32", other.dtype())));
                }
            };
            grads.push((name, acc));
        }
        GradientEstimate::new(grads, self.batches)
    }
}

/// `acc += g` in f32 on the host: any gradient is taken (copied down, bf16 widened).
fn accumulate_on_host(acc: &mut Tensor, g: &Tensor, name: &str) -> Result<()> {
    if acc.dims() != g.dims() {
        return Err(Error::layer(OP, name, format!("gradient {:?} for an accumulator {:?}", g.dims(), acc.dims())));
    }
    let Storage::Cpu(CpuStorage::F32(dst)) = acc.storage_mut() else {
        return Err(Error::layer(OP, name, "the host accumulator is not a host f32 buffer"));
    };
    match g.storage() {
        Storage::Cpu(CpuStorage::F32(src)) => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
        _ => dst.iter_mut().zip(g.to_f32_vec()?).for_each(|(d, s)| *d += s),
    }
    Ok(())
}

/// Runs every batch through [`GradientEstimator`] and returns the averaged gradients.
pub fn estimate_gradients<B: Borrow<Batch>>(
    model: &Llama,
    params: &mut Params,
    targets: Vec<String>,
    batches: impl IntoIterator<Item = B>,
    opts: &EstimateOptions,
) -> Result<GradientEstimate> {
    let mut est = GradientEstimator::new(params, targets, opts)?;
    for b in batches {
        est.step(model, params, b.borrow())?;
    }
    if est.batches == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: no batches")));
    }
    est.finish()
}

/// The averaged gradient of each target weight (f32, keyed by the weight's name).
pub struct GradientEstimate {
    grads: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
    batches: usize,
}

impl GradientEstimate {
    /// From gradients computed elsewhere (e.g. another process), each a matrix.
    pub fn new(grads: Vec<(String, Tensor)>, batches: usize) -> Result<GradientEstimate> {
        let mut index = HashMap::new();
        for (i, (name, g)) in grads.iter().enumerate() {
            g.shape().dims2(OP, name)?;
            if index.insert(name.clone(), i).is_some() {
                return Err(Error::layer(OP, name, "two gradients with this name"));
            }
        }
        Ok(GradientEstimate { grads, index, batches })
    }

    pub fn batches(&self) -> usize {
        self.batches
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    pub fn get(&self, weight: &str) -> Result<&Tensor> {
        self.index
            .get(weight)
            .map(|&i| &self.grads[i].1)
            .ok_or_else(|| Error::layer(OP, weight, format!("no gradient was estimated for it ({} were)", self.len())))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.grads.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The gradient cache: one safetensors file (atomic), the batch count in its metadata.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(&str, &Tensor)> = self.iter().collect();
        let meta = HashMap::from([(BATCHES_KEY.to_string(), self.batches.to_string())]);
        save_safetensors(path, &tensors, Some(meta))
    }

    pub fn load(path: impl AsRef<Path>) -> Result<GradientEstimate> {
        let path = path.as_ref();
        let file = SafetensorsCheckpoint::open(path)?;
        let batches = file.metadata(BATCHES_KEY).and_then(|b| b.parse().ok()).ok_or_else(|| {
            Error::format(path, format!("no '{BATCHES_KEY}' in the metadata: not a LoRA-GA gradient cache"))
        })?;
        let grads = file
            .names()
            .map(|n| Ok((n.to_string(), file.tensor(n, DType::F32, &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        GradientEstimate::new(grads, batches)
    }
}
