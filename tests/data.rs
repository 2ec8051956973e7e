//! The data pipeline without a real model: JSONL records and their errors, encoding (prompt and
//! response tokenized apart, labels, EOS, truncation), batching (shuffling by seed, bucketing,
//! padding, resuming from a position) and the synthetic GSM8K-style problems. The tokenizer is a
//! small word-level one written here, so these tests need no downloaded file.

use std::collections::BTreeSet;

use loraga_core::data::{
    EncodeOptions, Example, Fields, Loader, LoaderConfig, Position, PromptTemplate, Record, collate, encode,
    parse_jsonl, read_jsonl, synthetic, to_jsonl,
};
use loraga_core::eval::reference_answer;
use loraga_core::tokenizer::Tokenizer;

const EOS: u32 = 0;

/// Word-level tokenizer over the words of `texts` (split as its pre-tokenizer splits), with
/// `<eos>` = 0 as a special token and `<unk>` = 1.
fn word_tokenizer(texts: &[&str], dir: &std::path::Path) -> Tokenizer {
    let mut words = BTreeSet::new();
    for t in texts {
        for w in t.split(|c: char| !c.is_alphanumeric() && c != '_').filter(|w| !w.is_empty()) {
            words.insert(w.to_string());
        }
        for w in t.split(|c: char| c.is_alphanumeric() || c == '_' || c.is_whitespace()).filter(|w| !w.is_empty()) {
            words.insert(w.to_string());
        }
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<eos>".into(), 0.into());
    vocab.insert("<unk>".into(), 1.into());
    for (i, w) in words.into_iter().enumerate() {
        vocab.insert(w, (i + 2).into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

fn records() -> Vec<Record> {
    synthetic::problems(40, 5)
}

fn options(tok: &Tokenizer, max_len: usize) -> EncodeOptions {
    let _ = tok;
    EncodeOptions { template: PromptTemplate::default(), max_len, eos: EOS }
}

#[test]
fn jsonl_reads_records_and_names_the_line_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records();
    let path = dir.path().join("train.jsonl");
    std::fs::write(&path, to_jsonl(&recs, &Fields::default()) + "\n  \n").unwrap();
    assert_eq!(read_jsonl(&path, &Fields::default()).unwrap(), recs);
    // Other field names.
    let fields = Fields { prompt: "instruction".into(), response: "output".into() };
    let text = to_jsonl(&recs[..3], &fields);
    assert!(text.starts_with("{\"instruction\":"), "{text}");
    assert_eq!(parse_jsonl(&text, &fields).unwrap(), recs[..3]);

    let err = |text: &str| {
        let p = dir.path().join("bad.jsonl");
        std::fs::write(&p, text).unwrap();
        read_jsonl(&p, &Fields::default()).unwrap_err().to_string()
    };
    let good = to_jsonl(&recs[..2], &Fields::default());
    let e = err(&format!("{good}{{\"question\": \"q\", \"answer\": \n"));
    assert!(e.contains("bad.jsonl") && e.contains("line 3: not valid JSON"), "{e}");
    let e = err(&format!("{good}\n{{\"question\": \"q\"}}\n"));
    assert!(e.contains("line 4: no field 'answer'"), "{e}");
    let e = err("{\"question\": \"q\", \"answer\": 18}\n");
    assert!(e.contains("line 1: field 'answer' is a number, expected a string"), "{e}");
    let e = err("[1, 2]\n");
    assert!(e.contains("line 1: expected a JSON object, got an array"), "{e}");
    let e = err("\n\n");
    assert!(e.contains("bad.jsonl") && e.contains("no records"), "{e}");
    let e = read_jsonl(dir.path().join("missing.jsonl"), &Fields::default()).unwrap_err().to_string();
    assert!(e.contains("missing.jsonl") && e.contains("No such file"), "{e}");
}

#[test]
fn encoding_concatenates_prompt_and_response_and_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records();
    let texts: Vec<&str> = recs.iter().flat_map(|r| [r.prompt.as_str(), r.response.as_str()]).collect();
    let tok = word_tokenizer(&[texts, vec!["Question: Answer:"]].concat(), dir.path());
    let opts = options(&tok, 1000);
    let enc = encode(&recs, &tok, &opts).unwrap();
    assert_eq!((enc.examples.len(), enc.truncated, enc.dropped), (recs.len(), 0, 0));
    for (e, r) in enc.examples.iter().zip(&recs) {
        let prompt = tok.encode(&format!("Question: {}\nAnswer: ", r.prompt)).unwrap();
        let response = tok.encode(&r.response).unwrap();
        assert_eq!(e.input_ids, [prompt.clone(), response.clone(), vec![EOS]].concat());
        assert_eq!(e.prompt_len, prompt.len());
        let labels: Vec<i64> = e.labels().collect();
        assert!(labels[..prompt.len()].iter().all(|&l| l == -100));
        assert_eq!(labels[prompt.len()..], e.input_ids[prompt.len()..].iter().map(|&i| i as i64).collect::<Vec<_>>());
        assert_eq!(e.target_count(), response.len() + 1);
        assert!(!e.input_ids.contains(&1), "a word fell outside the test vocabulary");
    }

    // A limit between the prompt lengths and the full lengths truncates some and drops some.
    let lens: Vec<(usize, usize)> = enc.examples.iter().map(|e| (e.prompt_len, e.len())).collect();
    let max_len = 30;
    let want_dropped = lens.iter().filter(|(p, _)| *p >= max_len).count();
    let want_truncated = lens.iter().filter(|(p, n)| *p < max_len && *n > max_len).count();
    assert!(want_dropped > 0 && want_truncated > 0, "pick another max_len for these lengths: {lens:?}");
    let cut = encode(&recs, &tok, &options(&tok, max_len)).unwrap();
    assert_eq!((cut.dropped, cut.truncated), (want_dropped, want_truncated));
    assert_eq!(cut.examples.len(), recs.len() - want_dropped);
    for e in &cut.examples {
        let full = &enc.examples[e.source];
        assert!(e.len() <= max_len && e.target_count() >= 1);
        assert_eq!(e.input_ids[..], full.input_ids[..e.len()]);
        assert_eq!(e.prompt_len, full.prompt_len);
    }
    let e = encode(&recs, &tok, &options(&tok, 3)).unwrap_err().to_string();
    assert!(e.contains("no examples") && e.contains("40 dropped"), "{e}");

    // Templates: exactly one {prompt}; ChatML needs its special tokens.
    assert!(PromptTemplate::new("no placeholder").is_err());
    assert!(PromptTemplate::new("{prompt} {prompt}").is_err());
    let t = PromptTemplate::new("Q: {prompt}\nA:").unwrap();
    assert_eq!(t.render("2+2?"), "Q: 2+2?\nA:");
    let chat = EncodeOptions { template: PromptTemplate::chatml(), ..opts };
    let e = encode(&recs, &tok, &chat).unwrap_err().to_string();
    assert!(e.contains("<|im_start|>"), "{e}");
    let e = EncodeOptions::new(&tok, 10).unwrap_err().to_string();
    assert!(e.contains("no EOS"), "{e}");
}

/// Examples of the given lengths (ids are the example's index), a prompt of 1.
fn examples(lens: &[usize]) -> Vec<Example> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| Example { input_ids: vec![i as u32 + 10; n], prompt_len: 1, source: i })
        .collect()
}

