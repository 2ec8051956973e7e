//! Text ↔ token ids, through Hugging Face's `tokenizers` crate, built either from a
//! `tokenizer.json` or from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! GGUF (`tokenizer.ggml.model = "gpt2"`) holds a byte-level BPE: the token strings (id = index),
//! the merges ("Ġ t", in priority order) and a type per token (1 normal, 3 control, 4
//! user-defined). We rebuild it as the Hugging Face tokenizer that was converted into it:
//! BPE over byte-level pre-tokenization (the GPT-2 split regex, no prefix space), with control
//! tokens registered as special tokens (so `<|im_start|>` in text is one id) and user-defined
//! ones as added tokens. `tokenizer.ggml.pre = "smollm"` (llama.cpp's name for SmolLM's
//! tokenizer) also splits every digit on its own, as SmolLM's `tokenizer.json` does.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};
use crate::io::GgufFile;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Pre-tokenizer names (`tokenizer.ggml.pre`) whose split is GPT-2's regex, optionally with
/// digits split one by one first.
const GPT2_LIKE: &[&str] = &["default", "gpt2"];
const DIGITS_THEN_GPT2: &[&str] = &["smollm"];

pub struct Tokenizer {
    inner: HfTokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether encoding starts with BOS (`tokenizer.ggml.add_bos_token`; false for tokenizer.json
    /// files here, whose post-processor decides).
    add_bos: bool,
}

impl Tokenizer {
    /// A Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let inner = HfTokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("not a readable tokenizer.json: {e}")))?;
        Ok(Tokenizer { inner, bos: None, eos: None, add_bos: false })
    }

    /// The byte-level BPE described by a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let m = file.metadata();
        let bad = |msg: String| Error::format(file.path(), msg);
        let model = m.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model is '{model}'; loraga reads byte-level BPE ('gpt2') tokenizers"
            )));
        }
        let pre = if m.get("tokenizer.ggml.pre").is_some() { m.get_str("tokenizer.ggml.pre")? } else { "default" };
        let split_digits = if DIGITS_THEN_GPT2.contains(&pre) {
            true
        } else if GPT2_LIKE.contains(&pre) {
            false
        } else {
            return Err(bad(format!(
                "tokenizer.ggml.pre '{pre}' is not a pre-tokenizer loraga knows (it knows {:?})",
                [GPT2_LIKE, DIGITS_THEN_GPT2].concat()
            )));
        };
        let tokens = m.get_str_array("tokenizer.ggml.tokens")?;
        let types = m.get_i64_array("tokenizer.ggml.token_type")?;
        if types.len() != tokens.len() {
            return Err(bad(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let mut merges = Vec::new();
        for (i, mg) in m.get_str_array("tokenizer.ggml.merges")?.into_iter().enumerate() {
            let (a, b) = mg
                .split_once(' ')
                .ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] = '{mg}' is not two tokens")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        if vocab.len() != tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.tokens has duplicates ({} distinct of {})",
                vocab.len(),
                tokens.len()
            )));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("cannot build the BPE model: {e}")))?;
        let mut inner = HfTokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = if split_digits {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, t)| **t == ty)
                .map(|(s, _)| AddedToken::from(s.to_string(), special))
                .collect()
        };
        let register = |e: tokenizers::Error| bad(format!("cannot register the added tokens: {e}"));
        inner.add_special_tokens(added(TOKEN_CONTROL, true)).map_err(register)?;
        inner.add_tokens(added(TOKEN_USER_DEFINED, false)).map_err(register)?;
        let id = |key: &str| -> Result<Option<u32>> {
            if m.get(key).is_some() { Ok(Some(m.get_u32(key)?)) } else { Ok(None) }
        };
        let add_bos = if m.get("tokenizer.ggml.add_bos_token").is_some() {
            m.get_bool("tokenizer.ggml.add_bos_token")?
        } else {
            false
        };
        Ok(Tokenizer {
            inner,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos,
        })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer: cannot encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer: cannot decode {} ids: {e}", ids.len())))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-sequence id (GGUF `tokenizer.ggml.eos_token_id`; None from tokenizer.json).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The underlying Hugging Face tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }
}
