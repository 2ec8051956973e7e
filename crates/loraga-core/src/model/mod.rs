//! Models built on the autograd tape.
//!
//! - [`llama`]: `LlamaForCausalLM` (config, forward with logits and loss, LoRA on its linears).
//! - [`llama_load`]: its weights from Hugging Face safetensors + `config.json`, or from GGUF.
//! - [`generate`]: batched greedy decoding with a KV cache ([`kv_cache`]).

pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod llama_load;

pub use llama::{Batch, Llama, LlamaConfig, LlamaOutput};