fn lengths(n: usize, seed: u64) -> Vec<usize> {
    // Varied lengths from the synthetic problems' character counts.
    synthetic::problems(n, seed).iter().map(|r| r.response.len() / 4 + 2).collect()
}

#[test]
fn collate_pads_on_the_right() {
    let ex = examples(&[3, 5, 1]);
    let b = collate(&ex.iter().collect::<Vec<_>>(), 7);
    assert_eq!((b.batch, b.seq), (3, 5));
    assert_eq!(b.input_ids, [10, 10, 10, 7, 7, 11, 11, 11, 11, 11, 12, 7, 7, 7, 7]);
    let mask: Vec<u8> = b.attention_mask.unwrap().iter().map(|&m| m as u8).collect();
    assert_eq!(mask, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]);
    let l = b.labels.unwrap();
    assert_eq!(l, [-100, 10, 10, -100, -100, -100, 11, 11, 11, 11, -100, -100, -100, -100, -100]);
}

#[test]
fn shuffling_is_a_seeded_permutation() {
    let ex = examples(&lengths(103, 1));
    let plan = |seed, epoch, shuffle| {
        let cfg = LoaderConfig { shuffle, ..LoaderConfig::new(8, seed, 0) };
        Loader::new(&ex, cfg).unwrap().epoch_plan(epoch)
    };
    let p = plan(3, 0, true);
    assert_eq!(p.len(), 13);
    assert!(p[..12].iter().all(|b| b.len() == 8) && p[12].len() == 7);
    let mut all: Vec<usize> = p.concat();
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());
    assert_eq!(plan(3, 0, true), p, "same seed and epoch, same order");
    assert_ne!(plan(3, 1, true), p, "another epoch, another order");
    assert_ne!(plan(4, 0, true), p, "another seed, another order");
    assert_eq!(plan(3, 0, false).concat(), (0..103).collect::<Vec<_>>());
    // The order is part of the checkpoint format (a resumed run must see the same batches on any
    // machine and build), so it is pinned: ChaCha8 with key (seed, epoch, 0, 0) as little-endian
    // u64s, u64 draws from consecutive u32 words, rejection to 0..n, Fisher-Yates from the end.
    // This order was computed by an independent Python implementation of exactly that (the RFC
    // 7539 block function at 8 rounds).
    let small = examples(&[1; 10]);
    let order = Loader::new(&small, LoaderConfig::new(10, 1234, 0)).unwrap().epoch_plan(0).concat();
    assert_eq!(order, [6, 8, 0, 1, 2, 3, 4, 9, 7, 5]);
}

