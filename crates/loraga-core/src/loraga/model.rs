//! Initialising every target layer of a Llama with one [`InitMethod`]: the adapters go into
//! [`Params`] under PEFT's names (trainable), a modified base weight replaces W0 (frozen, same
//! name and dtype), and the model's LoRA is switched on. Nothing is changed unless every layer
//! succeeds.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::InitMethod;
use super::baselines::{lora_layer, pissa_layer};
use super::estimate::GradientEstimate;
use super::layer::{LayerInit, lora_ga_layer};
use super::state::{InitLayer, InitState, copy_tensor};
use crate::autograd::Params;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, lora_a_name, lora_b_name};
use crate::model::{Llama, LlamaConfig};

/// The module paths LoRA adapts: layer by layer, targets in the config's order.
pub fn target_modules(config: &LlamaConfig, lora: &LoraConfig) -> Vec<String> {
    (0..config.num_hidden_layers).flat_map(|l| lora.targets.iter().map(move |t| t.module_path(l))).collect()
}

/// Their weights' names (`<module>.weight`): what the gradient estimate is keyed by.
pub fn target_weights(config: &LlamaConfig, lora: &LoraConfig) -> Vec<String> {
    target_modules(config, lora).into_iter().map(|m| format!("{m}.weight")).collect()
}

/// s = alpha/r or alpha/sqrt(r), in f64 (as PEFT computes it, in Python floats).
pub(crate) fn scaling(lora: &LoraConfig) -> f64 {
    let (a, r) = (lora.alpha as f64, lora.r as f64);
    if lora.use_rslora { a / r.sqrt() } else { a / r }
}

pub(crate) fn check_fresh(model: &Llama, params: &Params, lora: &LoraConfig, modules: &[String]) -> Result<()> {
    if model.lora.is_some() {
        return Err(Error::InvalidArgument("LoRA init: the model already has an adapter".into()));
    }
    if lora.r == 0 || lora.targets.is_empty() {
        return Err(Error::InvalidArgument(format!("LoRA init: r = {} and {} targets", lora.r, lora.targets.len())));
    }
    for m in modules {
        for name in [lora_a_name(m), lora_b_name(m)] {
            if params.contains(&name) {
                return Err(Error::layer("LoRA init", &name, "is already a parameter"));
            }
        }
    }
    Ok(())
}

/// Initialises `lora`'s adapters on `model` by `method`. LoRA-GA needs `grads` (keyed by weight
/// name, [`target_weights`]). Returns the initial state (A0, B0 and how they were made).
pub fn initialize(
    model: &mut Llama,
    params: &mut Params,
    lora: LoraConfig,
    method: &InitMethod,
    grads: Option<&GradientEstimate>,
) -> Result<InitState> {
    let modules = target_modules(&model.config, &lora);
    check_fresh(model, params, &lora, &modules)?;
    let s = scaling(&lora);
    let weight = |m: &str| params.get(&format!("{m}.weight"));
    let inits: Vec<LayerInit> = match method {
        InitMethod::Lora { seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            modules.iter().map(|m| lora_layer(m, weight(m)?, lora.r, &mut rng)).collect::<Result<_>>()?
        }
        InitMethod::LoraGa(cfg) => {
            let grads = grads.ok_or_else(|| {
                Error::InvalidArgument("LoRA-GA init needs the gradient estimate (estimate_gradients)".into())
            })?;
            modules
                .iter()
                .map(|m| lora_ga_layer(m, weight(m)?, grads.get(&format!("{m}.weight"))?, lora.r, s, cfg))
                .collect::<Result<_>>()?
        }
        InitMethod::Pissa(cfg) => {
            modules.iter().map(|m| pissa_layer(m, weight(m)?, lora.r, s, cfg)).collect::<Result<_>>()?
        }
    };
    let mut layers = Vec::with_capacity(modules.len());
    for (m, init) in modules.into_iter().zip(inits) {
        if let Some(w) = init.weight {
            params.set_value(&format!("{m}.weight"), w)?;
        }
        params.insert(lora_a_name(&m), copy_tensor(&init.a)?, true)?;
        params.insert(lora_b_name(&m), copy_tensor(&init.b)?, true)?;
        layers.push(InitLayer { module: m, a: init.a, b: init.b });
    }
    model.lora = Some(lora.clone());
    Ok(InitState { lora, method: method.clone(), layers })
}
