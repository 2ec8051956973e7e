//! `loraga eval`: a model (optionally with a PEFT adapter) on a JSONL data set: mean answer loss
//! and perplexity, and with `--gsm8k` the exact match of greedy answers (the number after
//! `####`). Results are printed and, with `--out`, written as JSON.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use loraga_core::data::{encode, read_jsonl};
use loraga_core::model::generate::GreedyConfig;
use loraga_core::{DType, Error, Result};

use crate::train::{DataFormat, DeviceChoice, setup_device};

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Base model: a GGUF file or a Hugging Face folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder to apply (e.g. a run's adapter/, made for the original model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Replace the model's weights by a safetensors file's of the same names and shapes (e.g. a
    /// full fine-tuning run's model.safetensors); configuration and tokenizer still come from
    /// --model.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// JSONL data (GSM8K test: question/answer).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub format: DataFormat,
    /// Evaluate the first N examples (0: all).
    #[arg(long, default_value_t = 256)]
    pub examples: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also generate greedy answers and score GSM8K exact match.
    #[arg(long)]
    pub gsm8k: bool,
    /// Longest greedy answer in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: EvalArgs) -> Result<String> {
    let device = setup_device(a.device)?;
    let crate::train::LoadedModel { model: mut llama, params, tokenizer, chat_template } =
        crate::train::load_model(&a.model)?;
    let mut params = params;
    if let Some(path) = &a.weights {
        replace_weights(&mut params, path)?;
    }
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    let mut params = params.to_device(&device, |_| dtype)?;
    llama.dtype = dtype;
    if let Some(dir) = &a.adapter {
        loraga_core::io::adapter::load_adapter(dir, &mut llama, &mut params, false)?;
    }
    let mut records = read_jsonl(&a.data, &a.format.fields())?;
    if a.examples > 0 {
        records.truncate(a.examples);
    }
    let opts = a.format.encode_options(&tokenizer, 4096, chat_template.as_deref())?;
    let started = Instant::now();
    let examples = encode(&records, &tokenizer, &opts)?.examples;
    let loss = loraga_core::eval::loss(&llama, &params, &examples, a.batch_size)?;
    let mut text = format!(
        "{} examples: mean answer loss {:.5} (token-weighted; perplexity {:.4}), per-example mean {:.5} [{:.1?}]\n",
        examples.len(),
        loss.token_mean(),
        loss.perplexity(),
        loss.example_mean(),
        started.elapsed()
    );
    let mut json = serde_json::json!({
        "examples": examples.len(),
        "loss_token_weighted": loss.token_mean(),
        "perplexity": loss.perplexity(),
        "loss_per_example": loss.example_mean(),
    });
    if a.gsm8k {
        let started = Instant::now();
        // Generation stops at the token the answers were trained to end with.
        let cfg = GreedyConfig { max_new_tokens: a.max_new_tokens, stop_tokens: vec![opts.eos] };
        let report =
            loraga_core::eval::gsm8k_exact_match(&llama, &params, &tokenizer, &records, &opts, &cfg, a.batch_size)?;
        text.push_str(&format!(
            "GSM8K exact match: {}/{} = {:.2}% [{:.1?}]\n",
            report.correct(),
            report.items.len(),
            100.0 * report.accuracy(),
            started.elapsed()
        ));
        json["gsm8k_correct"] = report.correct().into();
        json["gsm8k_total"] = report.items.len().into();
        json["gsm8k_accuracy"] = report.accuracy().into();
    }
    if let Some(out) = &a.out {
        let body = serde_json::to_string_pretty(&json).expect("a JSON value always serialises");
        loraga_core::io::atomic::write(out, body.as_bytes())?;
    }
    Ok(text)
}

/// Every tensor of the safetensors file `path` replaces the model weight of its name; a name the
/// model lacks, or another shape, is an error.
fn replace_weights(params: &mut loraga_core::autograd::Params, path: &std::path::Path) -> Result<()> {
    let file = loraga_core::io::SafetensorsCheckpoint::open(path)?;
    let names: Vec<String> = file.names().map(String::from).collect();
    if names.is_empty() {
        return Err(Error::format(path, "no tensors to load"));
    }
    if let Some(name) = names.iter().find(|n| !params.contains(n)) {
        return Err(Error::format(path, format!("tensor {name} is not a weight of the model given by --model")));
    }
    params.load_from(&file, &names)?;
    eprintln!("replaced {} weights from {}", names.len(), path.display());
    Ok(())
}
