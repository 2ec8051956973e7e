//! Generation and evaluation on a tiny random Llama (GQA, with LoRA adapters whose B is
//! non-zero):
//!
//! - the decoder's logits after each chunk of new tokens equal the full forward's logits at the
//!   same positions (each sequence run alone on the tape), with several sequences of different
//!   lengths fed in ragged chunks;
//! - batched greedy decoding equals greedy decoding by repeated full forwards;
//! - per-example losses from `eval::loss` (padded batches) equal the tape's own cross-entropy of
//!   each example alone, and their token-weighted mean equals the loss of one batch of all;
//! - bad calls are errors.

mod common;

use loraga_core::autograd::{Params, Tape};
use loraga_core::data::{Example, collate};
use loraga_core::eval;
use loraga_core::lora::{LoraConfig, LoraTarget, lora_b_name};
use loraga_core::model::generate::{Decoder, GreedyConfig, argmax_rows, greedy};
use loraga_core::model::{Batch, Llama, LlamaConfig};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        vocab_size: 53,
        tie_word_embeddings: tied,
        max_position_embeddings: 40,
    }
}

/// Random base weights (norm weights near 1) and LoRA on every module with random B.
fn model(tied: bool, rng: &mut StdRng) -> (Llama, Params) {
    let c = config(tied);
    let mut p = common::tiny_llama::random_params(&c, 0.3, rng);
    let mut m = Llama::new(c.clone()).unwrap();
    let lora = LoraConfig { r: 3, alpha: 6.0, use_rslora: false, targets: LoraTarget::ALL.to_vec() };
    m.add_lora(&mut p, lora, rng).unwrap();
    for l in 0..c.num_hidden_layers {
        for t in LoraTarget::ALL {
            let name = lora_b_name(&t.module_path(l));
            let dims = p.get(&name).unwrap().dims().to_vec();
            let b: Vec<f32> = randn(rng, dims[0] * dims[1]).iter().map(|x| 0.2 * x).collect();
            p.set_value(&name, Tensor::from_vec(b, dims, &Device::Cpu).unwrap()).unwrap();
        }
    }
    (m, p)
}

/// The tape forward of one unpadded sequence: logits [len, vocab].
fn full_logits(m: &Llama, p: &Params, ids: &[u32]) -> Vec<f32> {
    let b = Batch { batch: 1, seq: ids.len(), input_ids: ids.to_vec(), attention_mask: None, labels: None };
    let mut tape = Tape::new();
    let out = m.forward(&mut tape, p, &b).unwrap();
    tape.value(out.logits).to_vec::<f32>().unwrap()
}

fn random_ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

#[test]
fn incremental_logits_equal_the_full_forward() {
    let mut rng = StdRng::seed_from_u64(7);
    for tied in [false, true] {
        let (m, p) = model(tied, &mut rng);
        let v = m.config.vocab_size;
        let lens = [13, 5, 1, 9];
        let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| random_ids(&mut rng, n, v)).collect();
        let full: Vec<Vec<f32>> = seqs.iter().map(|s| full_logits(&m, &p, s)).collect();
        let mut dec = Decoder::new(&m, &p, seqs.len(), 16).unwrap();
        let mut fed = vec![0usize; seqs.len()];
        let (mut got, mut want) = (Vec::new(), Vec::new());
        let mut calls = 0;
        while fed.iter().zip(&seqs).any(|(&f, s)| f < s.len()) {
            // Each unfinished sequence takes 1-4 more tokens, or sits this call out.
            let mut inputs = Vec::new();
            for (slot, s) in seqs.iter().enumerate() {
                if fed[slot] < s.len() && rng.random_bool(0.8) {
                    let n = rng.random_range(1..=4).min(s.len() - fed[slot]);
                    inputs.push((slot, &s[fed[slot]..fed[slot] + n]));
                }
            }
            if inputs.is_empty() {
                continue;
            }
            let logits = dec.extend(&inputs).unwrap();
            assert_eq!(logits.dims(), &[inputs.len(), v]);
            got.extend(logits.to_vec::<f32>().unwrap());
            for &(slot, toks) in &inputs {
                fed[slot] += toks.len();
                assert_eq!(dec.cache().len(slot), fed[slot]);
                let last = fed[slot] - 1;
                want.extend(full[slot][last * v..(last + 1) * v].iter().map(|&x| x as f64));
            }
            calls += 1;
        }
        let err = rel_error(&got, &want);
        eprintln!("tied={tied}: {calls} calls, {} logit rows, rel error {err:.2e}", got.len() / v);
        assert!(err < 1e-5, "incremental logits differ from the full forward: rel error {err:.2e}");

        // A cleared slot starts a new sequence from position 0.
        dec.clear(1);
        let logits = dec.extend(&[(1, &seqs[3][..])]).unwrap().to_vec::<f32>().unwrap();
        let last = &full[3][(seqs[3].len() - 1) * v..];
        let want: Vec<f64> = last.iter().map(|&x| x as f64).collect();
        assert!(rel_error(&logits, &want) < 1e-5);
    }
}

/// Greedy decoding by a full forward per new token.
fn greedy_by_full_forward(m: &Llama, p: &Params, prompt: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
    let v = m.config.vocab_size;
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new {
        let logits = full_logits(m, p, &ids);
        let last = Tensor::from_vec(logits[(ids.len() - 1) * v..].to_vec(), [1, v], &Device::Cpu).unwrap();
        let t = argmax_rows(&last).unwrap()[0];
        out.push(t);
        ids.push(t);
        if stop.contains(&t) {
            break;
        }
    }
    out
}

