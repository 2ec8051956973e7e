//! LoRA layers on Llama's linear layers, named as PEFT names them:
//!
//!   y = x W^T + s (x A^T) B^T,   A [r, in] (`lora_A.weight`), B [out, r] (`lora_B.weight`),
//!   s = alpha / r, or alpha / sqrt(r) with rsLoRA.
//!
//! Parameter names are those of PEFT's saved adapters (`adapter_model.safetensors`):
//! `base_model.model.` + the module's path in the Hugging Face model + `.lora_A.weight`. (In a
//! live PEFT model the adapter name sits before `.weight`, e.g. `lora_A.default.weight`; PEFT
//! strips it when saving.) The base weights keep their Hugging Face names.

use rand::Rng;
use rand_distr::{Distribution, Uniform};

use crate::autograd::{Params, Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::lora_linear::LoraPath;
use crate::tensor::Tensor;

/// The seven linear layers of a Llama decoder layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// PEFT's `target_modules` name.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Result<LoraTarget> {
        LoraTarget::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown LoRA target module '{name}' (Llama has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"))
        })
    }

    /// The module's path in the Hugging Face model, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        let block = match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub use_rslora: bool,
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// s = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f32 {
        if self.use_rslora { self.alpha / (self.r as f32).sqrt() } else { self.alpha / self.r as f32 }
    }

    pub fn targets_module(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }
}

/// PEFT's name for a module's A matrix: `base_model.model.<module_path>.lora_A.weight`.
pub fn lora_a_name(module_path: &str) -> String {
    format!("base_model.model.{module_path}.lora_A.weight")
}

/// PEFT's name for a module's B matrix.
pub fn lora_b_name(module_path: &str) -> String {
    format!("base_model.model.{module_path}.lora_B.weight")
}

/// Adds trainable A and B for every targeted module of `n_layers` layers, initialised as PEFT's
/// default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (`kaiming_uniform_(a=sqrt(5))`), B = 0, so the adapted
/// model starts equal to the base model. The base weights must already be in `params`; their
/// shapes give in and out.
pub fn add_lora(params: &mut Params, n_layers: usize, cfg: &LoraConfig, rng: &mut impl Rng) -> Result<()> {
    if cfg.r == 0 {
        return Err(Error::InvalidArgument("LoRA rank r must be positive".into()));
    }
    for layer in 0..n_layers {
        for &t in &cfg.targets {
            let path = t.module_path(layer);
            let (out, inp) = params.get(&format!("{path}.weight"))?.shape().dims2("add_lora", &path)?;
            let a = kaiming_uniform_a(cfg.r, inp, rng)?;
            params.insert(lora_a_name(&path), Tensor::from_vec(a, [cfg.r, inp], &Device::Cpu)?, true)?;
            params.insert(lora_b_name(&path), Tensor::zeros([out, cfg.r], crate::DType::F32, &Device::Cpu)?, true)?;
        }
    }
    Ok(())
}

/// PEFT's default A [r, in]: `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in)).
pub fn kaiming_uniform_a(r: usize, inp: usize, rng: &mut impl Rng) -> Result<Vec<f32>> {
    let bound = 1.0 / (inp as f32).sqrt();
    let dist = Uniform::new_inclusive(-bound, bound).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok((0..r * inp).map(|_| dist.sample(rng)).collect())
}

