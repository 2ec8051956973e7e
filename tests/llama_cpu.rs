//! The Llama model on the CPU with tiny random weights: loading round trip through safetensors +
//! config.json, padding invariance, LoRA starting as the base model, and finite-difference
//! checks of the whole model's gradients (LoRA A/B, a norm, a base weight), tied and untied.

mod common;

use common::gguf_writer::{gguf_bytes, tensor};
use loraga_core::autograd::{HookAction, Params, Tape};
use loraga_core::io::{GgmlType, GgufValue, permute_qk, save_safetensors};
use loraga_core::lora::{LoraConfig, LoraTarget, lora_a_name, lora_b_name};
use loraga_core::model::llama_load::gguf_name;
use loraga_core::model::{Batch, Llama, LlamaConfig};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn config(tied: bool) -> LlamaConfig {
    common::tiny_llama::config(tied)
}

/// Random weights (std 0.2, norms around 1) for every base weight, frozen.
fn random_params(c: &LlamaConfig, rng: &mut StdRng) -> Params {
    common::tiny_llama::random_params(c, 0.2, rng)
}

/// Two sequences of 6; the second right-padded after 4 tokens (labels -100 there).
fn batch() -> Batch {
    let ids = vec![1, 5, 9, 2, 30, 7, 3, 3, 11, 36, 0, 0];
    let mask = vec![true, true, true, true, true, true, true, true, true, true, false, false];
    let labels = ids.iter().zip(&mask).map(|(&i, &m)| if m { i as i64 } else { -100 }).collect();
    Batch { batch: 2, seq: 6, input_ids: ids, attention_mask: Some(mask), labels: Some(labels) }
}

fn logits_and_loss(model: &Llama, p: &Params, b: &Batch) -> (Vec<f32>, f32) {
    let mut tape = Tape::new();
    let out = model.forward(&mut tape, p, b).unwrap();
    let loss = out.loss.map(|l| tape.value(l).to_vec::<f32>().unwrap()[0]).unwrap_or(f32::NAN);
    (tape.value(out.logits).to_vec::<f32>().unwrap(), loss)
}

fn lora_cfg() -> LoraConfig {
    LoraConfig { r: 2, alpha: 4.0, use_rslora: false, targets: LoraTarget::ALL.to_vec() }
}

#[test]
fn safetensors_round_trip_loads_the_same_model() {
    let mut rng = StdRng::seed_from_u64(1);
    for tied in [false, true] {
        let c = config(tied);
        let p = random_params(&c, &mut rng);
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<(&str, &Tensor)> = p.iter().map(|x| (x.name(), x.value())).collect();
        save_safetensors(dir.path().join("model.safetensors"), &tensors, None).unwrap();
        let json = serde_json::json!({
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 4, "rms_norm_eps": 1e-5, "vocab_size": 37,
            "tie_word_embeddings": tied, "max_position_embeddings": 64, "hidden_act": "silu",
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
        });
        std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
        let (model, loaded) = Llama::load_safetensors(dir.path().join("config.json"), dir.path()).unwrap();
        assert_eq!(model.config, c);
        let direct = Llama::new(c).unwrap();
        assert_eq!(logits_and_loss(&model, &loaded, &batch()), logits_and_loss(&direct, &p, &batch()));

        // A checkpoint missing a weight names it.
        let some: Vec<(&str, &Tensor)> =
            tensors.iter().copied().filter(|(n, _)| !n.contains("layers.1.mlp.up_proj")).collect();
        save_safetensors(dir.path().join("model.safetensors"), &some, None).unwrap();
        let e = Llama::load_safetensors(dir.path().join("config.json"), dir.path()).err().unwrap().to_string();
        assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
    }
}

