//! The tiny random Llama parity cases of tests/fixtures/llama/ (written by
//! `scripts/fixtures/llama_parity.py` with transformers + PEFT): model, LoRA adapters, batch and
//! transformers' outputs, shared by the CPU and the CUDA parity tests.

use std::path::PathBuf;

use loraga_core::autograd::{Params, Tape};
use loraga_core::io::SafetensorsCheckpoint;
use loraga_core::lora::{LoraConfig, LoraTarget};
use loraga_core::model::{Batch, Llama};
use loraga_core::testing::{rel_error, repo_path};
use loraga_core::{DType, Device};

pub struct Case {
    pub name: String,
    pub model: Llama,
    pub params: Params,
    /// The LoRA A/B parameter names.
    pub lora_names: Vec<String>,
    pub batch: Batch,
    outputs: SafetensorsCheckpoint,
}

fn fixture(relative: &str) -> PathBuf {
    let p = repo_path(relative);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fixtures/llama_parity.py where torch/transformers/peft exist",
        p.display()
    );
    p
}

pub fn load(case: &str) -> Case {
    let dir = fixture(&format!("tests/fixtures/llama/{case}"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let (mut model, mut params) =
        Llama::load_safetensors(dir.join("config.json"), dir.join("weights.safetensors")).unwrap();
    let lora = LoraConfig {
        r: meta["r"].as_u64().unwrap() as usize,
        alpha: meta["alpha"].as_f64().unwrap() as f32,
        use_rslora: meta["use_rslora"].as_bool().unwrap(),
        targets: meta["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| LoraTarget::from_name(t.as_str().unwrap()).unwrap())
            .collect(),
    };
    let adapter = SafetensorsCheckpoint::open(dir.join("lora.safetensors")).unwrap();
    let lora_names: Vec<String> = adapter.names().map(String::from).collect();
    assert_eq!(lora_names.len(), 2 * lora.targets.len() * model.config.num_hidden_layers);
    for n in &lora_names {
        params.insert(n.clone(), adapter.tensor(n, DType::F32, &Device::Cpu).unwrap(), true).unwrap();
    }
    model.lora = Some(lora);
    let ints = |k: &str| -> Vec<i64> { meta[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let batch = Batch {
        batch: meta["batch"].as_u64().unwrap() as usize,
        seq: meta["seq"].as_u64().unwrap() as usize,
        input_ids: ints("input_ids").iter().map(|&i| i as u32).collect(),
        attention_mask: Some(ints("attention_mask").iter().map(|&m| m != 0).collect()),
        labels: Some(ints("labels")),
    };
    let outputs = SafetensorsCheckpoint::open(dir.join("outputs.safetensors")).unwrap();
    Case { name: case.into(), model, params, lora_names, batch, outputs }
}

/// Relative errors of one forward + backward against transformers.
#[derive(Debug)]
pub struct Errors {
    pub logits: f64,
    pub loss: f64,
    /// The largest over every LoRA A/B gradient.
    pub lora_grad: f64,
}

impl Case {
    fn reference(&self, n: &str) -> Vec<f64> {
        let t = self.outputs.tensor(n, DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();
        t.into_iter().map(f64::from).collect()
    }

    /// Runs the case with `params` (the case's own, or a copy on another device/dtype) and
    /// compares logits (at real tokens: what padded queries produce is an implementation
    /// choice), loss and every LoRA gradient with transformers'.
    pub fn errors(&self, params: &mut Params) -> Errors {
        let mut tape = Tape::new();
        let out = self.model.forward(&mut tape, params, &self.batch).unwrap();
        let v = self.model.config.vocab_size;
        let mask = self.batch.attention_mask.as_ref().unwrap();
        let got = tape.value(out.logits).to_f32_vec().unwrap();
        let want = self.reference("logits");
        assert_eq!(got.len(), want.len(), "{}: logits", self.name);
        let real = |x: Vec<f64>| -> Vec<f64> {
            x.chunks(v).zip(mask).filter(|(_, m)| **m).flat_map(|(r, _)| r.to_vec()).collect()
        };
        let got_real: Vec<f32> = real(got.iter().map(|&x| x as f64).collect()).iter().map(|&x| x as f32).collect();
        let logits = rel_error(&got_real, &real(want));
        let loss_var = out.loss.unwrap();
        let loss = rel_error(&tape.value(loss_var).to_f32_vec().unwrap(), &self.reference("loss"));
        tape.backward(loss_var, params, None).unwrap();
        let mut lora_grad = 0.0f64;
        for n in &self.lora_names {
            let g = params.grad(n).unwrap().unwrap_or_else(|| panic!("{}: no gradient for {n}", self.name));
            lora_grad = lora_grad.max(rel_error(&g.to_f32_vec().unwrap(), &self.reference(&format!("grad.{n}"))));
        }
        Errors { logits, loss, lora_grad }
    }
}