/// The linear layer at `module_path` applied to x: `x W^T`, or, when `lora` targets it (its A
/// and B must then be in `params`), the LoRA layer as one tape op ([`Tape::lora_linear`]) by
/// `path` (on CUDA `Fused` falls back to `Cublas` where the fused kernels do not apply).
pub fn linear(
    tape: &mut Tape,
    params: &Params,
    x: Var,
    module_path: &str,
    lora: Option<(&LoraConfig, LoraTarget)>,
    path: LoraPath,
) -> Result<Var> {
    // Weights follow the activations' dtype (cast on the tape when stored otherwise).
    let dtype = tape.value(x).dtype();
    let w = tape.param_as(params, &format!("{module_path}.weight"), dtype)?;
    let Some((cfg, _)) = lora.filter(|(cfg, t)| cfg.targets_module(*t)) else { return tape.linear(x, w) };
    let a = tape.param_as(params, &lora_a_name(module_path), dtype)?;
    let b = tape.param_as(params, &lora_b_name(module_path), dtype)?;
    tape.lora_linear(x, w, a, b, cfg.scaling(), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_scaling_follow_peft() {
        assert_eq!(
            lora_a_name(&LoraTarget::Q.module_path(0)),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            lora_b_name(&LoraTarget::Down.module_path(11)),
            "base_model.model.model.layers.11.mlp.down_proj.lora_B.weight"
        );
        let mut c = LoraConfig { r: 16, alpha: 32.0, use_rslora: false, targets: vec![LoraTarget::Q] };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
        assert_eq!(LoraTarget::from_name("up_proj").unwrap(), LoraTarget::Up);
        assert!(LoraTarget::from_name("lm_head").is_err());
    }

    #[test]
    fn lora_linear_matches_the_formula_and_its_gradients_check() {
        let cfg = LoraConfig { r: 2, alpha: 3.0, use_rslora: false, targets: vec![LoraTarget::V] };
        let mut p = Params::new();
        let w = vec![0.5, -1.0, 0.25, 2.0, 1.0, 0.0, 0.3, 0.3, -0.2, 1.5, -0.5, 0.7];
        p.insert("model.layers.0.self_attn.v_proj.weight", Tensor::from_vec(w, [4, 3], &Device::Cpu).unwrap(), false)
            .unwrap();
        add_lora(&mut p, 1, &cfg, &mut rand::rng()).unwrap();
        let path = LoraTarget::V.module_path(0);
        assert_eq!(p.get(&lora_a_name(&path)).unwrap().dims(), &[2, 3]);
        assert!(p.get(&lora_b_name(&path)).unwrap().to_vec::<f32>().unwrap().iter().all(|&b| b == 0.0));
        // Non-zero B so the LoRA term shows.
        let b = Tensor::from_vec(vec![1.0f32, 2.0, -1.0, 0.5, 0.0, 1.0, 2.0, -2.0], [4, 2], &Device::Cpu).unwrap();
        p.set_value(&lora_b_name(&path), b).unwrap();
        let x = vec![1.0f32, -2.0, 0.5, 0.0, 1.0, 3.0];
        let mut tape = Tape::new();
        let xv = tape.constant(Tensor::from_vec(x.clone(), [2, 3], &Device::Cpu).unwrap());
        let y = linear(&mut tape, &p, xv, &path, Some((&cfg, LoraTarget::V)), LoraPath::Fused).unwrap();
        let got = tape.value(y).to_vec::<f32>().unwrap();
        let (wv, av, bv) = (
            p.get(&format!("{path}.weight")).unwrap().to_vec::<f32>().unwrap(),
            p.get(&lora_a_name(&path)).unwrap().to_vec::<f32>().unwrap(),
            p.get(&lora_b_name(&path)).unwrap().to_vec::<f32>().unwrap(),
        );
        for i in 0..2 {
            for o in 0..4 {
                let base: f32 = (0..3).map(|k| x[i * 3 + k] * wv[o * 3 + k]).sum();
                let xa: Vec<f32> = (0..2).map(|j| (0..3).map(|k| x[i * 3 + k] * av[j * 3 + k]).sum()).collect();
                let lora: f32 = (0..2).map(|j| xa[j] * bv[o * 2 + j]).sum();
                assert!((got[i * 4 + o] - (base + 1.5 * lora)).abs() < 1e-5);
            }
        }
        // An untargeted module is the plain linear layer.
        let before = tape.len();
        linear(&mut tape, &p, xv, &path, Some((&cfg, LoraTarget::Q)), LoraPath::Fused).unwrap();
        assert_eq!(tape.len(), before + 1, "no LoRA ops for an untargeted module: only its linear");
        // The op's gradients are checked in autograd::lora_linear.
    }
}
