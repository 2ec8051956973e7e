//! Greedy decoding with a KV cache, batched, without a tape to backpropagate through.
//!
//! [`Decoder::extend`] runs new tokens through the model after what the cache already holds and
//! returns the logits after each sequence's last new token:
//!
//!   for each layer: n = rmsnorm(h); q, k, v = rope(q_proj(n)), rope(k_proj(n)), v_proj(n)
//!                   K, V of the slot += k, v;  h += o_proj(attn(q, K, V));  h += mlp(rmsnorm(h))
//!
//! the same as [`Llama::forward`] token for token (LoRA adapters included, through
//! [`lora::linear`]), but each layer attends to the cached keys and values instead of
//! recomputing them.
//!
//! Batching: the new tokens of all sequences are packed into one [tokens, hidden] matrix, each
//! token with its own slot and true position (0 at each sequence's first token). So prompts of
//! different lengths need neither padding nor a mask, RoPE sees the same positions as an unpadded
//! forward of each sequence alone, and a finished sequence simply stops taking part. (The other
//! usual choice, left padding with shifted position ids and a key mask, wastes compute on the
//! padding and needs the mask in every step.)
//!
//! The linear layers, norms, RoPE and the MLP are the tape's ops, each layer on a throwaway tape
//! (so only one layer's activations live at a time), on whatever device the parameters are and
//! in the model's activation dtype, as in the forward. Attention against the cache is
//! [`KvCache::attend`]: on a CUDA model the cache and its attention live on the device, so a
//! decoding step moves only the token ids and cache rows up and the chosen tokens down
//! ([`argmax_rows`] runs on the device too); the positions and cache rows are uploaded once per
//! step and shared by every layer.

use std::sync::Arc;

use super::kv_cache::{KvCache, Step, TokenAt};
use super::llama::Llama;
use crate::autograd::{Params, Positions, RopeTable, Tape, Var};
use crate::error::{Error, Result};
use crate::lora::{self, LoraTarget};
use crate::storage::Storage;
use crate::tensor::Tensor;

pub struct Decoder<'m> {
    model: &'m Llama,
    params: &'m Params,
    rope: Arc<RopeTable>,
    cache: KvCache,
}

impl<'m> Decoder<'m> {
    /// A decoder with room for `slots` sequences of up to `capacity` tokens each.
    pub fn new(model: &'m Llama, params: &'m Params, slots: usize, capacity: usize) -> Result<Decoder<'m>> {
        let c = &model.config;
        model.check_params(params)?;
        if capacity > c.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "decoder: {capacity} positions are more than the model's max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        let device = params.get("model.embed_tokens.weight")?.device();
        let cache = KvCache::new(
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            slots,
            capacity,
            &device,
            model.dtype,
        )?;
        let rope = Arc::new(RopeTable::new(c.head_dim, capacity, c.rope_theta)?);
        Ok(Decoder { model, params, rope, cache })
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Empties slot `slot` for a new sequence.
    pub fn clear(&mut self, slot: usize) {
        self.cache.clear(slot)
    }

    /// Appends `tokens` to slot `slot`, for each (slot, tokens) of `inputs` (each slot at most
    /// once, at least one token each), and returns the logits after each input's last token,
    /// [inputs.len(), vocab], in the order of `inputs`.
    pub fn extend(&mut self, inputs: &[(usize, &[u32])]) -> Result<Tensor> {
        let c = &self.model.config;
        let mut at = Vec::new();
        let mut ids = Vec::new();
        let mut last = Vec::with_capacity(inputs.len());
        let mut seen = vec![false; self.cache.slots()];
        for &(slot, toks) in inputs {
            let bad = |m: String| Err(Error::InvalidArgument(format!("decoder: slot {slot}: {m}")));
            if slot >= seen.len() {
                return bad(format!("there are {} slots", seen.len()));
            }
            if std::mem::replace(&mut seen[slot], true) {
                return bad("given twice in one call".into());
            }
            if toks.is_empty() {
                return bad("no tokens".into());
            }
            let start = self.cache.len(slot);
            if start + toks.len() > self.cache.capacity() {
                return bad(format!(
                    "{start} cached + {} new tokens exceed the cache's {} positions",
                    toks.len(),
                    self.cache.capacity()
                ));
            }
            at.extend((start..start + toks.len()).map(|pos| TokenAt { slot, pos }));
            ids.extend_from_slice(toks);
            last.push(ids.len() - 1);
        }
        if inputs.is_empty() {
            return Err(Error::InvalidArgument("decoder: no inputs".into()));
        }
        // Uploaded once for every layer.
        let step = self.cache.step(&at)?;
        let device = self.params.get("model.embed_tokens.weight")?.device();
        let positions = Positions::new(at.iter().map(|a| a.pos as u32).collect(), &device)?;

        let dt = self.model.dtype;
        let mut tape = Tape::new();
        let embed = tape.param_as(self.params, "model.embed_tokens.weight", dt)?;
        let x = tape.embedding(&ids, embed)?;
        let mut h = tape.into_value(x)?;
        for l in 0..c.num_hidden_layers {
            h = self.layer(l, h, &step, &positions)?;
        }
        // Only the last token of each input needs logits; the norm is per row, so gather those
        // rows first (the embedding lookup is a row gather, on h's device).
        let mut tape = Tape::new();
        let hv = tape.constant(h);
        let rows: Vec<u32> = last.iter().map(|&r| r as u32).collect();
        let x = tape.embedding(&rows, hv)?;
        let w = tape.param_as(self.params, "model.norm.weight", dt)?;
        let n = tape.rms_norm(x, w, c.rms_norm_eps)?;
        let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let head = tape.param_as(self.params, head, dt)?;
        let logits = tape.linear(n, head)?;
        let logits = tape.into_value(logits)?;
        for &(slot, toks) in inputs {
            self.cache.advance(slot, toks.len());
        }
        Ok(logits)
    }

