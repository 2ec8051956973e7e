//! The real model on the CPU: SmolLM2-135M-Instruct loaded from its GGUF (Q4_1 / Q8_0
//! dequantised, q/k un-permuted to the half-split RoPE layout). Needs `scripts/fetch-smollm2.sh`;
//! fails without it, by design.
//!
//! - Greedy continuation of "The capital of France is" names Paris.
//! - Mean loss on the answers of the first two GSM8K test problems (prompt
//!   `Question: <q>\nAnswer: `, loss on the answer tokens + EOS, as DESIGN.md's reference) is in a
//!   plausible range, and the same whether the two are batched with padding or run alone.

mod common;

use std::time::Instant;

use common::smollm2::{Smol, gsm8k_test, smol};
use loraga_core::autograd::Tape;
use loraga_core::model::Batch;

/// Logits of the last position of a single unpadded sequence.
fn last_logits(s: &Smol, ids: &[u32]) -> Vec<f32> {
    let batch = Batch { batch: 1, seq: ids.len(), input_ids: ids.to_vec(), attention_mask: None, labels: None };
    let mut tape = Tape::new();
    let out = s.model.forward(&mut tape, &s.params, &batch).unwrap();
    let logits = tape.value(out.logits).to_vec::<f32>().unwrap();
    let v = s.model.config.vocab_size;
    logits[(ids.len() - 1) * v..].to_vec()
}

#[test]
fn config_and_greedy_continuation() {
    let s = smol();
    let c = &s.model.config;
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.intermediate_size), (30, 576, 1536));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size), (9, 3, 64, 49152));
    assert!(c.tie_word_embeddings && c.rope_theta == 100000.0);

    let t = Instant::now();
    let mut ids = s.tok.encode("The capital of France is").unwrap();
    let prompt_len = ids.len();
    for _ in 0..3 {
        let logits = last_logits(s, &ids);
        assert!(logits.iter().all(|x| x.is_finite()), "non-finite logits");
        let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        ids.push(best as u32);
    }
    let text = s.tok.decode(&ids[prompt_len..], false).unwrap();
    eprintln!("greedy continuation: {text:?} ({:.1?})", t.elapsed());
    assert!(text.contains(" Paris"), "greedy continuation {text:?} does not name Paris");
}

fn gsm8k(n: usize) -> Vec<(String, String)> {
    gsm8k_test().into_iter().take(n).map(|r| (r.prompt, r.response)).collect()
}

/// Prompt ids then answer ids + EOS; labels only on the answer part.
fn example(s: &Smol, q: &str, a: &str) -> (Vec<u32>, Vec<i64>) {
    let prompt = s.tok.encode(&format!("Question: {q}\nAnswer: ")).unwrap();
    let mut answer = s.tok.encode(a).unwrap();
    answer.push(s.tok.eos_token_id().unwrap());
    let labels = prompt.iter().map(|_| -100).chain(answer.iter().map(|&i| i as i64)).collect();
    ([prompt, answer].concat(), labels)
}

/// Right-pads the examples into one batch and returns its mean loss.
fn loss(s: &Smol, examples: &[(Vec<u32>, Vec<i64>)]) -> f32 {
    let seq = examples.iter().map(|e| e.0.len()).max().unwrap();
    let mut b =
        Batch { batch: examples.len(), seq, attention_mask: Some(vec![]), labels: Some(vec![]), ..Default::default() };
    for (ids, labels) in examples {
        let pad = seq - ids.len();
        b.input_ids.extend(ids.iter().copied().chain(std::iter::repeat_n(s.tok.eos_token_id().unwrap(), pad)));
        b.attention_mask
            .as_mut()
            .unwrap()
            .extend(std::iter::repeat_n(true, ids.len()).chain(std::iter::repeat_n(false, pad)));
        b.labels.as_mut().unwrap().extend(labels.iter().copied().chain(std::iter::repeat_n(-100, pad)));
    }
    let mut tape = Tape::new();
    let out = s.model.forward(&mut tape, &s.params, &b).unwrap();
    tape.value(out.loss.unwrap()).to_vec::<f32>().unwrap()[0]
}

#[test]
fn gsm8k_answer_loss_is_plausible_and_padding_invariant() {
    let s = smol();
    let t = Instant::now();
    let examples: Vec<_> = gsm8k(2).iter().map(|(q, a)| example(s, q, a)).collect();
    let batched = loss(s, &examples);
    let alone: Vec<f32> = examples.iter().map(|e| loss(s, std::slice::from_ref(e))).collect();
    let counts: Vec<f32> = examples.iter().map(|e| e.1.iter().filter(|&&l| l != -100).count() as f32).collect();
    // The batch mean is over all answer tokens, so it is the count-weighted mean of the two.
    let weighted = (alone[0] * counts[0] + alone[1] * counts[1]) / (counts[0] + counts[1]);
    eprintln!("GSM8K answer loss: batched {batched:.4}, alone {alone:?}, weighted {weighted:.4} ({:.1?})", t.elapsed());
    assert!((batched - weighted).abs() < 1e-3 * weighted, "padding changed the loss: {batched} vs {weighted}");
    // DESIGN.md: transformers measures 1.575 over the first 256 answers (bf16 autocast). These
    // two are among the harder ones: alone they measure 2.31 and 2.45 here, while the first 24
    // answers give a token-weighted 1.53 (example mean 1.64), in line with the reference. So the
    // bound is loose; it still rejects a broken model (uniform over the vocabulary is
    // ln 49152 = 10.8; the wrong q/k layout more than doubles the perplexity).
    assert!((1.0..3.0).contains(&batched), "mean answer loss {batched} is implausible");
}