/// The model written as llama.cpp's converter would (GGUF names, q/k rows permuted for
/// interleaved RoPE, F32), loaded back: un-permuting must restore the same model.
#[test]
fn gguf_load_renames_unpermutes_and_detects_tying() {
    let mut rng = StdRng::seed_from_u64(8);
    for tied in [false, true] {
        let c = config(tied);
        let p = random_params(&c, &mut rng);
        let mut tensors = Vec::new();
        for (name, shape) in c.weight_shapes() {
            let v = p.get(&name).unwrap().to_vec::<f32>().unwrap();
            let v = match name.rsplit('.').nth(1) {
                Some("q_proj") => permute_qk(&v, shape[0], shape[1], c.num_attention_heads).unwrap(),
                Some("k_proj") => permute_qk(&v, shape[0], shape[1], c.num_key_value_heads).unwrap(),
                _ => v,
            };
            let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push(tensor(&gguf_name(&name).unwrap(), &ne, GgmlType::F32, bytes));
        }
        let kvs = [
            ("general.architecture", GgufValue::String("llama".into())),
            ("llama.embedding_length", GgufValue::U32(16)),
            ("llama.feed_forward_length", GgufValue::U32(24)),
            ("llama.block_count", GgufValue::U32(2)),
            ("llama.attention.head_count", GgufValue::U32(4)),
            ("llama.attention.head_count_kv", GgufValue::U32(2)),
            ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
            ("llama.rope.freq_base", GgufValue::F32(10000.0)),
            ("llama.context_length", GgufValue::U32(64)),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, gguf_bytes(3, &kvs, &tensors)).unwrap();
        let (model, loaded) = Llama::load_gguf(&path).unwrap();
        assert_eq!(model.config, c);
        let direct = Llama::new(c).unwrap();
        assert_eq!(logits_and_loss(&model, &loaded, &batch()), logits_and_loss(&direct, &p, &batch()));
    }
}

#[test]
fn padding_does_not_change_real_tokens() {
    let c = config(false);
    let p = random_params(&c, &mut StdRng::seed_from_u64(2));
    let model = Llama::new(c.clone()).unwrap();
    let (padded, _) = logits_and_loss(&model, &p, &batch());
    let alone = Batch { batch: 1, seq: 4, input_ids: vec![3, 3, 11, 36], attention_mask: None, labels: None };
    let (single, _) = logits_and_loss(&model, &p, &alone);
    let v = c.vocab_size;
    let got = &padded[6 * v..10 * v];
    let reference: Vec<f64> = single.iter().map(|&x| x as f64).collect();
    assert!(rel_error(got, &reference) < 1e-6, "{}", rel_error(got, &reference));
}

#[test]
fn fresh_lora_is_the_base_model_and_hook_sees_every_lora_weight() {
    let c = config(true);
    let mut p = random_params(&c, &mut StdRng::seed_from_u64(3));
    let mut model = Llama::new(c).unwrap();
    let base = logits_and_loss(&model, &p, &batch());
    model.add_lora(&mut p, lora_cfg(), &mut StdRng::seed_from_u64(4)).unwrap();
    assert_eq!(logits_and_loss(&model, &p, &batch()), base, "B = 0 at initialisation");

    let mut tape = Tape::new();
    let loss = model.forward(&mut tape, &p, &batch()).unwrap().loss.unwrap();
    let mut names = Vec::new();
    let mut hook = |n: &str, _: &Tensor| {
        names.push(n.to_string());
        Ok(HookAction::Drop)
    };
    tape.backward(loss, &mut p, Some(&mut hook)).unwrap();
    assert_eq!(names.len(), 2 * 2 * 7, "A and B of 7 modules in 2 layers");
    assert!(names.contains(&lora_a_name(&LoraTarget::Down.module_path(1))));
    assert!(p.iter().all(|x| x.grad().is_none()));
}

