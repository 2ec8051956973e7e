//! Reverse-mode automatic differentiation: a tape of ops over [`Tensor`](crate::Tensor)s.
//!
//! - [`Tape`] records each op's output and a closure that maps the output's gradient to its
//!   inputs' gradients; [`Tape::backward`] replays them in reverse.
//! - [`Params`] holds named parameters (Hugging Face / PEFT names), each frozen or trainable,
//!   with gradients that accumulate across micro-batches until [`Params::zero_grad`].
//! - A gradient hook ([`GradHook`]) sees each parameter's gradient as soon as it is final during
//!   the backward pass and may take it away (LoRA-GA adds each target weight's gradient into its
//!   own fp32 buffer, so the full set of weight gradients never lives at once).
//! - A gradient sink ([`GradSinks`], declared with [`Tape::sink`]) goes further: the linear op's
//!   backward adds `alpha * dYᵀ X` straight into a caller's fp32 buffer, so a weight's gradient
//!   is never a tensor of its own (LoRA-GA's estimation with accumulators beside the weights).
//!
//! The ops ([`ops`], [`lora_linear`], [`elementwise`], [`norm`], [`rope`], [`attention`], [`loss`]) dispatch on
//! the tensors' storage. Tensors all on the CPU run the f32 reference code (a bf16 CPU tensor is a
//! dtype error). Tensors all on one CUDA device run the kernels of
//! [`crate::cuda::ops`] in f32 or bf16 (its docs give the dtype rules; [`Tape::cast`] is how mixed
//! precision keeps f32 master weights). Tensors on different devices are an error, never a copy.
//! An op without a CUDA version yet returns [`Error::NotOnCuda`](crate::Error::NotOnCuda).

pub mod attention;
mod data;
pub mod elementwise;
pub mod lora_linear;
pub mod loss;
pub mod norm;
pub mod ops;
mod params;
pub mod rope;
mod sink;
mod tape;

#[cfg(test)]
pub(crate) mod gradcheck;
#[cfg(test)]
mod sink_tests;
#[cfg(test)]
mod tests;

pub use attention::{AttentionShape, PaddingMask};
pub(crate) use data::add_assign;
pub use loss::IGNORE_INDEX;
pub use params::{Param, Params};
pub use rope::{Positions, RopeTable};
pub use sink::GradSinks;
pub use tape::{GradHook, HookAction, LeafGrads, Tape, Var};
