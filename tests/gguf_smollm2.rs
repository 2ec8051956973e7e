//! The real model: SmolLM2-135M-Instruct as llama.cpp quantised it (Q4_1, token_embd Q8_0).
//! `scripts/fetch-smollm2.sh` puts it in `.cache/models/`; without it these tests fail, by design.

use std::path::PathBuf;

use loraga_core::io::{GgmlType, GgufFile, unpermute_qk};

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
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
