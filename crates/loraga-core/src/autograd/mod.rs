//! Reverse-mode automatic differentiation: a tape of ops over [`Tensor`](crate::Tensor)s.
//!
//! - [`Tape`] records each op's output and a closure that maps the output's gradient to its
//!   inputs' gradients; [`Tape::backward`] replays them in reverse.
//! - [`Params`] holds named parameters (Hugging Face / PEFT names), each frozen or trainable,
//!   with gradients that accumulate across micro-batches until [`Params::zero_grad`].
//! - A gradient hook ([`GradHook`]) sees each parameter's gradient as soon as it is final during
//!   the backward pass and may take it away (LoRA-GA adds each target weight's gradient into its
//!   own fp32 buffer, so the full set of weight gradients never lives at once).
//!
//! The ops ([`ops`], [`norm`], [`rope`], [`attention`], [`loss`]) dispatch on the tensors'
//! storage. Only the CPU (f32) is implemented here; a CUDA tensor gets
//! [`Error::NotOnCuda`](crate::Error::NotOnCuda) naming the op, and a bf16 CPU tensor a dtype
//! error. The CUDA versions will be added behind the same tape methods.

pub mod attention;
mod data;
pub mod loss;
pub mod norm;
pub mod ops;
mod params;
pub mod rope;
mod tape;

#[cfg(test)]
pub(crate) mod gradcheck;
#[cfg(test)]
mod tests;

pub use attention::AttentionShape;
pub(crate) use data::add_assign;
pub use loss::IGNORE_INDEX;
pub use params::{Param, Params};
pub use rope::RopeTable;
pub use tape::{GradHook, HookAction, LeafGrads, Tape, Var};
