//! AdamW exactly as `torch.optim.AdamW` (torch's single-tensor path, `foreach=False`).
//!
//! For each trainable parameter p that has a gradient g, with its own step count t (incremented
//! first, so the first step has t = 1) and its moments m, v (f32, zero at the start):
//!
//! ```text
//! p     ← p · (1 − lr·wd)                       decoupled weight decay (wd = 0 for "no decay" names)
//! m     ← m + (1 − β1)(g − m)                   = β1 m + (1 − β1) g, as torch's lerp_
//! v     ← v·β2 + (1 − β2) g²
//! denom = sqrt(v) / sqrt(1 − β2^t) + eps
//! p     ← p − (lr / (1 − β1^t)) · m / denom
//! ```
//!
//! Precision follows torch: the hyper-parameters are f64 (Python floats), the per-step scalars
//! (1 − lr·wd, −lr/(1 − β1^t), sqrt(1 − β2^t), 1 − β1, β2, 1 − β2, eps) are computed in f64 and
//! rounded to f32 once, and each tensor operation above is one f32 operation in torch's order
//! (the lerp fused as torch's vectorised CPU kernel fuses it). The CPU loop and the CUDA kernel
//! (`kernels/adamw.cu`) perform the same rounded operations, so they agree bit for bit.
//!
//! Gradients may be f32 or bf16 (widened exactly); parameters must be f32 (the master copies).
//! A step is all-or-nothing: every gradient is checked (shape, device, NaN/Inf) before any
//! parameter or state changes, and a NaN/Inf is an error naming the parameter. On the GPU that
//! check is one sum-of-squares launch and one sync, then the update is one launch per device.
//!
//! Defaults: betas (0.9, 0.999) and eps 1e-8 as torch; weight decay 0.0 as transformers'
//! Trainer (torch's own default is 0.01).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use super::clip::{check_finite, sum_squares};
use super::{by_device, cuda};
use crate::autograd::Params;
use crate::cpu::CpuStorage;
use crate::device::Device;
use crate::dtype::{DType, WithDType};
use crate::error::{Error, Result};
use crate::io::{SafetensorsCheckpoint, save_safetensors};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "AdamW";
/// Elements per rayon task on the CPU.
const CPU_CHUNK: usize = 1 << 14;
/// Step counts are saved as f32 scalars, as torch keeps them; f32 holds integers exactly to 2^24.
const MAX_SAVED_STEP: u64 = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// `lr` with torch's betas and eps and transformers' weight decay 0.
    pub fn new(lr: f64) -> AdamWConfig {
        AdamWConfig { lr, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| Err(Error::InvalidArgument(format!("AdamW: invalid {what} {v}")));
        let (b1, b2) = self.betas;
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("learning rate", self.lr);
        }
        for (what, b) in [("beta1", b1), ("beta2", b2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(what, b);
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay);
        }
        Ok(())
    }
}

/// One parameter's optimizer state: its step count and its moments (f32, on its device).
pub struct ParamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl ParamState {
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn exp_avg(&self) -> &Tensor {
        &self.exp_avg
    }

    pub fn exp_avg_sq(&self) -> &Tensor {
        &self.exp_avg_sq
    }
}

/// The step's scalars shared by every tensor, rounded to f32 (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moments {
    pub w1: f32,
    pub beta2: f32,
    pub w2: f32,
    pub eps: f32,
}

/// One tensor's scalars for this step, rounded to f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorScalars {
    pub decay: f32,
    pub neg_step_size: f32,
    pub bc2_sqrt: f32,
}

impl Moments {
    /// One element, in torch's order of operations; kernels/adamw.cu does exactly the same.
    #[inline]
    fn update(&self, s: &TensorScalars, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        let decayed = *p * s.decay;
        // torch's lerp: the small-weight form below 0.5, the other form above, fused.
        *m = if self.w1.abs() < 0.5 { self.w1.mul_add(g - *m, *m) } else { (self.w1 - 1.0).mul_add(g - *m, g) };
        *v = *v * self.beta2 + self.w2 * g * g;
        let denom = v.sqrt() / s.bc2_sqrt + self.eps;
        *p = decayed + s.neg_step_size * *m / denom;
    }
}

type NoDecay = Box<dyn Fn(&str) -> bool + Send + Sync>;

pub struct AdamW {
    config: AdamWConfig,
    no_decay: Option<NoDecay>,
    state: BTreeMap<String, ParamState>,
}

