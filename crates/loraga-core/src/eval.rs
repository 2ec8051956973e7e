//! Evaluation: the loss of a model on a data set, and GSM8K exact match by greedy generation.
//!
//! Loss: for each example, the mean next-token cross-entropy over its target tokens (response +
//! EOS). Over a set there are two means, and both are reported:
//!
//!   token-weighted  = sum_e sum_t nll(e, t) / sum_e T_e   (what a batch's loss is, and what
//!                                                         perplexity = exp(it) is usually of)
//!   per-example     = (1/E) sum_e (sum_t nll(e, t) / T_e)
//!
//! GSM8K: the reference answer is the number after `####`; a generated answer's is the first
//! number after `####` when the text has one, else the last number in the text. Numbers are read
//! with `$` and thousands commas stripped and compared as values (`18`, `18.00` and `$18` match).

use crate::autograd::loss::row_losses;
use crate::autograd::{IGNORE_INDEX, Params, Tape};
use crate::data::{EncodeOptions, Example, Record, collate};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::model::generate::{GreedyConfig, greedy_until};
use crate::tokenizer::Tokenizer;

/// One example's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExampleLoss {
    /// The example's record index ([`Example::source`]).
    pub source: usize,
    /// Mean cross-entropy over its target tokens (nats).
    pub loss: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct LossReport {
    /// In the order of the examples given.
    pub examples: Vec<ExampleLoss>,
}

impl LossReport {
    /// Total negative log-likelihood over total target tokens.
    pub fn token_mean(&self) -> f64 {
        let nll: f64 = self.examples.iter().map(|e| e.loss * e.tokens as f64).sum();
        nll / self.examples.iter().map(|e| e.tokens).sum::<usize>() as f64
    }

    /// The mean of the examples' own mean losses.
    pub fn example_mean(&self) -> f64 {
        self.examples.iter().map(|e| e.loss).sum::<f64>() / self.examples.len() as f64
    }

    /// exp(token-weighted mean loss).
    pub fn perplexity(&self) -> f64 {
        self.token_mean().exp()
    }
}

/// The loss of every example, computed in right-padded batches of up to `batch_size` examples
/// of similar length (the model's full forward; padding changes nothing but the work).
pub fn loss(model: &Llama, params: &Params, examples: &[Example], batch_size: usize) -> Result<LossReport> {
    if examples.is_empty() || batch_size == 0 {
        return Err(Error::InvalidArgument(format!(
            "loss evaluation: {} examples in batches of {batch_size}",
            examples.len()
        )));
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut out: Vec<Option<ExampleLoss>> = vec![None; examples.len()];
    for chunk in order.chunks(batch_size) {
        let members: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        if let Some(e) = members.iter().find(|e| e.target_count() == 0) {
            return Err(Error::InvalidArgument(format!("loss evaluation: example {} has no target tokens", e.source)));
        }
        // Any id pads: the mask and the labels leave padding out.
        let mut batch = collate(&members, 0);
        let labels = batch.labels.take().expect("collate writes labels");
        let mut tape = Tape::new();
        let logits = model.forward(&mut tape, params, &batch)?.logits;
        // Row b·seq + t predicts token t + 1 of example b.
        let seq = batch.seq;
        let targets: Vec<i64> =
            (0..chunk.len() * seq).map(|r| if r % seq + 1 < seq { labels[r + 1] } else { IGNORE_INDEX }).collect();
        let rows = row_losses(tape.value(logits), &targets)?;
        for (b, (&i, e)) in chunk.iter().zip(&members).enumerate() {
            let nll: f64 = rows[b * seq..(b + 1) * seq].iter().sum();
            let tokens = e.target_count();
            out[i] = Some(ExampleLoss { source: e.source, loss: nll / tokens as f64, tokens });
        }
    }
    Ok(LossReport { examples: out.into_iter().map(|e| e.expect("every example is in one batch")).collect() })
}

/// Every number in `text`, in order: digits with optional thousands commas and decimals, `$`
/// ignored, a leading `-` read as a sign only where it cannot be a minus (`16-3` is 16 and 3).
pub fn numbers(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == ',' || chars[i] == '.') {
            i += 1;
        }
        let raw: String = chars[start..i].iter().filter(|&&c| c != ',').collect();
        // A sentence-ending period or a trailing comma is not part of the number.
        let raw = raw.trim_end_matches('.');
        let negative = start > 0
            && chars[start - 1] == '-'
            && (start == 1 || chars[start - 2].is_whitespace() || "$(=:".contains(chars[start - 2]));
        if let Ok(x) = raw.parse::<f64>() {
            out.push(if negative { -x } else { x });
        }
    }
    out
}

