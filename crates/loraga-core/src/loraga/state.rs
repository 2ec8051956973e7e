//! What an initialisation leaves behind, and the adapters it exports (spec §5).
//!
//! A LoRA-GA or PiSSA model is W_frz + s·B·A with W_frz = round(W0 − s·B0·A0): its plain adapter
//! (A_f, B_f) is only valid on W_frz. Three ways out:
//!
//! - [`InitState::save`] / [`InitState::load`] / [`InitState::restore`]: keep (A0, B0, method);
//!   W_frz is rebuilt bit for bit from W0 by the same f64-then-round-once recipe.
//! - [`InitState::converted_adapter`]: a plain rank-2r LoRA for the ORIGINAL W0, PEFT's
//!   `subtract_mutated_init`: A' = [A_f; A0], B' = [B_f, −B0], so s'·B'A' = s·(B_f A_f − B0 A0)
//!   when s' = s: r' = 2r and alpha' = 2·alpha (s = alpha/r), or sqrt(2)·alpha with rsLoRA
//!   (s = alpha/sqrt(r); PEFT ≥ 0.19 — the reference fork doubles alpha there, which is wrong by
//!   sqrt(2) and not reproduced). Exact up to W_frz's rounding.
//! - [`InitState::trained_adapter`]: A_f, B_f as they are, for W_frz.
//!
//! Vanilla LoRA does not touch W0; its converted adapter is the plain one.

use std::path::Path;

use serde_json::{Value, json};

use super::model::{check_fresh, scaling};
use super::offset::offset_weight;
use super::{Direction, InitMethod, LoraGaConfig, PissaConfig, PissaSvd, Scale, SvdMethod, Variant};
use crate::autograd::Params;
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::adapter::{ADAPTER_WEIGHTS, AdapterConfig, read_adapter, save_adapter};
use crate::lora::{LoraConfig, lora_a_name, lora_b_name};
use crate::model::Llama;
use crate::tensor::Tensor;

const STATE_FILE: &str = "loraga_init.json";
const FORMAT: &str = "loraga-init";

/// One adapted module's initial factors.
#[derive(Debug)]
pub struct InitLayer {
    /// e.g. `model.layers.0.self_attn.q_proj`
    pub module: String,
    /// A0 [r, in]
    pub a: Tensor,
    /// B0 [out, r]
    pub b: Tensor,
}

#[derive(Debug)]
pub struct InitState {
    pub lora: LoraConfig,
    pub method: InitMethod,
    pub layers: Vec<InitLayer>,
}

pub(crate) fn copy_tensor(t: &Tensor) -> Result<Tensor> {
    Tensor::from_cpu(t.storage().to_cpu()?, t.shape().clone(), &t.device())
}

impl InitState {
    /// The LoRA scaling s (f64).
    pub fn scaling(&self) -> f64 {
        scaling(&self.lora)
    }

    /// Saves A0, B0 as a PEFT adapter directory plus `loraga_init.json` (the method), atomically.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let names = self.names();
        let mut tensors = Vec::new();
        for (l, (a, b)) in self.layers.iter().zip(&names) {
            tensors.push((a.as_str(), &l.a));
            tensors.push((b.as_str(), &l.b));
        }
        let state = json!({
            "format": FORMAT,
            "version": 1,
            "method": method_to_json(&self.method),
            "modules": self.layers.iter().map(|l| l.module.as_str()).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&state).expect("a JSON value always serializes");
        save_adapter(dir, &AdapterConfig::from_lora(&self.lora, None), &tensors, &[(STATE_FILE, &text)])
    }

