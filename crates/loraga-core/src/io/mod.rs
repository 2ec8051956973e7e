//! Checkpoint I/O: GGUF files (llama.cpp's format; how the SmolLM2 test model ships) and
//! safetensors (Hugging Face checkpoints, and the adapters we write).
//!
//! - [`gguf`]: the GGUF reader; [`gguf_metadata`]: its typed key/values.
//! - [`quant`]: ggml's tensor types and their dequantisation to f32.
//! - [`rope_permute`]: undoing llama.cpp's reordering of Llama's q/k rows.
//! - [`safetensors`]: single-file and sharded safetensors.
//! - [`atomic`]: atomic file writes (checkpoints, adapters, metrics).
//! - [`adapter`]: PEFT LoRA adapter directories (written whole or not at all, read back with
//!   checks).
//!
//! Every malformed file gives an [`Error::Format`](crate::Error::Format) naming the file and the
//! key or tensor at fault.

pub mod adapter;
pub mod atomic;
pub mod gguf;
pub mod gguf_metadata;
pub mod quant;
pub mod rope_permute;
pub mod safetensors;

pub use adapter::{AdapterConfig, load_adapter, read_adapter, save_adapter};
pub use gguf::{GgufFile, GgufTensorInfo};
pub use gguf_metadata::{GgufMetadata, GgufValue};
pub use quant::GgmlType;
pub use rope_permute::{permute_qk, unpermute_qk};
pub use safetensors::{SafetensorsCheckpoint, save_safetensors};
