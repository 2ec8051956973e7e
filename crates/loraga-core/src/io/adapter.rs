//! PEFT LoRA adapter directories, as `PeftModel.from_pretrained` reads them (PEFT 0.21):
//!
//!   adapter_config.json         peft_type "LORA", r, lora_alpha, use_rslora, target_modules,
//!                               task_type "CAUSAL_LM", base_model_name_or_path, ...
//!   adapter_model.safetensors   `base_model.model.<module>.lora_A.weight` [r, in] and
//!                               `.lora_B.weight` [out, r] ([`crate::lora::lora_a_name`])
//!
//! The config always says `init_lora_weights: true`, so loading never re-runs an initialisation
//! that would change the base weights (PEFT's own rule for converted and initial adapters).
//!
//! A directory is written whole or not at all: the files go to a temporary sibling directory,
//! which is synced and renamed into place. An existing target is replaced only if it holds
//! nothing but adapter files, so a wrong path cannot wipe out unrelated data.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::safetensors::{SafetensorsCheckpoint, save_safetensors};
use crate::autograd::Params;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraTarget, lora_a_name, lora_b_name};
use crate::model::Llama;
use crate::tensor::Tensor;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Files an adapter directory may hold (PEFT also writes a README.md model card).
const ADAPTER_FILES: &[&str] = &[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "loraga_init.json"];

/// The fields of PEFT's `LoraConfig` that decide what an adapter computes.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub use_rslora: bool,
    /// PEFT's module names (`q_proj`, ...).
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    pub fn from_lora(lora: &LoraConfig, base_model: Option<&str>) -> AdapterConfig {
        AdapterConfig {
            r: lora.r,
            lora_alpha: lora.alpha,
            use_rslora: lora.use_rslora,
            target_modules: lora.targets.iter().map(|t| t.name().to_string()).collect(),
            base_model_name_or_path: base_model.map(String::from),
        }
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        let targets = self.target_modules.iter().map(|t| LoraTarget::from_name(t)).collect::<Result<Vec<_>>>()?;
        Ok(LoraConfig { r: self.r, alpha: self.lora_alpha, use_rslora: self.use_rslora, targets })
    }

    /// The JSON PEFT writes for a plain LoRA adapter, with these values.
    pub fn to_json(&self) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": null,
            "inference_mode": true,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": 0.0,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "exclude_modules": null,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "use_dora": false,
            "lora_bias": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Reads PEFT's JSON, refusing what would change the adapter's math in ways loraga does not
    /// implement (DoRA, biases, per-module ranks, transposed weights, ...).
    pub fn from_json(path: &Path, v: &Value) -> Result<AdapterConfig> {
        let bad = |msg: String| Err(Error::format(path, msg));
        match v.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => return bad(format!("peft_type is {other:?}, loraga reads LORA adapters")),
        }
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if flag(k) {
                return bad(format!("'{k}' is true; not supported"));
            }
        }
        if let Some(b) = v.get("bias").and_then(Value::as_str)
            && b != "none"
        {
            return bad(format!("bias is '{b}'; only \"none\" is supported"));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
                return bad(format!("'{k}' is set; per-module ranks and alphas are not supported"));
            }
        }
        for k in [
            "layers_to_transform",
            "modules_to_save",
            "layer_replication",
            "trainable_token_indices",
            "target_parameters",
            "alora_invocation_tokens",
        ] {
            if v.get(k).is_some_and(|x| !x.is_null()) {
                return bad(format!("'{k}' is set; not supported"));
            }
        }
        let r = v.get("r").and_then(Value::as_u64).filter(|&r| r > 0);
        let Some(r) = r else { return bad(format!("'r' is {:?}, expected a positive integer", v.get("r"))) };
        let Some(alpha) = v.get("lora_alpha").and_then(Value::as_f64) else {
            return bad(format!("'lora_alpha' is {:?}, expected a number", v.get("lora_alpha")));
        };
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(String::from)
                        .ok_or_else(|| Error::format(path, format!("target {t} is not a string")))
                })
                .collect::<Result<Vec<_>>>()?,
            other => return bad(format!("target_modules is {other:?}; loraga reads a list of module names")),
        };
        Ok(AdapterConfig {
            r: r as usize,
            lora_alpha: alpha as f32,
            use_rslora: flag("use_rslora"),
            target_modules: targets,
            base_model_name_or_path: v.get("base_model_name_or_path").and_then(Value::as_str).map(String::from),
        })
    }
}