    pub fn load(dir: impl AsRef<Path>) -> Result<InitState> {
        let dir = dir.as_ref();
        let path = dir.join(STATE_FILE);
        if !path.is_file() {
            return Err(Error::format(dir, format!("no {STATE_FILE}: not a saved initial state (a plain adapter?)")));
        }
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
        if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(Error::format(&path, format!("'format' is not \"{FORMAT}\"")));
        }
        let method = v.get("method").ok_or_else(|| Error::format(&path, "no 'method'"))?;
        let method = method_from_json(method).map_err(|e| Error::format(&path, e.to_string()))?;
        let modules =
            v.get("modules").and_then(Value::as_array).ok_or_else(|| Error::format(&path, "no 'modules' list"))?;
        let adapter = read_adapter(dir)?;
        let file = &adapter.tensors;
        let mut layers = Vec::with_capacity(modules.len());
        for m in modules {
            let module = m.as_str().ok_or_else(|| Error::format(&path, format!("module {m} is not a string")))?;
            let read = |name: &str| -> Result<Tensor> {
                let (_, dtype) = file.shape_and_dtype(name)?;
                let dtype = if dtype == safetensors::Dtype::BF16 { DType::BF16 } else { DType::F32 };
                file.tensor(name, dtype, &crate::Device::Cpu)
            };
            layers.push(InitLayer {
                module: module.to_string(),
                a: read(&lora_a_name(module))?,
                b: read(&lora_b_name(module))?,
            });
        }
        if file.names().count() != 2 * layers.len() {
            return Err(Error::format(
                dir.join(ADAPTER_WEIGHTS),
                format!("{} tensors for {} modules", file.names().count(), layers.len()),
            ));
        }
        Ok(InitState { lora: adapter.config.lora_config()?, method, layers })
    }

    /// Puts this state onto a model holding the ORIGINAL weights W0: A0, B0 as trainable
    /// parameters and, for methods that modify the base, W_frz recomputed exactly as at init.
    pub fn restore(&self, model: &mut Llama, params: &mut Params) -> Result<()> {
        let modules: Vec<String> = self.layers.iter().map(|l| l.module.clone()).collect();
        check_fresh(model, params, &self.lora, &modules)?;
        let s = self.scaling();
        let mut weights = Vec::new();
        for l in &self.layers {
            let w = params.get(&format!("{}.weight", l.module))?;
            // Also checks that A0 and B0 fit this model's weight.
            let frz = offset_weight(&l.module, w, &l.a, &l.b, s)?;
            weights.push(self.method.modifies_base().then_some(frz));
        }
        for (l, w) in self.layers.iter().zip(weights) {
            if let Some(w) = w {
                params.set_value(&format!("{}.weight", l.module), w)?;
            }
            params.insert(lora_a_name(&l.module), copy_tensor(&l.a)?, true)?;
            params.insert(lora_b_name(&l.module), copy_tensor(&l.b)?, true)?;
        }
        model.lora = Some(self.lora.clone());
        Ok(())
    }

    fn names(&self) -> Vec<(String, String)> {
        self.layers.iter().map(|l| (lora_a_name(&l.module), lora_b_name(&l.module))).collect()
    }

    /// The current (trained) A_f, B_f from `params`, PEFT-named; valid on W_frz.
    pub fn trained_adapter(&self, params: &Params) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
        let mut out = Vec::new();
        for (a, b) in self.names() {
            out.push((a.clone(), copy_tensor(params.get(&a)?)?));
            out.push((b.clone(), copy_tensor(params.get(&b)?)?));
        }
        Ok((AdapterConfig::from_lora(&self.lora, None), out))
    }

    /// The adapter that gives the current model on the ORIGINAL weights W0 (module docs).
    pub fn converted_adapter(&self, params: &Params) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
        if !self.method.modifies_base() {
            return self.trained_adapter(params);
        }
        let mut out = Vec::new();
        for (l, (a_name, b_name)) in self.layers.iter().zip(self.names()) {
            let (af, bf) = (params.get(&a_name)?, params.get(&b_name)?);
            if af.dims() != l.a.dims()
                || bf.dims() != l.b.dims()
                || af.dtype() != l.a.dtype()
                || bf.dtype() != l.b.dtype()
            {
                return Err(Error::layer(
                    "converted adapter",
                    &l.module,
                    format!("A {:?}/B {:?} now, A0 {:?}/B0 {:?} at init", af, bf, l.a, l.b),
                ));
            }
            let (r, n) = (l.a.dims()[0], l.a.dims()[1]);
            let m = l.b.dims()[0];
            let mut a = af.to_f32_vec()?;
            a.extend(l.a.to_f32_vec()?);
            let (bf, b0) = (bf.to_f32_vec()?, l.b.to_f32_vec()?);
            let b = (0..m)
                .flat_map(|i| bf[i * r..(i + 1) * r].iter().copied().chain(b0[i * r..(i + 1) * r].iter().map(|x| -x)))
                .collect();
            // Concatenation and negation are exact in bf16 too, so going through f32 loses nothing.
            let stored = |v: Vec<f32>, shape: [usize; 2], dtype| {
                Tensor::from_cpu(CpuStorage::from_f32_vec(dtype, v), shape.into(), &crate::Device::Cpu)
            };
            out.push((a_name, stored(a, [2 * r, n], l.a.dtype())?));
            out.push((b_name, stored(b, [m, 2 * r], l.b.dtype())?));
        }
        let mut cfg = AdapterConfig::from_lora(&self.lora, None);
        cfg.r *= 2;
        cfg.lora_alpha *= if self.lora.use_rslora { std::f32::consts::SQRT_2 } else { 2.0 };
        Ok((cfg, out))
    }

    /// Writes [`Self::converted_adapter`] as a PEFT adapter directory for `base_model`.
    pub fn save_converted(&self, params: &Params, dir: impl AsRef<Path>, base_model: Option<&str>) -> Result<()> {
        let (mut cfg, tensors) = self.converted_adapter(params)?;
        cfg.base_model_name_or_path = base_model.map(String::from);
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        save_adapter(dir, &cfg, &refs, &[])
    }
}

