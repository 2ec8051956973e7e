//! The real model for the `*_smollm2` tests: SmolLM2-135M-Instruct loaded once per test binary
//! from `.cache/models/` (`scripts/fetch-smollm2.sh`; a test fails without it, by design), and
//! the GSM8K test split.

use std::sync::OnceLock;
use std::time::Instant;

use loraga_core::autograd::Params;
use loraga_core::data::{Fields, Record, read_jsonl};
use loraga_core::io::GgufFile;
use loraga_core::model::Llama;
use loraga_core::testing::repo_path;
use loraga_core::tokenizer::Tokenizer;

pub struct Smol {
    pub model: Llama,
    pub params: Params,
    pub tok: Tokenizer,
}

pub fn smol() -> &'static Smol {
    static SMOL: OnceLock<Smol> = OnceLock::new();
    SMOL.get_or_init(|| {
        let p = repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(p.is_file(), "{} is missing: run scripts/fetch-smollm2.sh first", p.display());
        let t = Instant::now();
        let (model, params) = Llama::load_gguf(&p).unwrap();
        let tok = Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
        eprintln!("loaded SmolLM2 in {:.1?}", t.elapsed());
        Smol { model, params, tok }
    })
}

/// GSM8K's test problems (`../shared/data/gsm8k/test.jsonl` beside the checkout).
pub fn gsm8k_test() -> Vec<Record> {
    let path = repo_path("../shared/data/gsm8k/test.jsonl");
    let path = if path.is_file() { path } else { "/work/shared/data/gsm8k/test.jsonl".into() };
    read_jsonl(path, &Fields::default()).unwrap()
}
