//! Training and evaluation data: prompt/response text to padded, labelled batches.
//!
//! - [`jsonl`]: records from JSONL with configurable field names (GSM8K's `question`/`answer`
//!   by default); errors name the file and line.
//! - [`mod@encode`]: a prompt template (plain or ChatML), prompt and response tokenized separately
//!   and concatenated with EOS, labels -100 on the prompt, truncation to a maximum length.
//! - [`loader`]: deterministic shuffling by seed, optional length bucketing, right-padded
//!   [`Batch`](crate::model::Batch)es, and a batch iterator that resumes from a [`Position`].
//! - [`synthetic`]: seeded GSM8K-style word problems for demos that need no downloaded data.

pub mod encode;
pub mod jsonl;
pub mod loader;
pub mod synthetic;

pub use encode::{EncodeOptions, Encoded, Example, PromptTemplate, encode};
pub use jsonl::{Fields, Record, parse_jsonl, read_jsonl, to_jsonl};
pub use loader::{Batches, Loader, LoaderConfig, Position, collate};