/// Finite differences of the loss for a few elements of `names` against the tape's gradients.
fn check_model_grads(model: &Llama, p: &mut Params, names: &[String]) {
    for n in names {
        p.set_trainable(n, true).unwrap();
    }
    p.zero_grad();
    let mut tape = Tape::new();
    let loss = model.forward(&mut tape, p, &batch()).unwrap().loss.unwrap();
    tape.backward(loss, p, None).unwrap();
    let eps = 1e-3f32;
    for name in names {
        let grad = p.grad(name).unwrap().unwrap().to_vec::<f32>().unwrap();
        let value = p.get(name).unwrap().to_vec::<f32>().unwrap();
        let shape = p.get(name).unwrap().dims().to_vec();
        let picks: Vec<usize> = (0..6).map(|i| (i * 7919 + 13) % value.len()).collect();
        let (mut analytic, mut numeric) = (Vec::new(), Vec::new());
        for &e in &picks {
            let mut f = |delta: f32| {
                let mut v = value.clone();
                v[e] += delta;
                p.set_value(name, Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap()).unwrap();
                logits_and_loss(model, p, &batch()).1 as f64
            };
            numeric.push((f(eps) - f(-eps)) / (2.0 * eps as f64));
            analytic.push(grad[e]);
        }
        p.set_value(name, Tensor::from_vec(value, shape, &Device::Cpu).unwrap()).unwrap();
        let err = rel_error(&analytic, &numeric);
        assert!(err < 2e-2, "{name}: relative error {err:.2e}: analytic {analytic:?} numeric {numeric:?}");
    }
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    for tied in [false, true] {
        let c = config(tied);
        let mut p = random_params(&c, &mut StdRng::seed_from_u64(5));
        let mut model = Llama::new(c).unwrap();
        model.add_lora(&mut p, lora_cfg(), &mut StdRng::seed_from_u64(6)).unwrap();
        // Non-zero B so that A's gradient is not zero.
        let lora_names: Vec<String> = p.names().filter(|n| n.contains("lora_B")).map(String::from).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for n in &lora_names {
            let shape = p.get(n).unwrap().dims().to_vec();
            let v: Vec<f32> = randn(&mut rng, shape.iter().product()).iter().map(|x| 0.2 * x).collect();
            p.set_value(n, Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap();
        }
        let mut names = vec![
            lora_a_name(&LoraTarget::Q.module_path(0)),
            lora_b_name(&LoraTarget::K.module_path(1)),
            lora_a_name(&LoraTarget::Down.module_path(0)),
            lora_b_name(&LoraTarget::Up.module_path(1)),
            "model.layers.0.input_layernorm.weight".to_string(),
            "model.layers.1.self_attn.v_proj.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
        ];
        if !tied {
            names.push("lm_head.weight".to_string());
        }
        check_model_grads(&model, &mut p, &names);
    }
}

/// The tape's ops run on CUDA tensors too (tests/autograd_cuda.rs checks their results);
/// operands on different devices are an error naming the op and the devices, not a panic.
#[test]
#[ignore = "needs a CUDA GPU"]
fn ops_on_mixed_devices_are_a_clear_error_not_a_panic() {
    let (dev, cpu) = (Device::cuda(0).unwrap(), Device::Cpu);
    let f32 = loraga_core::DType::F32;
    let mut tape = Tape::new();
    let x = tape.constant(Tensor::zeros([2, 3], f32, &dev).unwrap());
    let w = tape.constant(Tensor::zeros([4, 3], f32, &cpu).unwrap());
    let e = tape.linear(x, w).unwrap_err().to_string();
    assert!(e.starts_with("linear: tensors are on different devices") && e.contains("cpu"), "{e}");
    let norm = tape.constant(Tensor::zeros([3], f32, &cpu).unwrap());
    let e = tape.rms_norm(x, norm, 1e-5).unwrap_err().to_string();
    assert!(e.starts_with("rms_norm: tensors are on different devices"), "{e}");
    let y = tape.silu(x).unwrap();
    assert!(tape.value(y).device().is_cuda(), "silu runs on the GPU");
}