/// Writes a PEFT adapter directory atomically; `extra` files (name, contents) go in with it.
pub fn save_adapter(
    dir: impl AsRef<Path>,
    cfg: &AdapterConfig,
    tensors: &[(&str, &Tensor)],
    extra: &[(&str, &str)],
) -> Result<()> {
    let dir = dir.as_ref();
    if dir.exists() {
        check_replaceable(dir)?;
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    let name = dir.file_name().ok_or_else(|| Error::format(dir, "not a directory path"))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    let result = write_into(&tmp, cfg, tensors, extra).and_then(|()| replace_dir(&tmp, dir, parent, &name));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_into(tmp: &Path, cfg: &AdapterConfig, tensors: &[(&str, &Tensor)], extra: &[(&str, &str)]) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(Error::io(tmp))?;
    }
    std::fs::create_dir(tmp).map_err(Error::io(tmp))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(tmp.join(ADAPTER_WEIGHTS), tensors, Some(meta))?;
    let config = serde_json::to_string_pretty(&cfg.to_json()).expect("a JSON value always serializes");
    let files = std::iter::once((ADAPTER_CONFIG, config.as_str())).chain(extra.iter().copied());
    for (file, text) in files {
        if !ADAPTER_FILES.contains(&file) {
            return Err(Error::InvalidArgument(format!("adapter file '{file}' is not one of {ADAPTER_FILES:?}")));
        }
        let path = tmp.join(file);
        let mut f = std::fs::File::create(&path).map_err(Error::io(&path))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(Error::io(&path))?;
    }
    std::fs::File::open(tmp).and_then(|d| d.sync_all()).map_err(Error::io(tmp))
}

/// Moves the finished `tmp` to `dir`; an old `dir` is moved aside first and removed after.
fn replace_dir(tmp: &Path, dir: &Path, parent: &Path, name: &str) -> Result<()> {
    let old: Option<PathBuf> = dir.exists().then(|| parent.join(format!(".{name}.old{}", std::process::id())));
    if let Some(old) = &old {
        std::fs::rename(dir, old).map_err(Error::io(dir))?;
    }
    if let Err(e) = std::fs::rename(tmp, dir) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dir);
        }
        return Err(Error::Io { path: dir.to_path_buf(), source: e });
    }
    if let Some(old) = &old {
        std::fs::remove_dir_all(old).map_err(Error::io(old))?;
    }
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(Error::io(parent))
}

fn check_replaceable(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::format(dir, "exists and is not a directory; refusing to replace it with an adapter"));
    }
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let entry = entry.map_err(Error::io(dir))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if !ADAPTER_FILES.contains(&file.as_str()) {
            return Err(Error::format(
                dir,
                format!("holds '{file}', which is not an adapter file; refusing to replace the directory"),
            ));
        }
    }
    Ok(())
}

/// An adapter directory's config and its weights (as stored), by PEFT name.
pub struct Adapter {
    pub config: AdapterConfig,
    pub tensors: SafetensorsCheckpoint,
}

/// Opens an adapter directory: parses the config, validates the safetensors file.
pub fn read_adapter(dir: impl AsRef<Path>) -> Result<Adapter> {
    let dir = dir.as_ref();
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?;
    let config = AdapterConfig::from_json(&path, &v)?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    if !weights.is_file() {
        return Err(Error::format(dir, format!("no {ADAPTER_WEIGHTS} (loraga reads safetensors adapters only)")));
    }
    Ok(Adapter { config, tensors: SafetensorsCheckpoint::open(&weights)? })
}

impl Adapter {
    /// Every A and B the config implies for `model`, checked against the file: each present with
    /// its shape (A [r, in], B [out, r] of the base weight), nothing else in the file. Returned in
    /// the base weights' dtype, in layer-then-target order.
    pub fn tensors_for(&self, model: &Llama, params: &Params) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
        let lora = self.config.lora_config()?;
        let file = self.tensors.path();
        let mut out = Vec::new();
        let mut expected = HashSet::new();
        for layer in 0..model.config.num_hidden_layers {
            for t in &lora.targets {
                let path = t.module_path(layer);
                let w = params.get(&format!("{path}.weight"))?;
                let (m, n) = w.shape().dims2("adapter", &path)?;
                for (name, shape) in [(lora_a_name(&path), [lora.r, n]), (lora_b_name(&path), [m, lora.r])] {
                    if !self.tensors.contains(&name) {
                        return Err(Error::format(
                            file,
                            format!("'{name}' is missing (r = {}, targets {:?})", lora.r, self.config.target_modules),
                        ));
                    }
                    let (got, _) = self.tensors.shape_and_dtype(&name)?;
                    if got != shape {
                        return Err(Error::format(
                            file,
                            format!("'{name}' has shape {got:?}, expected {shape:?} for r = {}", lora.r),
                        ));
                    }
                    out.push((name.clone(), self.tensors.tensor(&name, w.dtype(), &w.device())?));
                    expected.insert(name);
                }
            }
        }
        if let Some(extra) = self.tensors.names().find(|n| !expected.contains(*n)) {
            return Err(Error::format(file, format!("'{extra}' is not a LoRA weight of this model's targets")));
        }
        Ok((lora, out))
    }
}

/// Loads an adapter directory onto `model`: inserts its A and B into `params` and turns LoRA on.
pub fn load_adapter(
    dir: impl AsRef<Path>,
    model: &mut Llama,
    params: &mut Params,
    trainable: bool,
) -> Result<LoraConfig> {
    if model.lora.is_some() {
        return Err(Error::InvalidArgument("load_adapter: the model already has an adapter".into()));
    }
    let (lora, tensors) = read_adapter(dir)?.tensors_for(model, params)?;
    if let Some((name, _)) = tensors.iter().find(|(n, _)| params.contains(n)) {
        return Err(Error::layer("load_adapter", name, "is already a parameter"));
    }
    for (name, t) in tensors {
        params.insert(name, t, trainable)?;
    }
    model.lora = Some(lora.clone());
    Ok(lora)
}
