//! loraga-core: tensors on the CPU and CUDA, the kernels that make LoRA-GA fine-tuning fast, and
//! the code that drives them.
//!
//! - [`Tensor`] with a [`Storage`] per backend: [`cpu`] (faer; the reference and the fallback)
//!   and [`cuda`] (hand-written kernels compiled at run time by NVRTC, cached on disk).
//! - [`gemm`]: the GEMM every op is built from, with its shape rules.
//! - [`io`]: checkpoint loading (GGUF, safetensors) and adapter saving.
//! - [`linalg`]: the randomized SVD of LoRA-GA's gradients, and the exact SVD it is tested against.
//! - [`autograd`]: the reverse-mode tape, named parameters and the per-parameter gradient hook.
//! - [`model`]: Llama (`LlamaForCausalLM`) on the tape, loaded from safetensors or GGUF.
//! - [`optim`]: AdamW (CPU and a fused kernel), gradient clipping and learning-rate schedules.
//! - [`lora`]: LoRA layers with PEFT's names and scaling.
//! - [`loraga`]: LoRA-GA: gradient estimation, initialisation (and the LoRA/PiSSA baselines).
//! - [`lora_linear`]: the LoRA linear layer's forward, backward and weight-gradient accumulation
//!   on the GEMM engine (fused), cuBLAS or the naive kernel.
//! - [`tokenizer`]: text to ids, from `tokenizer.json` or a GGUF file's metadata.
//! - [`data`]: JSONL prompt/response records to shuffled, padded, labelled batches.
//! - [`eval`]: loss and perplexity over a data set, GSM8K exact match by greedy generation.
//!
//! Nothing here needs CUDA to build; a machine without a GPU gets clear errors from the CUDA
//! entry points and a working CPU path.

pub mod autograd;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod gemm;
pub mod io;
pub mod linalg;
pub mod lora;
pub mod lora_linear;
pub mod loraga;
pub mod model;
pub mod optim;
pub mod shape;
pub mod storage;
pub mod tensor;
pub mod testing;
pub mod tokenizer;

pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use shape::Shape;
pub use storage::Storage;
pub use tensor::Tensor;
