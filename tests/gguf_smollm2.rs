//! The real model: SmolLM2-135M-Instruct as llama.cpp quantised it (Q4_1, token_embd Q8_0).
//! `scripts/fetch-smollm2.sh` puts it in `.cache/models/`; without it these tests fail, by design.
//! `tests/fixtures/smollm2_gguf_reference.json` holds values that llama.cpp's own Python reader
//! (gguf-py 0.19.0) dequantised from the same file, written by `scripts/fixtures/gguf_reference.py`.

use std::path::PathBuf;

use loraga_core::io::{GgmlType, GgufFile, unpermute_qk};

fn model_path() -> PathBuf {
    let p = loraga_core::testing::repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-smollm2.sh first", p.display());
    p
}

fn open() -> GgufFile {
    let t = std::time::Instant::now();
    let f = GgufFile::open(model_path()).unwrap();
    // Metadata holds ~100k tokenizer strings; opening should still be quick.
    assert!(t.elapsed().as_secs_f64() < 5.0, "opening took {:?}", t.elapsed());
    f
}

/// (mean, std) in f64.
fn stats(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn architecture_metadata() {
    let f = open();
    assert_eq!(f.version(), 3);
    let m = f.metadata();
    assert_eq!(m.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(m.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(m.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(m.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(m.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(m.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(m.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert!((m.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap() - 1e-5).abs() < 1e-9);

    let tokens = m.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[0], "<|endoftext|>");
    assert_eq!(m.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert!(m.get_str_array("tokenizer.ggml.merges").unwrap().len() > 40000);
    assert_eq!(m.get_i64_array("tokenizer.ggml.token_type").unwrap().len(), 49152);
    // A wrong-type access names the key and both types.
    let e = m.get_u32("general.architecture").unwrap_err().to_string();
    assert!(e.contains("'general.architecture' is string, expected u32"), "{e}");
}

#[test]
fn tensor_list_and_types() {
    let f = open();
    let infos = f.tensor_infos();
    // 30 blocks × 9 tensors + token_embd + output_norm; the output head is tied to token_embd.
    assert_eq!(infos.len(), 30 * 9 + 2, "{:?}", infos.iter().map(|t| &t.name).collect::<Vec<_>>());
    assert!(f.tensor_info("output.weight").is_err());

    let emb = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.ne, vec![576, 49152]);
    assert_eq!(emb.shape(), vec![49152, 576]);
    assert_eq!(f.tensor_info("output_norm.weight").unwrap().ggml_type, GgmlType::F32);

    for b in 0..30 {
        let shape = |name: &str| {
            let t = f.tensor_info(&format!("blk.{b}.{name}.weight")).unwrap();
            (t.ggml_type, t.shape())
        };
        assert_eq!(shape("attn_norm"), (GgmlType::F32, vec![576]));
        assert_eq!(shape("ffn_norm"), (GgmlType::F32, vec![576]));
        assert_eq!(shape("attn_q").1, vec![576, 576]);
        assert_eq!(shape("attn_k").1, vec![192, 576]);
        assert_eq!(shape("attn_v").1, vec![192, 576]);
        assert_eq!(shape("attn_output").1, vec![576, 576]);
        assert_eq!(shape("ffn_gate").1, vec![1536, 576]);
        assert_eq!(shape("ffn_up").1, vec![1536, 576]);
        assert_eq!(shape("ffn_down").1, vec![576, 1536]);
    }
    let q4_1 = infos.iter().filter(|t| t.ggml_type == GgmlType::Q4_1).count();
    assert!(q4_1 >= 30 * 6, "only {q4_1} Q4_1 tensors");
}

#[test]
fn dequantised_weights_are_sane() {
    let f = open();
    let (shape, emb) = f.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(shape, vec![49152, 576]);
    assert!(emb.iter().all(|x| x.is_finite()));
    let (mean, std) = stats(&emb);
    assert!(mean.abs() < 0.05 && (0.02..0.5).contains(&std), "token_embd mean {mean} std {std}");
    // Rows are token vectors: distinct tokens must not share one.
    assert_ne!(emb[..576], emb[576..1152]);

    let name = "blk.0.attn_q.weight";
    assert_eq!(f.tensor_info(name).unwrap().ggml_type, GgmlType::Q4_1);
    let (shape, q) = f.tensor_f32(name).unwrap();
    assert_eq!(shape, vec![576, 576]);
    assert!(q.iter().all(|x| x.is_finite()));
    let (mean, std) = stats(&q);
    assert!(mean.abs() < 0.05 && (0.01..0.5).contains(&std), "{name} mean {mean} std {std}");
    // Un-permuting moves rows but keeps every value.
    let hf = unpermute_qk(&q, 576, 576, 9).unwrap();
    assert_ne!(hf, q);
    let (mut a, mut b) = (q.clone(), hf);
    a.sort_by(f32::total_cmp);
    b.sort_by(f32::total_cmp);
    assert_eq!(a, b);

    let (_, norm) = f.tensor_f32("blk.0.attn_norm.weight").unwrap();
    assert!(norm.iter().all(|x| x.is_finite()) && stats(&norm).0 > 0.0);
}

#[test]
fn matches_gguf_py_reference_values() {
    let f = open();
    let path = loraga_core::testing::repo_path("tests/fixtures/smollm2_gguf_reference.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();

    let meta = reference["metadata"].as_object().unwrap();
    let m = f.metadata();
    for (key, want) in meta {
        match want {
            serde_json::Value::String(s) => assert_eq!(m.get_str(key).unwrap(), s, "{key}"),
            v if v.is_u64() => assert_eq!(m.get_u64(key).unwrap(), v.as_u64().unwrap(), "{key}"),
            v => assert_eq!(m.get_f32(key).unwrap() as f64, v.as_f64().unwrap(), "{key}"),
        }
    }

    let tensors = reference["tensors"].as_object().unwrap();
    assert!(tensors.len() >= 5);
    for (name, want) in tensors {
        let info = f.tensor_info(name).unwrap();
        assert_eq!(info.ggml_type.to_string(), want["ggml_type"].as_str().unwrap(), "{name}");
        let (shape, w) = f.tensor_f32(name).unwrap();
        let want_shape: Vec<usize> =
            want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(shape, want_shape, "{name}");
        let indices = want["indices"].as_array().unwrap();
        let values = want["values"].as_array().unwrap();
        for (i, v) in indices.iter().zip(values) {
            let (i, v) = (i.as_u64().unwrap() as usize, v.as_f64().unwrap());
            // Both sides compute q·d (+ m) in f32 from the same bits.
            assert!((w[i] as f64 - v).abs() <= 1e-6 * v.abs().max(1e-3), "{name}[{i}]: {} vs gguf-py {v}", w[i]);
        }
        let (mean, std) = stats(&w);
        let sum_sq: f64 = w.iter().map(|&x| (x as f64).powi(2)).sum();
        let close = |a: f64, b: f64, what: &str| {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-6), "{name} {what}: {a} vs {b}")
        };
        close(mean, want["mean"].as_f64().unwrap(), "mean");
        close(std, want["std"].as_f64().unwrap(), "std");
        close(sum_sq, want["sum_sq"].as_f64().unwrap(), "sum of squares");
    }
}

/// Our un-permute against the reshape/swapaxes that transformers' GGUF loader applies
/// (`_reverse_permute_weights`), as recorded by the reference script; and, when the script ran
/// with `--hf`, against the q_proj / k_proj that transformers itself loaded.
#[test]
fn unpermute_matches_transformers_layout() {
    let f = open();
    let path = loraga_core::testing::repo_path("tests/fixtures/smollm2_gguf_reference.json");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut checks = vec![];
    for (gguf_name, want) in reference["unpermuted"].as_object().unwrap() {
        checks.push((gguf_name.clone(), want.clone()));
    }
    if let Some(hf) = reference.get("hf").and_then(|h| h.as_object()) {
        let n_kv = reference["unpermuted"]["blk.0.attn_k.weight"]["n_head"].clone();
        let n_q = reference["unpermuted"]["blk.0.attn_q.weight"]["n_head"].clone();
        for (hf_name, gguf_name, heads) in [
            ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", n_q),
            ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", n_kv),
        ] {
            let mut want = hf[hf_name].clone();
            want["n_head"] = heads;
            checks.push((gguf_name.to_string(), want));
        }
    }
    assert!(checks.len() >= 2);
    for (name, want) in checks {
        let (shape, w) = f.tensor_f32(&name).unwrap();
        let n_head = want["n_head"].as_u64().unwrap() as usize;
        let hf = unpermute_qk(&w, shape[0], shape[1], n_head).unwrap();
        let indices = want["indices"].as_array().unwrap();
        for (i, v) in indices.iter().zip(want["values"].as_array().unwrap()) {
            let (i, v) = (i.as_u64().unwrap() as usize, v.as_f64().unwrap());
            assert!((hf[i] as f64 - v).abs() <= 1e-6 * v.abs().max(1e-3), "{name}[{i}]: {} vs {v}", hf[i]);
        }
        // The un-permute must matter at these indices, or the check proves nothing.
        assert!(
            indices.iter().any(|i| {
                let i = i.as_u64().unwrap() as usize;
                hf[i] != w[i]
            }),
            "{name}"
        );
    }
}