/// The number after `####` (GSM8K's reference answers end so).
pub fn reference_answer(answer: &str) -> Option<f64> {
    let (_, tail) = answer.split_once("####")?;
    numbers(tail).first().copied()
}

/// The answer a generated text gives: the first number after `####`, else the last number.
pub fn predicted_answer(text: &str) -> Option<f64> {
    match text.split_once("####") {
        Some((_, tail)) => numbers(tail).first().copied(),
        None => numbers(text).last().copied(),
    }
}

fn same_number(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// One GSM8K problem's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Gsm8kItem {
    pub generated: String,
    pub predicted: Option<f64>,
    pub reference: f64,
    pub correct: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Gsm8kReport {
    /// In the order of the records given.
    pub items: Vec<Gsm8kItem>,
}

impl Gsm8kReport {
    pub fn correct(&self) -> usize {
        self.items.iter().filter(|i| i.correct).count()
    }

    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / self.items.len() as f64
    }
}

/// GSM8K exact match: greedy answers to each record's prompt (rendered as in training by
/// `opts`), `batch_size` problems decoded together. A sequence stops at a stop token, at
/// `cfg.max_new_tokens`, or at the end of the line that follows a `####`.
pub fn gsm8k_exact_match(
    model: &Llama,
    params: &Params,
    tok: &Tokenizer,
    records: &[Record],
    opts: &EncodeOptions,
    cfg: &GreedyConfig,
    batch_size: usize,
) -> Result<Gsm8kReport> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument("GSM8K evaluation: batch_size is 0".into()));
    }
    let references = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            reference_answer(&r.response).ok_or_else(|| {
                Error::InvalidArgument(format!("GSM8K evaluation: record {i}'s answer has no number after '####'"))
            })
        })
        .collect::<Result<Vec<f64>>>()?;
    let mut report = Gsm8kReport { items: Vec::with_capacity(records.len()) };
    for (chunk, refs) in records.chunks(batch_size).zip(references.chunks(batch_size)) {
        let prompts = chunk.iter().map(|r| opts.prompt_ids(tok, &r.prompt)).collect::<Result<Vec<_>>>()?;
        let done = |_: usize, toks: &[u32]| {
            tok.decode(toks, true).is_ok_and(|t| t.split_once("####").is_some_and(|(_, tail)| tail.contains('\n')))
        };
        let gens = greedy_until(model, params, &prompts, cfg, done)?;
        for (g, &reference) in gens.iter().zip(refs) {
            let generated = tok.decode(&g.tokens, true)?;
            let predicted = predicted_answer(&generated);
            let correct = predicted.is_some_and(|p| same_number(p, reference));
            report.items.push(Gsm8kItem { generated, predicted, reference, correct });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_as_gsm8k_writes_them() {
        assert_eq!(
            numbers("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs."),
            [16.0, 3.0, 4.0, 16.0, 3.0, 4.0, 9.0, 9.0]
        );
        assert_eq!(numbers("It costs $1,234.50, or -5 and (-2)."), [1234.5, -5.0, -2.0]);
        assert_eq!(numbers("no digits here"), Vec::<f64>::new());
        let gsm = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18";
        assert_eq!(reference_answer(gsm), Some(18.0));
        assert_eq!(reference_answer("#### 1,000"), Some(1000.0));
        assert_eq!(reference_answer("no marker 5"), None);
        // After '####' the first number counts, even if the text runs on.
        assert_eq!(predicted_answer("So 3 + 4 = 7.\n#### $7.00\nQuestion: Tom has 12 apples"), Some(7.0));
        // Without '####', the last number.
        assert_eq!(predicted_answer("3 + 4 = 7, so the answer is 7."), Some(7.0));
        assert_eq!(predicted_answer("I do not know."), None);
        assert!(same_number(18.0, 18.0000000001) && !same_number(18.0, 18.5));
    }

    #[test]
    fn the_two_means_differ_as_stated() {
        let r = LossReport {
            examples: vec![
                ExampleLoss { source: 0, loss: 1.0, tokens: 1 },
                ExampleLoss { source: 1, loss: 2.0, tokens: 3 },
            ],
        };
        assert!((r.token_mean() - 7.0 / 4.0).abs() < 1e-12);
        assert!((r.example_mean() - 1.5).abs() < 1e-12);
        assert!((r.perplexity() - (7.0f64 / 4.0).exp()).abs() < 1e-12);
    }
}