/// A parameter being stepped: its value (mutable) and gradient.
struct Item<'a> {
    name: String,
    value: &'a mut Tensor,
    grad: &'a Tensor,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<AdamW> {
        config.validate()?;
        Ok(AdamW { config, no_decay: None, state: BTreeMap::new() })
    }

    /// Parameters whose name `no_decay` accepts get no weight decay (transformers excludes
    /// biases and norm weights this way).
    pub fn with_no_decay(mut self, no_decay: impl Fn(&str) -> bool + Send + Sync + 'static) -> AdamW {
        self.no_decay = Some(Box::new(no_decay));
        self
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The learning rate of the next step (a schedule sets it before each step).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        AdamWConfig { lr, ..self.config }.validate()?;
        self.config.lr = lr;
        Ok(())
    }

    pub fn state(&self, name: &str) -> Option<&ParamState> {
        self.state.get(name)
    }

    /// One step over every trainable parameter that has a gradient (see the module docs). The
    /// tapes that recorded the parameters must be dropped first: the values are updated in place.
    pub fn step(&mut self, params: &mut Params) -> Result<()> {
        let mut items = Vec::new();
        for p in params.iter_mut() {
            if !p.trainable() || p.grad().is_none() {
                continue;
            }
            let name = p.name().to_string();
            let (value, grad) = p.value_mut_and_grad()?;
            items.push(Item { name, value, grad: grad.expect("checked above") });
        }
        for it in &items {
            self.check(it)?;
        }
        let grads: Vec<(&str, &Tensor)> = items.iter().map(|it| (it.name.as_str(), it.grad)).collect();
        check_finite(OP, &grads, &sum_squares(&grads)?)?;
        // New state is allocated before anything changes, so an allocation failure changes nothing.
        let mut fresh = BTreeMap::new();
        for it in items.iter().filter(|it| !self.state.contains_key(&it.name)) {
            let zeros = || Tensor::zeros(it.value.dims().to_vec(), DType::F32, &it.value.device());
            fresh.insert(it.name.clone(), ParamState { step: 0, exp_avg: zeros()?, exp_avg_sq: zeros()? });
        }
        self.state.append(&mut fresh);

        let moments = self.moments();
        let mut work = Vec::with_capacity(items.len());
        for it in items {
            let mut st = self.state.remove(&it.name).expect("created above");
            st.step += 1;
            let scalars = self.tensor_scalars(&it.name, st.step);
            work.push((it, st, scalars));
        }
        let result = update(&mut work, &moments);
        for (it, st, _) in work {
            self.state.insert(it.name, st);
        }
        result
    }

    fn check(&self, it: &Item<'_>) -> Result<()> {
        let (name, value) = (it.name.as_str(), &*it.value);
        if value.dtype() != DType::F32 {
            let msg = format!("AdamW updates f32 master weights; this parameter is {}", value.dtype());
            return Err(Error::layer(OP, name, msg));
        }
        if it.grad.dims() != value.dims() {
            let msg = format!("gradient of shape {:?} for a parameter of shape {:?}", it.grad.dims(), value.dims());
            return Err(Error::layer(OP, name, msg));
        }
        let device = value.device();
        if it.grad.device() != device {
            let msg = format!("gradient on {}, parameter on {device}", it.grad.device());
            return Err(Error::layer(OP, name, msg));
        }
        if let Some(st) = self.state.get(name) {
            for t in [&st.exp_avg, &st.exp_avg_sq] {
                if t.dims() != value.dims() || t.device() != device {
                    let msg = format!(
                        "optimizer state {:?} on {} does not match the parameter {:?} on {device}",
                        t.dims(),
                        t.device(),
                        value.dims()
                    );
                    return Err(Error::layer(OP, name, msg));
                }
            }
        }
        Ok(())
    }

    fn moments(&self) -> Moments {
        let (b1, b2) = self.config.betas;
        Moments { w1: (1.0 - b1) as f32, beta2: b2 as f32, w2: (1.0 - b2) as f32, eps: self.config.eps as f32 }
    }

    fn tensor_scalars(&self, name: &str, step: u64) -> TensorScalars {
        let c = &self.config;
        let wd = if self.no_decay.as_ref().is_some_and(|f| f(name)) { 0.0 } else { c.weight_decay };
        let t = step as f64;
        let bias_correction1 = 1.0 - c.betas.0.powf(t);
        let bias_correction2 = 1.0 - c.betas.1.powf(t);
        TensorScalars {
            decay: (1.0 - c.lr * wd) as f32,
            neg_step_size: (-(c.lr / bias_correction1)) as f32,
            bc2_sqrt: bias_correction2.powf(0.5) as f32,
        }
    }
}

