//! The byte-level BPE rebuilt from SmolLM2's GGUF metadata: round trips on English and GSM8K
//! text, special tokens, digits split one by one (SmolLM's pre-tokenizer), and a tokenizer.json
//! written from it loading back the same, and token ids equal to transformers' tokenizer for the
//! same GGUF (tests/fixtures/smollm2_tokens.json, written by scripts/fixtures/llama_parity.py on
//! the GPU machine). Needs `scripts/fetch-smollm2.sh` (fails without it).

use loraga_core::io::GgufFile;
use loraga_core::testing::repo_path;
use loraga_core::tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    let p = repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-smollm2.sh first", p.display());
    Tokenizer::from_gguf(&GgufFile::open(p).unwrap()).unwrap()
}

fn gsm8k_first() -> (String, String) {
    let path = repo_path("../shared/data/gsm8k/test.jsonl");
    let alt = std::path::PathBuf::from("/work/shared/data/gsm8k/test.jsonl");
    let path = if path.is_file() { path } else { alt };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    (v["question"].as_str().unwrap().to_string(), v["answer"].as_str().unwrap().to_string())
}

#[test]
fn round_trips_english_and_gsm8k() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 49152);
    let (q, a) = gsm8k_first();
    for text in [
        "The capital of France is Paris.",
        "  Leading spaces,\ttabs\nand newlines\n\n",
        "naïve café — 2×3 ≠ 7 😀",
        &q,
        &a,
    ] {
        let ids = t.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
    // Whole words of plain English are single tokens with the 'Ġ' space marker.
    let ids = t.encode("The capital of France is").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
    // A GSM8K question compresses to roughly 4 characters per token.
    let n = t.encode(&q).unwrap().len();
    assert!((q.len() / 6..q.len() / 3).contains(&n), "{n} tokens for {} characters", q.len());
}

#[test]
fn digits_are_split_and_special_tokens_are_single_ids() {
    let t = tokenizer();
    let ids = t.encode("<<16-3-4=9>>").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert!(toks.contains(&"1".to_string()) && toks.contains(&"6".to_string()), "{toks:?}");
    assert_eq!(t.encode("<|im_start|>user\nHi<|im_end|>").unwrap()[0], 1);
    assert_eq!(*t.encode("<|im_start|>user\nHi<|im_end|>").unwrap().last().unwrap(), 2);
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!((t.bos_token_id(), t.eos_token_id()), (Some(1), Some(2)));
    // No BOS is added (tokenizer.ggml.add_bos_token = false).
    assert_eq!(t.encode("Hi").unwrap().len(), 1);
    let with_special = t.encode("<|im_start|>Hi").unwrap();
    assert_eq!(t.decode(&with_special, true).unwrap(), "Hi");
    assert_eq!(t.decode(&with_special, false).unwrap(), "<|im_start|>Hi");
}

#[test]
fn tokenizer_json_round_trip() {
    let t = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    t.inner().save(&path, false).unwrap();
    let back = Tokenizer::from_file(&path).unwrap();
    let (q, a) = gsm8k_first();
    for text in [q.as_str(), a.as_str(), "<|im_start|>assistant\n42<|im_end|>"] {
        assert_eq!(back.encode(text).unwrap(), t.encode(text).unwrap());
    }
    let e = Tokenizer::from_file(dir.path().join("missing.json")).err().unwrap().to_string();
    assert!(e.contains("missing.json"), "{e}");
}

#[test]
fn token_ids_match_transformers() {
    let path = repo_path("tests/fixtures/smollm2_tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tok = tokenizer();
    let strings = fx["ids"].as_object().unwrap();
    assert!(strings.len() >= 5, "only {} strings in the fixture", strings.len());
    for (text, ids) in strings {
        let want: Vec<u32> = ids.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
    }
}
