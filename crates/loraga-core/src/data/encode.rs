//! Records to token ids, as the reference experiment builds its examples: the prompt is rendered
//! through a [`PromptTemplate`] and tokenized on its own, the response is tokenized on its own
//! and followed by EOS, and the two are concatenated. The loss covers the response tokens and
//! EOS; the prompt's labels are -100:
//!
//! ```text
//!   input_ids = tok(template(prompt)) ++ tok(response) ++ [eos]
//!   labels    = [-100] * len(tok(template(prompt))) ++ tok(response) ++ [eos]
//! ```
//!
//! Examples longer than `max_len` keep their first `max_len` tokens (counted as truncated); an
//! example whose prompt alone fills `max_len` has nothing left to learn from and is dropped
//! (counted as dropped).

use super::jsonl::Record;
use crate::autograd::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

const PLACEHOLDER: &str = "{prompt}";

/// How a prompt is written before it is tokenized: text with one `{prompt}` in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    text: String,
    /// Special tokens the template writes, which the tokenizer must know as single ids.
    special_tokens: Vec<String>,
}

impl Default for PromptTemplate {
    /// `Question: {prompt}\nAnswer: `, the GSM8K experiment's prompt.
    fn default() -> PromptTemplate {
        PromptTemplate { text: "Question: {prompt}\nAnswer: ".into(), special_tokens: vec![] }
    }
}

impl PromptTemplate {
    /// A template with exactly one `{prompt}`.
    pub fn new(text: impl Into<String>) -> Result<PromptTemplate> {
        let text = text.into();
        if text.matches(PLACEHOLDER).count() != 1 {
            return Err(Error::InvalidArgument(format!(
                "prompt template {text:?} must contain {PLACEHOLDER} exactly once"
            )));
        }
        Ok(PromptTemplate { text, special_tokens: vec![] })
    }

    /// ChatML, the chat format of SmolLM2-Instruct (and Qwen): the prompt as the user's turn, the
    /// response as the assistant's. Pair it with `<|im_end|>` as the end token (SmolLM2's EOS).
    pub fn chatml() -> PromptTemplate {
        PromptTemplate {
            text: "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".into(),
            special_tokens: vec!["<|im_start|>".into(), "<|im_end|>".into()],
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn render(&self, prompt: &str) -> String {
        self.text.replacen(PLACEHOLDER, prompt, 1)
    }

    /// An error unless the tokenizer has every special token the template writes.
    pub fn check(&self, tok: &Tokenizer) -> Result<()> {
        for t in &self.special_tokens {
            if tok.token_to_id(t).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "the chat template writes {t}, which the tokenizer does not have as a token"
                )));
            }
        }
        Ok(())
    }
}

/// How records become examples.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub template: PromptTemplate,
    /// Longest example in tokens (the GSM8K experiment uses 384).
    pub max_len: usize,
    /// Appended to every response and trained on (the tokenizer's EOS, usually).
    pub eos: u32,
}

impl EncodeOptions {
    /// The default template, `max_len`, and the tokenizer's EOS (an error if it has none).
    pub fn new(tok: &Tokenizer, max_len: usize) -> Result<EncodeOptions> {
        let eos = tok.eos_token_id().ok_or_else(|| {
            Error::InvalidArgument("the tokenizer has no EOS token; set EncodeOptions::eos explicitly".into())
        })?;
        Ok(EncodeOptions { template: PromptTemplate::default(), max_len, eos })
    }

    /// The prompt's token ids (what generation starts from).
    pub fn prompt_ids(&self, tok: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
        tok.encode(&self.template.render(prompt))
    }
}

/// One tokenized example: the prompt's ids, then the response's ids and EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// How many leading ids are the prompt (labels -100).
    pub prompt_len: usize,
    /// The record's index in the input (examples may be dropped, so this is not the position).
    pub source: usize,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Hugging Face labels (unshifted): -100 on the prompt, the ids elsewhere.
    pub fn labels(&self) -> impl Iterator<Item = i64> + '_ {
        self.input_ids.iter().enumerate().map(|(i, &id)| if i < self.prompt_len { IGNORE_INDEX } else { id as i64 })
    }

    /// How many tokens the loss covers.
    pub fn target_count(&self) -> usize {
        self.input_ids.len() - self.prompt_len
    }
}

/// The examples of a set of records, and what truncation did to them.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub examples: Vec<Example>,
    /// Examples cut to `max_len` (they keep at least one target token).
    pub truncated: usize,
    /// Records left out because their prompt alone is `max_len` tokens or more.
    pub dropped: usize,
}

/// Tokenizes every record. No examples at all (none given, or every one dropped) is an error.
pub fn encode(records: &[Record], tok: &Tokenizer, opts: &EncodeOptions) -> Result<Encoded> {
    if opts.max_len < 2 {
        return Err(Error::InvalidArgument(format!("max_len {} leaves no room for a target", opts.max_len)));
    }
    opts.template.check(tok)?;
    let mut out = Encoded { examples: Vec::with_capacity(records.len()), truncated: 0, dropped: 0 };
    for (source, r) in records.iter().enumerate() {
        let mut ids = opts.prompt_ids(tok, &r.prompt)?;
        let prompt_len = ids.len();
        if prompt_len >= opts.max_len {
            out.dropped += 1;
            continue;
        }
        ids.extend(tok.encode(&r.response)?);
        ids.push(opts.eos);
        if ids.len() > opts.max_len {
            ids.truncate(opts.max_len);
            out.truncated += 1;
        }
        out.examples.push(Example { input_ids: ids, prompt_len, source });
    }
    if out.examples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no examples: {} records given, {} dropped because their prompt alone fills max_len {}",
            records.len(),
            out.dropped,
            opts.max_len
        )));
    }
    Ok(out)
}
