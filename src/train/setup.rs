//! What a run needs before its first step: options checked, the device, the model and
//! tokenizer, the data split three ways, and LoRA-GA's gradient estimate.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use loraga_core::autograd::Params;
use loraga_core::data::{Example, collate, encode, read_jsonl};
use loraga_core::io::GgufFile;
use loraga_core::lora::LoraConfig;
use loraga_core::loraga::{EstimateOptions, GradientEstimate, GradientEstimator, target_weights};
use loraga_core::model::Llama;
use loraga_core::tokenizer::Tokenizer;
use loraga_core::{Device, Error, Result};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::args::{DeviceChoice, Method, TrainArgs};

pub fn validate(a: &TrainArgs) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidArgument(m));
    if a.batch_size == 0 || a.grad_accum == 0 {
        return bad(format!("--batch-size {} and --grad-accum {} must be positive", a.batch_size, a.grad_accum));
    }
    if a.method != Method::Full && a.rank == 0 {
        return bad("--rank must be positive".into());
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        return bad(format!("--lr must be positive, got {}", a.lr));
    }
    if a.epochs.is_none() && a.steps == 0 {
        return bad("--steps must be positive".into());
    }
    if a.bucket_batches == 0 {
        return bad("--bucket-batches must be positive (turn bucketing off with --no-bucketing)".into());
    }
    if a.method == Method::LoraGa && (a.loraga_batches == 0 || a.loraga_batch_size == 0) {
        return bad("--loraga-batches and --loraga-batch-size must be positive".into());
    }
    Ok(())
}

pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => Device::cuda(0),
        DeviceChoice::Auto => {
            let (d, why) = Device::cuda_or_cpu(0);
            if let Some(e) = why {
                eprintln!("no usable GPU ({e}); training on the CPU");
            }
            Ok(d)
        }
    }
}

pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(c) => format!("cuda:0 ({})", c.name()),
    }
}

pub struct Model {
    pub model: Llama,
    pub params: Params,
    pub tokenizer: Tokenizer,
    /// The model's chat template (Jinja text), if it ships one.
    pub chat_template: Option<String>,
}

/// A GGUF file, or a Hugging Face folder with config.json, the safetensors and tokenizer.json.
pub fn load_model(path: &Path) -> Result<Model> {
    let started = Instant::now();
    let m = if path.is_dir() {
        let (model, params) = Llama::load_safetensors(path.join("config.json"), path)?;
        let tokenizer = Tokenizer::from_file(path.join("tokenizer.json"))?;
        Model { model, params, tokenizer, chat_template: folder_chat_template(path)? }
    } else {
        let (model, params) = Llama::load_gguf(path)?;
        let file = GgufFile::open(path)?;
        let chat_template = file.metadata().get("tokenizer.chat_template").and_then(|v| v.as_str()).map(String::from);
        Model { model, params, tokenizer: Tokenizer::from_gguf(&file)?, chat_template }
    };
    let n: usize = m.params.iter().map(|p| p.value().shape().elem_count()).sum();
    eprintln!("loaded {} ({:.1}M parameters) in {:.1?}", path.display(), n as f64 / 1e6, started.elapsed());
    Ok(m)
}

/// A Hugging Face folder's chat template: `chat_template.jinja`, else the `chat_template` string
/// of `tokenizer_config.json` (None where neither exists).
fn folder_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|source| Error::Io { path: jinja, source });
    }
    let config = dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config).map_err(|source| Error::Io { path: config.clone(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&config, format!("not valid JSON: {e}")))?;
    Ok(v.get("chat_template").and_then(|t| t.as_str()).map(String::from))
}

pub struct Data {
    pub train: Vec<Example>,
    /// Held apart from `train` for LoRA-GA's gradient estimation (for every method, so that all
    /// methods train on the same examples).
    pub estimation: Vec<Example>,
    pub eval: Vec<Example>,
    pub pad_id: u32,
}

pub fn load_data(a: &TrainArgs, tok: &Tokenizer, chat_template: Option<&str>) -> Result<Data> {
    let fields = a.format.fields();
    let opts = a.format.encode_options(tok, a.max_len, chat_template)?;
    let records = read_jsonl(&a.data, &fields)?;
    let enc = encode(&records, tok, &opts)?;
    if enc.truncated + enc.dropped > 0 {
        eprintln!(
            "{}: {} examples truncated to {} tokens, {} dropped (prompt too long)",
            a.data.display(),
            enc.truncated,
            a.max_len,
            enc.dropped
        );
    }
    let mut examples = enc.examples;
    let held = a.loraga_batches * a.loraga_batch_size;
    if held >= examples.len() {
        return Err(Error::InvalidArgument(format!(
            "{} has {} examples: none left for training after holding {held} apart for LoRA-GA's estimation",
            a.data.display(),
            examples.len()
        )));
    }
    // A seeded choice of the held-apart examples, independent of the training order's seed use.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(a.seed ^ 0x6c6f_7261_6761));
    let mut held_apart: Vec<usize> = order[..held].to_vec();
    held_apart.sort_unstable();
    let mut estimation = Vec::with_capacity(held);
    for &i in held_apart.iter().rev() {
        estimation.push(examples.remove(i));
    }
    estimation.reverse();
    let eval = match &a.eval_data {
        None => Vec::new(),
        Some(p) => {
            let mut records = read_jsonl(p, &fields)?;
            records.truncate(a.eval_examples);
            encode(&records, tok, &opts)?.examples
        }
    };
    let pad_id = tok.eos_token_id().unwrap_or(0);
    eprintln!("data: {} training, {} held apart, {} eval examples", examples.len(), estimation.len(), eval.len());
    Ok(Data { train: examples, estimation, eval, pad_id })
}

/// Optimizer steps of the run: --steps, or --epochs over the full batches of the training set.
pub fn total_steps(a: &TrainArgs, train_examples: usize) -> Result<u64> {
    let Some(epochs) = a.epochs else { return Ok(a.steps) };
    let per_epoch = (train_examples / a.batch_size) as f64 / a.grad_accum as f64;
    let steps = (epochs * per_epoch).ceil() as u64;
    if steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "--epochs {epochs} over {train_examples} examples in batches of {} is no step",
            a.batch_size
        )));
    }
    Ok(steps)
}

/// LoRA-GA's full-weight gradient of every target, averaged over the held-apart micro-batches.
pub fn estimate(
    a: &TrainArgs,
    llama: &Llama,
    params: &mut Params,
    lora: &LoraConfig,
    examples: &[Example],
) -> Result<GradientEstimate> {
    let targets = target_weights(&llama.config, lora);
    let mut est = GradientEstimator::new(params, targets, &EstimateOptions::default())?;
    eprintln!(
        "LoRA-GA: estimating gradients over {} micro-batches of {} ({:.1} MiB of f32 accumulators)",
        a.loraga_batches,
        a.loraga_batch_size,
        est.memory().bytes as f64 / (1 << 20) as f64
    );
    let bar = ProgressBar::new(a.loraga_batches as u64);
    bar.set_style(
        ProgressStyle::with_template("estimating [{bar:30}] {pos}/{len} batches, {msg} [{elapsed} < {eta}]")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    for chunk in examples.chunks(a.loraga_batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        // Padding is masked and ignored by the loss, so any id pads.
        let loss = est.step(llama, params, &collate(&refs, 0))?;
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    est.finish()
}
