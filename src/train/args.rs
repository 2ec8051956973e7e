//! `loraga train`'s options. They are saved as the run's `run.json`, so that `--resume` continues
//! with exactly the options the run started with, and `loraga report` can label it.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

pub use crate::data_format::{ChatTemplate, DataFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Every weight trainable.
    Full,
    /// Vanilla LoRA: A Kaiming-uniform, B = 0 (PEFT's default).
    Lora,
    /// LoRA-GA: A and B from the SVD of the estimated full-weight gradient.
    LoraGa,
    /// PiSSA: A and B from the principal singular vectors of W.
    Pissa,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceChoice {
    /// The first CUDA GPU if one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Whose LoRA-GA formulas (see loraga_core::loraga::Variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraGaVariant {
    /// The authors' reference code (the paper): the first-step property holds.
    Reference,
    /// PEFT 0.19-0.21's variant: B carries the singular values, `stable` scales B only.
    Peft,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Base model: a GGUF file, or a Hugging Face folder (config.json, model.safetensors or its
    /// shard index, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: JSONL with a prompt and a response field per line.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub format: DataFormat,
    /// Evaluation data (JSONL, same fields). Without it, no eval loss is measured.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Evaluate on the first N examples of --eval-data.
    #[arg(long, default_value_t = 256)]
    pub eval_examples: usize,
    /// How the model is fine-tuned.
    #[arg(long, value_enum, default_value = "lora-ga")]
    pub method: Method,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha: the scaling is alpha/rank (alpha/sqrt(rank) with --rslora).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// rsLoRA scaling alpha/sqrt(rank).
    #[arg(long)]
    pub rslora: bool,
    /// Linear layers to adapt (PEFT names), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    pub targets: Vec<String>,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Decay after warmup.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: Schedule,
    /// Fraction of the steps spent warming the learning rate up linearly (rounded up).
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest example in tokens (longer ones are truncated).
    #[arg(long, default_value_t = 384)]
    pub max_len: usize,
    /// Turn length bucketing off (it is on by default). Bucketing: after each epoch's seeded
    /// shuffle, every chunk of --bucket-batches batches' worth of examples is sorted by length and
    /// cut into batches, whose order is then shuffled again, so a batch holds examples of similar
    /// length and little compute goes to padding (Hugging Face's group_by_length). Off: batches
    /// are consecutive examples of the shuffled order. (Packing several examples into one row is
    /// not offered: it needs attention masks that keep the examples apart.)
    #[arg(long)]
    #[serde(default)]
    pub no_bucketing: bool,
    /// Length bucketing's chunk, in batches: larger chunks pad less but order the data less
    /// randomly.
    #[arg(long, default_value_t = 50)]
    #[serde(default = "default_bucket_batches")]
    pub bucket_batches: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Train for this many epochs instead of --steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Seeds data order, LoRA's A and the randomized SVD.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate every N steps (and at the end); 0: only at the end.
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Checkpoint every N steps (and at the end, and on Ctrl-C); 0: only then.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Where to train.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// LoRA-GA: micro-batches of gradient estimation, taken from examples held apart from the
    /// training batches (the same examples are held apart for every method, so runs compare).
    #[arg(long, default_value_t = 32)]
    pub loraga_batches: usize,
    /// LoRA-GA: examples per estimation micro-batch.
    #[arg(long, default_value_t = 4)]
    pub loraga_batch_size: usize,
    /// LoRA-GA formulas.
    #[arg(long, value_enum, default_value = "reference")]
    pub loraga_variant: LoraGaVariant,
    /// LoRA-GA `stable` scale's gamma.
    #[arg(long, default_value_t = 16.0)]
    pub loraga_gamma: f32,
    /// The run's name in reports (default: the output folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Output folder: run.json, metrics.jsonl, checkpoint/, adapter/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint, with the options it started with.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Write the run's micro-batches (the 0-based record numbers of --data in each, and their
    /// token counts) as JSON to FILE and exit without training: the same batches for another
    /// trainer (scripts/baselines/peft_train.py --batch-plan).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub write_batch_plan: Option<PathBuf>,
    /// Stop (checkpointed, as Ctrl-C does) after this many steps: for testing --resume.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<u64>,
}

fn default_bucket_batches() -> usize {
    50
}

impl TrainArgs {
    /// The loader's length-bucketing chunk in batches (None: no bucketing).
    pub fn bucketing(&self) -> Option<usize> {
        if self.no_bucketing { None } else { Some(self.bucket_batches) }
    }

    /// Every option at its command-line default; model, data and out are "-" (set them).
    pub fn defaults() -> TrainArgs {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: TrainArgs,
        }
        <Wrapper as clap::Parser>::parse_from(["train", "--model", "-", "--data", "-", "--out", "-"]).args
    }
}
