//! Llama as Hugging Face's `LlamaForCausalLM` computes it (eager attention, default RoPE):
//!
//!   h = embed(ids)
//!   per layer:  h += o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rmsnorm(h)
//!               h += down_proj(silu(gate_proj(n)) * up_proj(n)),                n = rmsnorm(h)
//!   logits = rmsnorm(h) head^T,   head = lm_head.weight or embed_tokens.weight (tied)
//!
//! Weights live in [`Params`] under their Hugging Face names; LoRA A/B under PEFT's (see
//! [`crate::lora`]). Positions are 0..seq in every row, as transformers' default `position_ids`
//! (right padding keeps real tokens at their true positions).

use std::sync::Arc;

use crate::autograd::{AttentionShape, IGNORE_INDEX, PaddingMask, Params, Positions, RopeTable, Tape, Var};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::lora::{self, LoraConfig, LoraTarget};
use crate::lora_linear::LoraPath;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// Longest sequence the RoPE table covers.
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("Llama config: {m}")));
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} is 0"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "{} heads do not share {} key/value heads evenly",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd; RoPE needs pairs", self.head_dim));
        }
        Ok(())
    }

    /// Every base weight's Hugging Face name and shape.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }
}

/// A batch of `batch` sequences of `seq` tokens each, row-major.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    /// `attention_mask`: false for padding. None: no padding.
    pub attention_mask: Option<Vec<bool>>,
    /// Hugging Face `labels` (unshifted; -100 ignored). None: no loss.
    pub labels: Option<Vec<i64>>,
}

impl Batch {
    fn check(&self) -> Result<()> {
        let n = self.batch * self.seq;
        let bad = |what: &str, len: usize| {
            Err(Error::shape(
                "Llama::forward",
                format!("{what} has {len} entries for {} x {} tokens", self.batch, self.seq),
            ))
        };
        if n == 0 || self.input_ids.len() != n {
            return bad("input_ids", self.input_ids.len());
        }
        if let Some(m) = &self.attention_mask
            && m.len() != n
        {
            return bad("attention_mask", m.len());
        }
        if let Some(l) = &self.labels
            && l.len() != n
        {
            return bad("labels", l.len());
        }
        Ok(())
    }

    /// The next-token targets: labels shifted left by one within each row, -100 at each row's end
    /// (transformers' `ForCausalLMLoss`).
    pub fn shifted_targets(&self) -> Option<Vec<i64>> {
        let labels = self.labels.as_ref()?;
        let mut t = vec![IGNORE_INDEX; labels.len()];
        for b in 0..self.batch {
            for i in 0..self.seq - 1 {
                t[b * self.seq + i] = labels[b * self.seq + i + 1];
            }
        }
        Some(t)
    }
}

pub struct LlamaOutput {
    /// [batch * seq, vocab]
    pub logits: Var,
    /// The mean next-token cross-entropy, when the batch has labels.
    pub loss: Option<Var>,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub lora: Option<LoraConfig>,
    /// The dtype activations are computed in: f32 on the CPU, bf16 or f32 on CUDA. Weights
    /// stored in another dtype are cast on the tape.
    pub dtype: DType,
    /// How LoRA layers run ([`Tape::lora_linear`]): `Fused` by default, which on CUDA runs on
    /// cuBLAS the products the fused kernels do not take; tests set `Cublas` to compare.
    pub lora_path: LoraPath,
    rope: Arc<RopeTable>,
}

impl Llama {
    pub fn new(config: LlamaConfig) -> Result<Llama> {
        config.validate()?;
        let rope = Arc::new(RopeTable::new(config.head_dim, config.max_position_embeddings, config.rope_theta)?);
        Ok(Llama { config, lora: None, dtype: DType::F32, lora_path: LoraPath::Fused, rope })
    }

