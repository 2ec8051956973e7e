//! Parity with transformers + PEFT on tiny random Llamas (GQA; untied head with alpha/r, tied head
//! with rsLoRA): logits, loss and every LoRA A/B gradient, f32, relative error <= 1e-4. (The
//! SmolLM2 tokenizer's ids against transformers' are in tests/tokenizer_smollm2.rs; the same
//! cases on CUDA are in tests/llama_cuda.rs.)
//!
//! The fixtures in tests/fixtures/llama/ were written by
//! `scripts/fixtures/llama_parity.py` on the GPU machine (torch 2.11, transformers 5.17,
//! peft 0.21; run on its CPU in f32) on 2026-11-28. A missing fixture fails the test.

mod common;

use common::llama_fixture;

const TOL: f64 = 1e-4;

fn check_case(case: &str) {
    let mut c = llama_fixture::load(case);
    let mut params = std::mem::take(&mut c.params);
    let e = c.errors(&mut params);
    assert!(e.logits <= TOL && e.loss <= TOL && e.lora_grad <= TOL, "{case}: {e:?}");
}

#[test]
fn untied_gqa_lora_matches_transformers_and_peft() {
    check_case("gqa_untied");
}

#[test]
fn tied_gqa_rslora_matches_transformers_and_peft() {
    check_case("gqa_tied");
}