#[test]
fn bucketing_groups_lengths_and_cuts_padding() {
    let lens = lengths(400, 2);
    let ex = examples(&lens);
    let padding = |plan: &[Vec<usize>]| -> usize {
        plan.iter()
            .map(|b| b.iter().map(|&i| lens[i]).max().unwrap() * b.len() - b.iter().map(|&i| lens[i]).sum::<usize>())
            .sum()
    };
    let plain = Loader::new(&ex, LoaderConfig::new(8, 9, 0)).unwrap().epoch_plan(0);
    let cfg = LoaderConfig { bucket_chunk_batches: Some(10), ..LoaderConfig::new(8, 9, 0) };
    let loader = Loader::new(&ex, cfg).unwrap();
    let bucketed = loader.epoch_plan(0);
    let mut all = bucketed.concat();
    all.sort();
    assert_eq!(all, (0..400).collect::<Vec<_>>());
    assert_eq!(bucketed.len(), 50);
    let (pp, pb) = (padding(&plain), padding(&bucketed));
    eprintln!("padding tokens: {pp} shuffled, {pb} bucketed");
    assert!(pb * 3 < pp, "bucketing should cut padding a lot: {pb} vs {pp}");
    // Each chunk of 80 shuffled examples is sorted longest first before it is cut, so within a
    // chunk the batches' length ranges do not overlap; and the batch order is shuffled after.
    let sorted_runs = bucketed.windows(2).filter(|w| lens[*w[0].last().unwrap()] >= lens[w[1][0]]).count();
    assert!(sorted_runs < 45, "batch order looks unshuffled ({sorted_runs} of 49 pairs in length order)");
    for b in &bucketed {
        assert!(b.windows(2).all(|w| lens[w[0]] >= lens[w[1]]), "batch not sorted by length");
    }
    assert_eq!(loader.epoch_plan(0), bucketed);
    assert_ne!(loader.epoch_plan(1), bucketed);
}

#[test]
fn drop_last_and_bad_configs() {
    let ex = examples(&lengths(21, 3));
    let cfg = LoaderConfig { drop_last: true, ..LoaderConfig::new(4, 1, 0) };
    let loader = Loader::new(&ex, cfg.clone()).unwrap();
    assert_eq!(loader.batches_per_epoch(), 5);
    assert!(loader.epoch_plan(0).iter().all(|b| b.len() == 4));
    let bucketed = Loader::new(&ex, LoaderConfig { bucket_chunk_batches: Some(2), ..cfg.clone() }).unwrap();
    assert!(bucketed.epoch_plan(0).iter().all(|b| b.len() == 4) && bucketed.epoch_plan(0).len() == 5);
    let e = |r: Result<Loader, loraga_core::Error>| r.err().unwrap().to_string();
    assert!(e(Loader::new(&ex[..0], cfg.clone())).contains("no examples"));
    assert!(e(Loader::new(&ex, LoaderConfig { batch_size: 0, ..cfg.clone() })).contains("batch_size is 0"));
    assert!(e(Loader::new(&ex[..3], cfg.clone())).contains("drop_last"));
    assert!(e(Loader::new(&ex, LoaderConfig { bucket_chunk_batches: Some(0), ..cfg })).contains("bucket_chunk"));
}