    /// Checks that `params` holds every base weight with its shape.
    pub fn check_params(&self, params: &Params) -> Result<()> {
        for (name, shape) in self.config.weight_shapes() {
            let t = params.get(&name)?;
            if t.dims() != shape.as_slice() {
                return Err(Error::layer(
                    "Llama",
                    &name,
                    format!("has shape {:?}, the config implies {shape:?}", t.dims()),
                ));
            }
        }
        Ok(())
    }

    /// Adds LoRA adapters (PEFT's default initialisation) and uses them from now on.
    pub fn add_lora(&mut self, params: &mut Params, cfg: LoraConfig, rng: &mut impl rand::Rng) -> Result<()> {
        lora::add_lora(params, self.config.num_hidden_layers, &cfg, rng)?;
        self.lora = Some(cfg);
        Ok(())
    }

    fn linear(&self, tape: &mut Tape, params: &Params, x: Var, layer: usize, t: LoraTarget) -> Result<Var> {
        lora::linear(tape, params, x, &t.module_path(layer), self.lora.as_ref().map(|c| (c, t)), self.lora_path)
    }

    /// Records the forward pass on `tape`: logits, and the loss when the batch has labels.
    pub fn forward(&self, tape: &mut Tape, params: &Params, batch: &Batch) -> Result<LlamaOutput> {
        batch.check()?;
        let c = &self.config;
        if batch.seq > c.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "sequence of {} tokens is longer than max_position_embeddings {}",
                batch.seq, c.max_position_embeddings
            )));
        }
        // Positions and the padding mask are uploaded once here, not once per layer.
        let device = params.get("model.embed_tokens.weight")?.device();
        let positions: Vec<u32> = (0..batch.batch).flat_map(|_| 0..batch.seq as u32).collect();
        let positions = Positions::new(positions, &device)?;
        let mask = PaddingMask::new(batch.attention_mask.as_deref(), batch.batch * batch.seq, &device)?;
        let shape = AttentionShape {
            batch: batch.batch,
            seq: batch.seq,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };

        let dt = self.dtype;
        let embed = tape.param_as(params, "model.embed_tokens.weight", dt)?;
        let mut h = tape.embedding(&batch.input_ids, embed)?;
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let norm_w = tape.param_as(params, &format!("{p}.input_layernorm.weight"), dt)?;
            let n = tape.rms_norm(h, norm_w, c.rms_norm_eps)?;
            let q = self.linear(tape, params, n, l, LoraTarget::Q)?;
            let k = self.linear(tape, params, n, l, LoraTarget::K)?;
            let v = self.linear(tape, params, n, l, LoraTarget::V)?;
            let q = tape.rope_at(q, &self.rope, &positions)?;
            let k = tape.rope_at(k, &self.rope, &positions)?;
            let a = tape.attention_masked(q, k, v, shape, &mask)?;
            let o = self.linear(tape, params, a, l, LoraTarget::O)?;
            h = tape.add(h, o)?;

            let norm_w = tape.param_as(params, &format!("{p}.post_attention_layernorm.weight"), dt)?;
            let n = tape.rms_norm(h, norm_w, c.rms_norm_eps)?;
            let gate = self.linear(tape, params, n, l, LoraTarget::Gate)?;
            let up = self.linear(tape, params, n, l, LoraTarget::Up)?;
            let act = tape.swiglu(gate, up)?;
            let down = self.linear(tape, params, act, l, LoraTarget::Down)?;
            h = tape.add(h, down)?;
        }
        let norm_w = tape.param_as(params, "model.norm.weight", dt)?;
        let n = tape.rms_norm(h, norm_w, c.rms_norm_eps)?;
        let head = if c.tie_word_embeddings { embed } else { tape.param_as(params, "lm_head.weight", dt)? };
        let logits = tape.linear(n, head)?;
        let loss = match batch.shifted_targets() {
            Some(t) => Some(tape.cross_entropy(logits, &t)?),
            None => None,
        };
        Ok(LlamaOutput { logits, loss })
    }
}