/// The update proper: CPU tensors one by one, each CUDA device's tensors in one launch.
fn update(work: &mut [(Item<'_>, ParamState, TensorScalars)], k: &Moments) -> Result<()> {
    let (cpu, gpus) = by_device(work.iter_mut().collect(), |(it, _, _)| it.value.storage());
    for (it, st, s) in cpu {
        let (Storage::Cpu(CpuStorage::F32(p)), Storage::Cpu(CpuStorage::F32(m)), Storage::Cpu(CpuStorage::F32(v))) =
            (it.value.storage_mut(), st.exp_avg.storage_mut(), st.exp_avg_sq.storage_mut())
        else {
            return Err(Error::layer(OP, &it.name, "parameter and moments must be f32 CPU tensors"));
        };
        match it.grad.storage() {
            Storage::Cpu(CpuStorage::F32(g)) => update_cpu(p, m, v, g, k, s),
            Storage::Cpu(CpuStorage::BF16(g)) => update_cpu(p, m, v, g, k, s),
            Storage::Cuda(_) => return Err(Error::layer(OP, &it.name, "gradient on the GPU, parameter on the CPU")),
        }
    }
    for (dev, group) in gpus {
        let mut ops = Vec::with_capacity(group.len());
        for (it, st, s) in group {
            let (Storage::Cuda(param), Storage::Cuda(grad), Storage::Cuda(exp_avg), Storage::Cuda(exp_avg_sq)) =
                (it.value.storage_mut(), it.grad.storage(), st.exp_avg.storage_mut(), st.exp_avg_sq.storage_mut())
            else {
                return Err(Error::layer(OP, &it.name, "parameter, gradient and moments must all be on the GPU"));
            };
            ops.push(cuda::AdamwOperands { param, grad, exp_avg, exp_avg_sq, scalars: *s });
        }
        cuda::adamw_step(&dev, &mut ops, k)?;
    }
    Ok(())
}

fn update_cpu<G: WithDType>(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[G], k: &Moments, s: &TensorScalars) {
    p.par_chunks_mut(CPU_CHUNK)
        .zip(m.par_chunks_mut(CPU_CHUNK))
        .zip(v.par_chunks_mut(CPU_CHUNK))
        .zip(g.par_chunks(CPU_CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                k.update(s, &mut p[i], &mut m[i], &mut v[i], g[i].to_f32());
            }
        });
}

// Checkpoint resume: the state as named tensors, torch's names for them.
impl AdamW {
    /// The state as host tensors: `<param>.exp_avg`, `<param>.exp_avg_sq` (f32, the parameter's
    /// shape) and `<param>.step` (an f32 scalar, as torch keeps it), by parameter name.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.state.len());
        for (name, st) in &self.state {
            if st.step > MAX_SAVED_STEP {
                let msg = format!("step count {} does not fit the f32 the state is saved as", st.step);
                return Err(Error::layer("AdamW::state_tensors", name, msg));
            }
            out.push((format!("{name}.exp_avg"), st.exp_avg.to_device(&Device::Cpu)?));
            out.push((format!("{name}.exp_avg_sq"), st.exp_avg_sq.to_device(&Device::Cpu)?));
            out.push((
                format!("{name}.step"),
                Tensor::from_vec(vec![st.step as f32], Vec::<usize>::new(), &Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    /// Writes [`Self::state_tensors`] to one safetensors file, atomically (temp file + rename).
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors = self.state_tensors()?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        save_safetensors(path, &refs, None)
    }

    /// Replaces the whole state with the one in `path` (written by [`Self::save_state`]), each
    /// moment placed on its parameter's device. Every tensor must belong to a parameter of
    /// `params` with the right shape, and every parameter in the file needs all three entries;
    /// any mismatch, and a truncated or corrupt file, is an error naming the file, and the
    /// current state is then kept.
    pub fn load_state(&mut self, path: impl AsRef<Path>, params: &Params) -> Result<()> {
        let path = path.as_ref();
        let file = SafetensorsCheckpoint::open(path)?;
        let bad = |msg: String| Error::format(path, msg);
        let mut by_param: BTreeMap<&str, [Option<&str>; 3]> = BTreeMap::new();
        for name in file.names() {
            let (param, slot) = [".exp_avg", ".exp_avg_sq", ".step"]
                .iter()
                .enumerate()
                .find_map(|(slot, suffix)| Some((name.strip_suffix(suffix)?, slot)))
                .ok_or_else(|| bad(format!("tensor '{name}' is not AdamW state (<param>.exp_avg|exp_avg_sq|step)")))?;
            by_param.entry(param).or_default()[slot] = Some(name);
        }
        let mut state = BTreeMap::new();
        for (param, [m, v, step]) in by_param {
            let missing = |what: &str| bad(format!("parameter '{param}' has no '{param}.{what}'"));
            let (m, v, step) = (
                m.ok_or_else(|| missing("exp_avg"))?,
                v.ok_or_else(|| missing("exp_avg_sq"))?,
                step.ok_or_else(|| missing("step"))?,
            );
            let value = params.get(param).map_err(|_| bad(format!("state for '{param}', which is not a parameter")))?;
            for name in [m, v] {
                let (dims, _) = file.shape_and_dtype(name)?;
                if dims != value.dims() {
                    return Err(bad(format!("'{name}' has shape {dims:?}, the parameter {:?}", value.dims())));
                }
            }
            let step_value = file.tensor(step, DType::F32, &Device::Cpu)?.to_vec::<f32>()?;
            let step = match step_value[..] {
                [s] if s >= 1.0 && s.fract() == 0.0 && s <= MAX_SAVED_STEP as f32 => s as u64,
                _ => return Err(bad(format!("'{step}' is {step_value:?}, not a step count >= 1"))),
            };
            let device = value.device();
            let exp_avg = file.tensor(m, DType::F32, &device)?;
            let exp_avg_sq = file.tensor(v, DType::F32, &device)?;
            state.insert(param.to_string(), ParamState { step, exp_avg, exp_avg_sq });
        }
        self.state = state;
        Ok(())
    }
}