fn dtype_json(d: Option<DType>) -> Value {
    d.map_or(Value::Null, |d| Value::from(d.as_str()))
}

fn method_to_json(m: &InitMethod) -> Value {
    match m {
        InitMethod::Lora { seed } => json!({"kind": "lora", "seed": seed}),
        InitMethod::LoraGa(c) => json!({
            "kind": "lora_ga",
            "direction": c.direction.name(),
            "scale": c.scale.name(),
            "stable_gamma": c.stable_gamma,
            "variant": c.variant.name(),
            "svd": match c.svd { SvdMethod::Randomized => "randomized", SvdMethod::Exact => "exact" },
            "niter": c.niter,
            "seed": c.seed,
            "adapter_dtype": dtype_json(c.adapter_dtype),
        }),
        InitMethod::Pissa(c) => json!({
            "kind": "pissa",
            "niter": match c.svd { PissaSvd::Exact => None, PissaSvd::Fast { niter } => Some(niter) },
            "seed": c.seed,
            "adapter_dtype": dtype_json(c.adapter_dtype),
        }),
    }
}

fn method_from_json(v: &Value) -> Result<InitMethod> {
    let bad = |k: &str| Error::InvalidArgument(format!("init method: '{k}' is missing or malformed in {v}"));
    let str_of = |k: &str| v.get(k).and_then(Value::as_str).ok_or_else(|| bad(k));
    let u64_of = |k: &str| v.get(k).and_then(Value::as_u64).ok_or_else(|| bad(k));
    let dtype = || -> Result<Option<DType>> {
        match v.get("adapter_dtype") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s == "f32" => Ok(Some(DType::F32)),
            Some(Value::String(s)) if s == "bf16" => Ok(Some(DType::BF16)),
            _ => Err(bad("adapter_dtype")),
        }
    };
    Ok(match str_of("kind")? {
        "lora" => InitMethod::Lora { seed: u64_of("seed")? },
        "lora_ga" => InitMethod::LoraGa(LoraGaConfig {
            direction: Direction::from_name(str_of("direction")?)?,
            scale: Scale::from_name(str_of("scale")?)?,
            stable_gamma: v.get("stable_gamma").and_then(Value::as_f64).ok_or_else(|| bad("stable_gamma"))? as f32,
            variant: Variant::from_name(str_of("variant")?)?,
            svd: match str_of("svd")? {
                "randomized" => SvdMethod::Randomized,
                "exact" => SvdMethod::Exact,
                _ => return Err(bad("svd")),
            },
            niter: u64_of("niter")? as usize,
            seed: u64_of("seed")?,
            adapter_dtype: dtype()?,
        }),
        "pissa" => InitMethod::Pissa(PissaConfig {
            svd: match v.get("niter") {
                Some(Value::Null) => PissaSvd::Exact,
                _ => PissaSvd::Fast { niter: u64_of("niter")? as usize },
            },
            seed: u64_of("seed")?,
            adapter_dtype: dtype()?,
        }),
        _ => return Err(bad("kind")),
    })
}