#[test]
fn batches_resume_from_any_position() {
    let ex = examples(&lengths(30, 4));
    let cfg = LoaderConfig { bucket_chunk_batches: Some(2), ..LoaderConfig::new(4, 17, 0) };
    let loader = Loader::new(&ex, cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 8);
    let run: Vec<(Position, Vec<u32>)> =
        loader.batches_from(Position::default()).unwrap().take(27).map(|(p, b)| (p, b.input_ids)).collect();
    assert_eq!(run[0].0, Position { epoch: 0, batch: 0 });
    assert_eq!(run[8].0, Position { epoch: 1, batch: 0 });
    assert_eq!(run[26].0, Position { epoch: 3, batch: 2 });
    // Stop after k batches, save the position, resume: the same batches follow.
    for k in [0, 1, 7, 8, 13, 16] {
        let mut it = loader.batches_from(Position::default()).unwrap();
        it.by_ref().take(k).for_each(drop);
        let saved = it.next_position();
        assert_eq!(saved, run[k].0);
        let resumed: Vec<(Position, Vec<u32>)> =
            loader.batches_from(saved).unwrap().take(27 - k).map(|(p, b)| (p, b.input_ids)).collect();
        assert_eq!(resumed, run[k..], "resumed after {k} batches");
    }
    // The end of an epoch is the start of the next.
    let at_end: Vec<_> = loader.batches_from(Position { epoch: 1, batch: 8 }).unwrap().take(1).collect();
    assert_eq!(at_end[0].0, Position { epoch: 2, batch: 0 });
    let e = loader.batches_from(Position { epoch: 0, batch: 9 }).err().unwrap().to_string();
    assert!(e.contains("batch 9 of epoch 0") && e.contains("8 batches"), "{e}");
}

/// Checks `a op b = c` in each `<<a op b=c>>` annotation.
fn annotations_hold(answer: &str) -> usize {
    let mut n = 0;
    for part in answer.split("<<").skip(1) {
        let expr = part.split(">>").next().unwrap();
        let (lhs, rhs) = expr.split_once('=').unwrap();
        let op = lhs.chars().find(|c| "+-*/".contains(*c)).unwrap();
        let (a, b) = lhs.split_once(op).unwrap();
        let (a, b, c): (i64, i64, i64) = (a.parse().unwrap(), b.parse().unwrap(), rhs.parse().unwrap());
        let want = match op {
            '+' => a + b,
            '-' => a - b,
            '*' => a * b,
            _ => {
                assert_eq!(a % b, 0, "{expr}: inexact division");
                a / b
            }
        };
        assert_eq!(c, want, "{expr}");
        assert!(c >= 0, "{expr}");
        n += 1;
    }
    n
}

#[test]
fn synthetic_problems_are_seeded_and_correct() {
    let a = synthetic::problems(300, 42);
    assert_eq!(a, synthetic::problems(300, 42));
    assert_ne!(a[..10], synthetic::problems(10, 43)[..]);
    let distinct: BTreeSet<&str> = a.iter().map(|r| r.prompt.as_str()).collect();
    assert!(distinct.len() > 290, "only {} distinct problems of 300", distinct.len());
    let kinds: BTreeSet<String> = a.iter().map(|r| r.prompt.split_whitespace().skip(1).take(2).collect()).collect();
    assert!(kinds.len() > 5, "{kinds:?}");
    for r in &a {
        assert!(r.prompt.ends_with('?'), "{}", r.prompt);
        let steps = annotations_hold(&r.response);
        assert!(steps >= 1, "{}", r.response);
        // The final answer is the last annotation's result.
        let last = r.response.rsplit(">>").next().unwrap();
        let last_value: f64 =
            last.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()).unwrap().parse().unwrap();
        let (_, tail) = r.response.rsplit_once("\n#### ").unwrap();
        assert_eq!(tail.parse::<f64>().unwrap(), last_value, "{}", r.response);
        assert_eq!(reference_answer(&r.response), Some(last_value));
    }
}
