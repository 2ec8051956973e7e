//! Parity with transformers + PEFT on tiny random Llamas (GQA; untied head with alpha/r, tied head
//! with rsLoRA): logits, loss and every LoRA A/B gradient, f32, relative error <= 1e-4. (The
//! SmolLM2 tokenizer's ids against transformers' are in tests/tokenizer_smollm2.rs.)
//!
//! The fixtures in tests/fixtures/llama/ were written by
//! `scripts/fixtures/llama_parity.py` on the GPU machine (torch 2.11, transformers 5.17,
//! peft 0.21; run on its CPU in f32) on 2026-11-28. A missing fixture fails the test.

use std::path::PathBuf;

use loraga_core::autograd::{Params, Tape};
use loraga_core::io::SafetensorsCheckpoint;
use loraga_core::lora::{LoraConfig, LoraTarget};
use loraga_core::model::{Batch, Llama};
use loraga_core::testing::{rel_error, repo_path};
use loraga_core::{DType, Device};

const TOL: f64 = 1e-4;

fn fixture(relative: &str) -> PathBuf {
    let p = repo_path(relative);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fixtures/llama_parity.py where torch/transformers/peft exist",
        p.display()
    );
    p
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn check_case(case: &str) {
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
    let names: Vec<String> = adapter.names().map(String::from).collect();
    assert_eq!(names.len(), 2 * lora.targets.len() * model.config.num_hidden_layers);
    for n in &names {
        params.insert(n.clone(), adapter.tensor(n, DType::F32, &Device::Cpu).unwrap(), true).unwrap();
    }
    model.lora = Some(lora);

    let ints = |k: &str| -> Vec<i64> { meta[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let mask: Vec<bool> = ints("attention_mask").iter().map(|&m| m != 0).collect();
    let batch = Batch {
        batch: meta["batch"].as_u64().unwrap() as usize,
        seq: meta["seq"].as_u64().unwrap() as usize,
        input_ids: ints("input_ids").iter().map(|&i| i as u32).collect(),
        attention_mask: Some(mask.clone()),
        labels: Some(ints("labels")),
    };
    let outputs = SafetensorsCheckpoint::open(dir.join("outputs.safetensors")).unwrap();
    let reference = |n: &str| outputs.tensor(n, DType::F32, &Device::Cpu).unwrap().to_vec::<f32>().unwrap();

    let mut tape = Tape::new();
    let out = model.forward(&mut tape, &params, &batch).unwrap();
    // Logits at real tokens only: what padded queries produce is an implementation choice.
    let v = model.config.vocab_size;
    let (got, want) = (tape.value(out.logits).to_vec::<f32>().unwrap(), reference("logits"));
    assert_eq!(got.len(), want.len());
    let keep =
        |x: &[f32]| -> Vec<f32> { x.chunks(v).zip(&mask).filter(|(_, m)| **m).flat_map(|(r, _)| r.to_vec()).collect() };
    let err = rel_error(&keep(&got), &wide(&keep(&want)));
    assert!(err <= TOL, "{case}: logits relative error {err:.2e}");
    let loss = out.loss.unwrap();
    let (got, want) = (tape.value(loss).to_vec::<f32>().unwrap(), reference("loss"));
    let err = rel_error(&got, &wide(&want));
    assert!(err <= TOL, "{case}: loss {got:?} vs {want:?} (relative error {err:.2e})");

    tape.backward(loss, &mut params, None).unwrap();
    check_grads(case, &names, &params, &reference);
}

fn check_grads(case: &str, names: &[String], params: &Params, reference: &dyn Fn(&str) -> Vec<f32>) {
    for n in names {
        let got =
            params.grad(n).unwrap().unwrap_or_else(|| panic!("{case}: no gradient for {n}")).to_vec::<f32>().unwrap();
        let err = rel_error(&got, &wide(&reference(&format!("grad.{n}"))));
        assert!(err <= TOL, "{case}: {n}: gradient relative error {err:.2e}");
    }
}

#[test]
fn untied_gqa_lora_matches_transformers_and_peft() {
    check_case("gqa_untied");
}

#[test]
fn tied_gqa_rslora_matches_transformers_and_peft() {
    check_case("gqa_tied");
}
