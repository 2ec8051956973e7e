//! Greedy generation on the real model, SmolLM2-135M-Instruct from its GGUF (needs
//! `scripts/fetch-smollm2.sh`; fails without it, by design):
//!
//! - the cached, batched decoder's greedy answer to GSM8K questions equals greedy decoding by a
//!   full forward per new token (no cache), token for token;
//! - three questions of different lengths decoded together give what each gives alone;
//! - the answer is English about the question, not noise.

mod common;

use std::time::Instant;

use common::smollm2::{Smol, gsm8k_test, smol};
use loraga_core::autograd::Tape;
use loraga_core::data::{EncodeOptions, Record};
use loraga_core::model::Batch;
use loraga_core::model::generate::{GreedyConfig, argmax_rows, greedy};
use loraga_core::{Device, Tensor};

fn prompt(s: &Smol, r: &Record) -> Vec<u32> {
    EncodeOptions::new(&s.tok, 384).unwrap().prompt_ids(&s.tok, &r.prompt).unwrap()
}

/// Greedy decoding with a full tape forward of the whole sequence for every new token.
fn greedy_without_cache(s: &Smol, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let v = s.model.config.vocab_size;
    let mut ids = prompt.to_vec();
    let eos = s.tok.eos_token_id().unwrap();
    while ids.len() < prompt.len() + max_new {
        let b = Batch { batch: 1, seq: ids.len(), input_ids: ids.clone(), attention_mask: None, labels: None };
        let mut tape = Tape::new();
        let out = s.model.forward(&mut tape, &s.params, &b).unwrap();
        let logits = tape.value(out.logits).to_vec::<f32>().unwrap();
        let last = Tensor::from_vec(logits[(ids.len() - 1) * v..].to_vec(), [1, v], &Device::Cpu).unwrap();
        let t = argmax_rows(&last).unwrap()[0];
        ids.push(t);
        if t == eos {
            break;
        }
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn cached_greedy_equals_uncached_greedy_and_reads_as_english() {
    let s = smol();
    let recs = gsm8k_test();
    let p = prompt(s, &recs[1]);
    let max_new = 24;
    let t = Instant::now();
    let plain = greedy_without_cache(s, &p, max_new);
    let t_plain = t.elapsed();
    let cfg = GreedyConfig { max_new_tokens: max_new, stop_tokens: vec![s.tok.eos_token_id().unwrap()] };
    let t = Instant::now();
    let got = greedy(&s.model, &s.params, std::slice::from_ref(&p), &cfg).unwrap();
    let t_cached = t.elapsed();
    let text = s.tok.decode(&got[0].tokens, true).unwrap();
    eprintln!("Q: {}\nA: {text:?}\n(no cache {t_plain:.1?}, cached {t_cached:.1?})", recs[1].prompt);
    assert_eq!(got[0].tokens, plain, "cached {text:?} vs uncached {:?}", s.tok.decode(&plain, false).unwrap());
    // English about the question: mostly letters and spaces, words of the question, no
    // token repeated over and over.
    let letters = text.chars().filter(|c| c.is_ascii_alphanumeric() || " .,$=*+-/\n".contains(*c)).count();
    assert!(letters * 10 >= text.chars().count() * 9, "{text:?}");
    let q_words: Vec<&str> = recs[1].prompt.split_whitespace().filter(|w| w.len() > 3).collect();
    assert!(q_words.iter().any(|w| text.contains(w.trim_matches(|c: char| !c.is_alphanumeric()))), "{text:?}");
    let distinct: std::collections::BTreeSet<u32> = got[0].tokens.iter().copied().collect();
    assert!(distinct.len() * 3 >= got[0].tokens.len(), "{text:?}");
}

#[test]
fn batched_prompts_of_different_lengths_decode_as_alone() {
    let s = smol();
    let recs = gsm8k_test();
    let prompts: Vec<Vec<u32>> = [3, 0, 1].iter().map(|&i| prompt(s, &recs[i])).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens[0] != lens[1] && lens[1] != lens[2], "{lens:?}");
    let cfg = GreedyConfig { max_new_tokens: 20, stop_tokens: vec![s.tok.eos_token_id().unwrap()] };
    let t = Instant::now();
    let together = greedy(&s.model, &s.params, &prompts, &cfg).unwrap();
    let t_together = t.elapsed();
    for (i, p) in prompts.iter().enumerate() {
        let alone = greedy(&s.model, &s.params, std::slice::from_ref(p), &cfg).unwrap();
        assert_eq!(together[i], alone[0], "prompt {i} ({} tokens)", lens[i]);
    }
    let n: usize = together.iter().map(|g| g.tokens.len()).sum();
    eprintln!("prompts of {lens:?} tokens: {n} new tokens together in {t_together:.1?}");
}