#[test]
fn batched_greedy_equals_greedy_by_full_forwards() {
    let mut rng = StdRng::seed_from_u64(11);
    let (m, p) = model(false, &mut rng);
    let v = m.config.vocab_size;
    let prompts: Vec<Vec<u32>> = [6, 1, 11, 3].iter().map(|&n| random_ids(&mut rng, n, v)).collect();
    let max_new = 9;
    let plain: Vec<Vec<u32>> = prompts.iter().map(|q| greedy_by_full_forward(&m, &p, q, max_new, &[])).collect();
    let cfg = GreedyConfig { max_new_tokens: max_new, stop_tokens: vec![] };
    let got = greedy(&m, &p, &prompts, &cfg).unwrap();
    for (g, want) in got.iter().zip(&plain) {
        assert_eq!(&g.tokens, want);
        assert!(!g.stopped);
    }
    // Stop on the token the first prompt produces third: it stops there, the others go on
    // unless they meet it too.
    let stop = plain[0][2];
    let cfg = GreedyConfig { max_new_tokens: max_new, stop_tokens: vec![stop] };
    let got = greedy(&m, &p, &prompts, &cfg).unwrap();
    for (i, (g, q)) in got.iter().zip(&prompts).enumerate() {
        let want = greedy_by_full_forward(&m, &p, q, max_new, &[stop]);
        assert_eq!(g.tokens, want, "prompt {i}");
        assert_eq!(g.stopped, want.last() == Some(&stop), "prompt {i}");
    }
    assert!(got[0].stopped && got[0].tokens.len() <= 3);
    // No new tokens asked: nothing runs.
    let none = greedy(&m, &p, &prompts, &GreedyConfig { max_new_tokens: 0, stop_tokens: vec![] }).unwrap();
    assert!(none.iter().all(|g| g.tokens.is_empty()));
}

#[test]
fn bad_calls_are_errors() {
    let mut rng = StdRng::seed_from_u64(3);
    let (m, p) = model(true, &mut rng);
    let e = Decoder::new(&m, &p, 2, 41).err().unwrap().to_string();
    assert!(e.contains("max_position_embeddings 40"), "{e}");
    let mut dec = Decoder::new(&m, &p, 2, 6).unwrap();
    let e = dec.extend(&[(0, &[1, 2][..]), (0, &[3][..])]).unwrap_err().to_string();
    assert!(e.contains("slot 0") && e.contains("twice"), "{e}");
    let e = dec.extend(&[(2, &[1][..])]).unwrap_err().to_string();
    assert!(e.contains("slot 2") && e.contains("2 slots"), "{e}");
    let e = dec.extend(&[(1, &[][..])]).unwrap_err().to_string();
    assert!(e.contains("no tokens"), "{e}");
    let e = dec.extend(&[(1, &[1, 2, 3, 4, 5, 6, 7][..])]).unwrap_err().to_string();
    assert!(e.contains("exceed the cache's 6 positions"), "{e}");
    let e = dec.extend(&[(1, &[99][..])]).unwrap_err().to_string();
    assert!(e.contains("token id 99"), "{e}");
    // A failed call stores nothing.
    assert_eq!((dec.cache().len(0), dec.cache().len(1)), (0, 0));
    let e = greedy(&m, &p, &[vec![1], vec![]], &GreedyConfig { max_new_tokens: 2, stop_tokens: vec![] })
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 1 is empty"), "{e}");
    let long = vec![vec![1; 30]];
    let e = greedy(&m, &p, &long, &GreedyConfig { max_new_tokens: 12, stop_tokens: vec![] }).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

/// The tape's mean loss of a right-padded batch of examples.
fn tape_loss(m: &Llama, p: &Params, examples: &[&Example]) -> f64 {
    let mut tape = Tape::new();
    let out = m.forward(&mut tape, p, &collate(examples, 0)).unwrap();
    tape.value(out.loss.unwrap()).to_vec::<f32>().unwrap()[0] as f64
}

#[test]
fn per_example_losses_equal_the_tapes_cross_entropy() {
    let mut rng = StdRng::seed_from_u64(5);
    let (m, p) = model(true, &mut rng);
    let v = m.config.vocab_size;
    let examples: Vec<Example> = [(9, 4), (3, 1), (14, 10), (6, 2), (11, 3)]
        .iter()
        .enumerate()
        .map(|(i, &(n, prompt_len))| Example { input_ids: random_ids(&mut rng, n, v), prompt_len, source: 10 + i })
        .collect();
    let report = eval::loss(&m, &p, &examples, 2).unwrap();
    for (e, r) in examples.iter().zip(&report.examples) {
        let want = tape_loss(&m, &p, &[e]);
        assert_eq!((r.source, r.tokens), (e.source, e.len() - e.prompt_len));
        assert!((r.loss - want).abs() < 1e-5 * want, "example {}: {} vs tape {want}", e.source, r.loss);
    }
    let all = tape_loss(&m, &p, &examples.iter().collect::<Vec<_>>());
    assert!((report.token_mean() - all).abs() < 1e-5 * all, "{} vs {all}", report.token_mean());
    assert!((report.example_mean() - report.token_mean()).abs() > 1e-4, "the two means should differ here");
    let e = eval::loss(&m, &p, &examples, 0).unwrap_err().to_string();
    assert!(e.contains("batches of 0"), "{e}");
}
