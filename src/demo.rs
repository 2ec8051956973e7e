//! `loraga demo`: the README's main job. Fine-tunes a model briefly with vanilla LoRA and with
//! LoRA-GA on GSM8K-style problems that loraga generates itself (so nothing but the model has to
//! be downloaded), then draws both loss curves and tabulates them with `loraga report`.
//!
//! On a CPU it is sized to take a few minutes on 2 cores; with a GPU it runs a larger version.
//! `--data`/`--eval-data` point it at real JSONL data instead.

use std::path::{Path, PathBuf};

use clap::Args;
use loraga_core::Result;
use loraga_core::data::{Fields, synthetic, to_jsonl};

use crate::train::{self, DeviceChoice, Method, TrainArgs};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Base model: a GGUF file or a Hugging Face folder (scripts/demo.sh fetches SmolLM2-135M).
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Training JSONL (question/answer); default: generated problems.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation JSONL; default: generated problems disjoint from the training ones.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output folder: one run folder per method, and report.png / report.md.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Where to train.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Override the number of optimizer steps of each run.
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// How big the demo is on each kind of device.
struct Size {
    train_problems: usize,
    eval_problems: usize,
    steps: u64,
    batch_size: usize,
    eval_every: u64,
    loraga_batches: usize,
    loraga_batch_size: usize,
}

const CPU: Size = Size {
    train_problems: 400,
    eval_problems: 16,
    steps: 24,
    batch_size: 4,
    eval_every: 8,
    loraga_batches: 4,
    loraga_batch_size: 2,
};
const GPU: Size = Size {
    train_problems: 8000,
    eval_problems: 256,
    steps: 300,
    batch_size: 16,
    eval_every: 50,
    loraga_batches: 32,
    loraga_batch_size: 4,
};

fn write_problems(path: &Path, n: usize, seed: u64) -> Result<()> {
    let text = to_jsonl(&synthetic::problems(n, seed), &Fields::default());
    loraga_core::io::atomic::write(path, text.as_bytes())
}

pub fn run(a: DemoArgs) -> Result<String> {
    let device = crate::train::setup_device(a.device)?;
    let size = if device.is_cuda() { GPU } else { CPU };
    let data_dir = a.out.join("data");
    let data = match &a.data {
        Some(p) => p.clone(),
        None => {
            let p = data_dir.join("train.jsonl");
            write_problems(&p, size.train_problems, a.seed)?;
            p
        }
    };
    let eval_data = match &a.eval_data {
        Some(p) => p.clone(),
        None => {
            let p = data_dir.join("eval.jsonl");
            // Another seed: problems the training set does not hold (up to chance repeats).
            write_problems(&p, size.eval_problems, a.seed.wrapping_add(1_000_003))?;
            p
        }
    };
    let mut runs = Vec::new();
    for (method, name) in [(Method::Lora, "lora"), (Method::LoraGa, "lora-ga")] {
        let out = a.out.join(name);
        if out.join("metrics.jsonl").exists() {
            std::fs::remove_dir_all(&out).map_err(|e| loraga_core::Error::Io { path: out.clone(), source: e })?;
        }
        let args = TrainArgs {
            model: a.model.clone(),
            data: data.clone(),
            eval_data: Some(eval_data.clone()),
            eval_examples: size.eval_problems,
            method,
            steps: a.steps.unwrap_or(size.steps),
            batch_size: size.batch_size,
            eval_every: size.eval_every,
            checkpoint_every: 0,
            loraga_batches: size.loraga_batches,
            loraga_batch_size: size.loraga_batch_size,
            device: if device.is_cuda() { DeviceChoice::Cuda } else { DeviceChoice::Cpu },
            seed: a.seed,
            name: Some(name.into()),
            out: out.clone(),
            ..TrainArgs::defaults()
        };
        eprintln!("== {name}");
        train::run(args)?;
        runs.push(out);
    }
    crate::report::run(&runs, Some("lora"), 0.9, false, "LoRA vs LoRA-GA (demo)", &a.out.join("report"))
}