    /// One decoder layer on the packed tokens `h` [tokens, hidden].
    fn layer(&mut self, l: usize, h: Tensor, step: &Step, positions: &Positions) -> Result<Tensor> {
        let c = &self.model.config;
        let p = format!("model.layers.{l}");
        let mut tape = Tape::new();
        let h = tape.constant(h);
        let w = tape.param_as(self.params, &format!("{p}.input_layernorm.weight"), self.model.dtype)?;
        let n = tape.rms_norm(h, w, c.rms_norm_eps)?;
        let q = self.linear(&mut tape, n, l, LoraTarget::Q)?;
        let k = self.linear(&mut tape, n, l, LoraTarget::K)?;
        let v = self.linear(&mut tape, n, l, LoraTarget::V)?;
        let q = tape.rope_at(q, &self.rope, positions)?;
        let k = tape.rope_at(k, &self.rope, positions)?;
        let a = self.cache.attend(l, tape.value(q), tape.value(k), tape.value(v), step)?;
        let a = tape.constant(a);
        let o = self.linear(&mut tape, a, l, LoraTarget::O)?;
        let h = tape.add(h, o)?;

        let w = tape.param_as(self.params, &format!("{p}.post_attention_layernorm.weight"), self.model.dtype)?;
        let n = tape.rms_norm(h, w, c.rms_norm_eps)?;
        let gate = self.linear(&mut tape, n, l, LoraTarget::Gate)?;
        let up = self.linear(&mut tape, n, l, LoraTarget::Up)?;
        let act = tape.swiglu(gate, up)?;
        let down = self.linear(&mut tape, act, l, LoraTarget::Down)?;
        let h = tape.add(h, down)?;
        tape.into_value(h)
    }

    fn linear(&self, tape: &mut Tape, x: Var, layer: usize, t: LoraTarget) -> Result<Var> {
        lora::linear(
            tape,
            self.params,
            x,
            &t.module_path(layer),
            self.model.lora.as_ref().map(|c| (c, t)),
            self.model.lora_path,
        )
    }
}

/// When greedy decoding stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreedyConfig {
    /// At most this many new tokens per sequence.
    pub max_new_tokens: usize,
    /// A sequence stops after producing one of these (which is kept in its output).
    pub stop_tokens: Vec<u32>,
}

/// One sequence's new tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Whether it ended on a stop token or by `until` (not by `max_new_tokens`).
    pub stopped: bool,
}

/// Greedy continuations of every prompt, decoded together.
pub fn greedy(model: &Llama, params: &Params, prompts: &[Vec<u32>], cfg: &GreedyConfig) -> Result<Vec<Generation>> {
    greedy_until(model, params, prompts, cfg, |_, _| false)
}

/// The same, also stopping sequence i as soon as `until(i, its new tokens)` is true (e.g. once
/// the text holds a complete answer).
pub fn greedy_until(
    model: &Llama,
    params: &Params,
    prompts: &[Vec<u32>],
    cfg: &GreedyConfig,
    mut until: impl FnMut(usize, &[u32]) -> bool,
) -> Result<Vec<Generation>> {
    let mut out = vec![Generation::default(); prompts.len()];
    if prompts.is_empty() || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::InvalidArgument(format!("greedy decoding: prompt {i} is empty")));
    }
    // The last new token is never fed back, so it needs no cache position.
    let capacity = prompts.iter().map(Vec::len).max().unwrap_or(0) + cfg.max_new_tokens - 1;
    let mut dec = Decoder::new(model, params, prompts.len(), capacity)?;
    let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, p)| (i, p.as_slice())).collect();
    let mut logits = dec.extend(&inputs)?;
    let mut rows: Vec<usize> = (0..prompts.len()).collect();
    loop {
        let next = argmax_rows(&logits)?;
        let mut feed = Vec::with_capacity(rows.len());
        for (&slot, tok) in rows.iter().zip(next) {
            let g = &mut out[slot];
            g.tokens.push(tok);
            if cfg.stop_tokens.contains(&tok) || until(slot, &g.tokens) {
                g.stopped = true;
            } else if g.tokens.len() < cfg.max_new_tokens {
                feed.push((slot, [tok]));
            }
        }
        if feed.is_empty() {
            return Ok(out);
        }
        rows = feed.iter().map(|f| f.0).collect();
        let inputs: Vec<(usize, &[u32])> = feed.iter().map(|(s, t)| (*s, t.as_slice())).collect();
        logits = dec.extend(&inputs)?;
    }
}

/// The index of each row's largest logit (the first, on ties, as `torch.argmax`). A non-finite
/// logit is an error: greedy decoding on it would be meaningless. Logits on a CUDA device are
/// reduced there ([`crate::cuda::decode::argmax_rows`]): only the indices come down.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let (rows, vocab) = logits.shape().dims2("argmax", "logits")?;
    if let Storage::Cuda(s) = logits.storage() {
        return crate::cuda::decode::argmax_rows(s, rows, vocab);
    }
    let v = logits.to_f32_vec()?;
    (0..rows)
        .map(|r| {
            let row = &v[r * vocab..(r + 1) * vocab];
            if let Some(j) = row.iter().position(|x| !x.is_finite()) {
                return Err(Error::InvalidArgument(format!("argmax: logit {j} of row {r} is {}", row[j])));
            }
            let mut best = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = j;
                }
            }
            Ok(best as u32)
        })
        .collect()
}
