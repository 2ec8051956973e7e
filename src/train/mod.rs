//! `loraga train`: fine-tune a Llama with full fine-tuning, LoRA, LoRA-GA or PiSSA.
//!
//! One optimizer step: `grad_accum` micro-batches forward and backward (each loss scaled by
//! 1/grad_accum, so the gradient is the mean over micro-batches), gradients clipped to a global
//! norm, AdamW with the learning rate of the schedule (linear warmup, then cosine/linear/constant,
//! as transformers' schedulers).
//!
//! On a GPU, frozen weights are stored in bf16, trainable ones in f32 (master copies, cast to
//! bf16 on the tape), and activations are bf16, as PyTorch autocast trains. On the CPU
//! everything is f32.
//!
//! The run folder (`--out`) gets `run.json` (the options), `metrics.jsonl` (one line per step
//! and per evaluation), `checkpoint/` (see [`checkpoint`]), `init/` (LoRA-GA and PiSSA's initial
//! state) and at the end `adapter/` (a PEFT adapter for the ORIGINAL base model) or, for full
//! fine-tuning, `model.safetensors`.

pub mod args;
pub mod checkpoint;
mod setup;
pub mod timings;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use loraga_core::autograd::{Params, Tape};
use loraga_core::data::{Example, Loader, LoaderConfig};
use loraga_core::lora::{LoraConfig, LoraTarget};
use loraga_core::loraga::{self, InitMethod, InitState, LoraGaConfig, PissaConfig};
use loraga_core::model::Llama;
use loraga_core::optim::{AdamW, AdamWConfig, Decay, LrSchedule, clip_grad_norm, warmup_steps_from_ratio};
use loraga_core::{DType, Device, Error, Result, Tensor};

pub use args::{ChatTemplate, DataFormat, DeviceChoice, LoraGaVariant, Method, Schedule, TrainArgs};
use checkpoint::RunState;
pub use setup::{Model as LoadedModel, load_model};

use crate::metrics::{self, Record};
use timings::{Timings, since};

/// The device `choice` names (auto: the first GPU if usable, else the CPU).
pub fn setup_device(choice: DeviceChoice) -> Result<Device> {
    setup::device(choice)
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub interrupted: bool,
}

fn lora_config(args: &TrainArgs) -> Result<LoraConfig> {
    let targets = args.targets.iter().map(|t| LoraTarget::from_name(t.trim())).collect::<Result<Vec<_>>>()?;
    Ok(LoraConfig { r: args.rank, alpha: args.alpha, use_rslora: args.rslora, targets })
}

fn init_method(args: &TrainArgs) -> Option<InitMethod> {
    match args.method {
        Method::Full => None,
        Method::Lora => Some(InitMethod::Lora { seed: args.seed }),
        Method::LoraGa => {
            let base = match args.loraga_variant {
                LoraGaVariant::Reference => LoraGaConfig::default(),
                LoraGaVariant::Peft => LoraGaConfig::peft(),
            };
            // Adapters in the base weights' dtype, as the offset W - s B A is computed from the
            // stored A and B; they become f32 master copies afterwards (exactly).
            Some(InitMethod::LoraGa(LoraGaConfig { stable_gamma: args.loraga_gamma, seed: args.seed, ..base }))
        }
        Method::Pissa => Some(InitMethod::Pissa(PissaConfig::default())),
    }
}

/// The dtype each parameter is stored in on `device`.
fn storage_dtype(device: &Device, trainable: bool) -> DType {
    if device.is_cuda() && !trainable { DType::BF16 } else { DType::F32 }
}

/// Runs (or resumes) a training run.
pub fn run(mut args: TrainArgs) -> Result<Summary> {
    let mut times = Timings::start();
    let out = args.out.clone();
    let run_json = out.join("run.json");
    if args.resume {
        let saved: TrainArgs = metrics::read_json(&run_json)?;
        args = TrainArgs { resume: true, stop_after: args.stop_after, ..saved };
    } else if out.join("metrics.jsonl").exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already holds a run: pass --resume to continue it, or another --out",
            out.display()
        )));
    }
    setup::validate(&args)?;
    let t = Instant::now();
    let device = setup::device(args.device)?;
    times.device_s = since(t);
    eprintln!("device: {}", setup::describe(&device));
    let t = Instant::now();
    let setup::Model { model: mut llama, params: base, tokenizer, chat_template } = setup::load_model(&args.model)?;
    llama.dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    let full = args.method == Method::Full;
    let mut params = base.to_device(&device, |_| storage_dtype(&device, full))?;
    drop(base);
    times.model_load_s = since(t);
    let t = Instant::now();
    let data = setup::load_data(&args, &tokenizer, chat_template.as_deref())?;
    times.tokenize_s = since(t);
    if let Some(path) = &args.write_batch_plan {
        return write_batch_plan(&args, &data, path).map(|()| Summary {
            steps: 0,
            final_loss: None,
            eval_loss: None,
            interrupted: false,
        });
    }
    if full {
        let names: Vec<String> = params.names().map(String::from).collect();
        names.iter().try_for_each(|n| params.set_trainable(n, true))?;
    }
    let mut init = match init_method(&args) {
        None => None,
        Some(method) => Some(initialise(&args, &mut llama, &mut params, method, &data.estimation, &mut times)?),
    };
    let t = Instant::now();
    // Saved as created (in the base weights' dtype): `--resume` rebuilds W - s B0 A0 from it.
    if let Some(init) = &init
        && !args.resume
        && init.method.modifies_base()
    {
        init.save(out.join("init"))?;
    }
    // Trainable parameters are f32 master copies wherever they were created.
    let trainable: Vec<String> = params.iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
    for name in &trainable {
        let v = params.get(name)?;
        if v.dtype() != DType::F32 {
            let master = v.to(&v.device(), DType::F32)?;
            params.set_value(name, master)?;
        }
    }
    // The initial A0, B0 likewise (exact), so that the exported adapter pairs like with like.
    for layer in init.iter_mut().flat_map(|s| s.layers.iter_mut()) {
        layer.a = layer.a.to(&layer.a.device(), DType::F32)?;
        layer.b = layer.b.to(&layer.b.device(), DType::F32)?;
    }
    times.init_s += since(t);

    let total = setup::total_steps(&args, data.train.len())?;
    let warmup = warmup_steps_from_ratio(total, args.warmup_ratio)?;
    let decay = match args.schedule {
        Schedule::Constant => Decay::Constant,
        Schedule::Linear => Decay::Linear,
        Schedule::Cosine => Decay::Cosine,
    };
    let schedule = LrSchedule::new(args.lr, warmup, total, decay)?;
    let mut opt = AdamW::new(AdamWConfig { weight_decay: args.weight_decay, ..AdamWConfig::new(args.lr) })?;
    let loader = Loader::new(&data.train, loader_config(&args, data.pad_id))?;

    let mut state = RunState { step: 0, epoch: 0, batch: 0, tokens: 0 };
    let mut writer = if args.resume {
        state = checkpoint::load(&out, &mut params, &mut opt)?;
        eprintln!("resuming {} at step {} of {total}", out.display(), state.step);
        metrics::Writer::resume(&out.join("metrics.jsonl"), state.step as usize)?
    } else {
        let text = serde_json::to_string_pretty(&args).expect("TrainArgs always serialise");
        loraga_core::io::atomic::write(&run_json, text.as_bytes())?;
        metrics::Writer::create(&out.join("metrics.jsonl"))?
    };

    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // A second handler in one process (tests calling run twice) is refused; Ctrl-C then just
    // kills, which the checkpoints also survive.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));

    let bar = ProgressBar::new(total).with_position(state.step);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps, {msg} [{elapsed} < {eta}, {per_sec}]")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(args.name.clone().unwrap_or_else(|| args.method_name().to_string()));

    let mut batches = loader.batches_from(state.position())?;
    let mut summary = Summary { steps: state.step, final_loss: None, eval_loss: None, interrupted: false };
    while state.step < total {
        let started = Instant::now();
        params.zero_grad();
        let (mut loss_sum, mut tokens) = (0.0f64, 0u64);
        for _ in 0..args.grad_accum {
            // The batch iterator never ends: it rolls over into the next epoch's order.
            let (_, batch) = batches.next().expect("the batch iterator is endless");
            tokens += batch.attention_mask.as_ref().map_or(batch.input_ids.len(), |m| m.iter().filter(|&&r| r).count())
                as u64;
            let mut tape = Tape::new();
            let outputs = llama.forward(&mut tape, &params, &batch)?;
            let loss = outputs.loss.ok_or_else(|| Error::InvalidArgument("a training batch without labels".into()))?;
            let value = tape.value(loss).to_f32_vec()?[0];
            if !value.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "step {}: the loss is {value} (diverged; lower --lr or check the data)",
                    state.step + 1
                )));
            }
            loss_sum += value as f64;
            let l = tape.value(loss);
            let seed = Tensor::full(l.dims().to_vec(), l.dtype(), 1.0 / args.grad_accum as f32, &l.device())?;
            tape.backward_with(loss, seed, &mut params, None)?;
        }
        let max_norm = if args.max_grad_norm > 0.0 { args.max_grad_norm } else { f32::INFINITY };
        let norm = clip_grad_norm(&mut params, max_norm)?;
        let lr = schedule.lr_at(state.step);
        opt.set_lr(lr)?;
        opt.step(&mut params)?;
        let position = batches.next_position();
        state = RunState {
            step: state.step + 1,
            epoch: position.epoch,
            batch: position.batch,
            tokens: state.tokens + tokens,
        };

        let loss = loss_sum / args.grad_accum as f64;
        let seconds = started.elapsed().as_secs_f64();
        times.step(seconds);
        writer.write(&Record {
            step: state.step as usize,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(norm as f64),
            tokens_per_s: Some(tokens as f64 / seconds),
            ..Record::default()
        })?;
        summary.final_loss = Some(loss);
        bar.set_message(format!("loss {loss:.4}, {:.0} tok/s", tokens as f64 / seconds));
        bar.inc(1);

        let last = state.step == total;
        let stop = interrupted.load(Ordering::SeqCst) || args.stop_after == Some(state.step);
        if !data.eval.is_empty() && (last || (args.eval_every > 0 && state.step.is_multiple_of(args.eval_every))) {
            let t = Instant::now();
            let report = loraga_core::eval::loss(&llama, &params, &data.eval, args.batch_size)?;
            times.eval_s += since(t);
            times.evals += 1;
            let eval_loss = report.token_mean();
            writer.write(&Record { step: state.step as usize, eval_loss: Some(eval_loss), ..Record::default() })?;
            bar.println(format!("step {}: eval loss {eval_loss:.4} on {} examples", state.step, data.eval.len()));
            summary.eval_loss = Some(eval_loss);
        }
        if last || stop || (args.checkpoint_every > 0 && state.step.is_multiple_of(args.checkpoint_every)) {
            let t = Instant::now();
            checkpoint::save(&out, &params, &opt, &state)?;
            times.checkpoint_s += since(t);
            times.checkpoints += 1;
        }
        summary.steps = state.step;
        if stop && !last {
            bar.abandon_with_message(format!(
                "interrupted at step {}: checkpoint saved, continue with --resume",
                state.step
            ));
            summary.interrupted = true;
            times.finish(&out)?;
            return Ok(summary);
        }
    }
    bar.finish();
    let t = Instant::now();
    export(&out, &llama, &params, init.as_ref())?;
    times.export_s = since(t);
    times.finish(&out)?;
    Ok(summary)
}

/// The loader's config for the training batches.
fn loader_config(args: &TrainArgs, pad_id: u32) -> LoaderConfig {
    LoaderConfig {
        drop_last: true,
        bucket_chunk_batches: args.bucketing(),
        ..LoaderConfig::new(args.batch_size, args.seed, pad_id)
    }
}

/// `--write-batch-plan`: every micro-batch the run would take, as record numbers of --data
/// (0-based, blank lines not counted) with each example's token count after truncation.
fn write_batch_plan(args: &TrainArgs, data: &setup::Data, path: &std::path::Path) -> Result<()> {
    let total = setup::total_steps(args, data.train.len())?;
    let loader = Loader::new(&data.train, loader_config(args, data.pad_id))?;
    let count = total as usize * args.grad_accum;
    let (mut batches, mut epoch) = (Vec::with_capacity(count), 0);
    while batches.len() < count {
        batches.extend(loader.epoch_plan(epoch));
        epoch += 1;
    }
    batches.truncate(count);
    let records: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|&i| data.train[i].source).collect()).collect();
    let lengths: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|&i| data.train[i].len()).collect()).collect();
    let plan = serde_json::json!({
        "data": args.data,
        "steps": total,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_len": args.max_len,
        "seed": args.seed,
        "bucketing": args.bucketing(),
        "records": records,
        "lengths": lengths,
    });
    loraga_core::io::atomic::write(path, plan.to_string().as_bytes())?;
    eprintln!("wrote the {count} micro-batches of {total} steps to {} (no training)", path.display());
    Ok(())
}

/// LoRA-GA's gradient estimation (on the held-apart examples) and every method's initialisation.
fn initialise(
    args: &TrainArgs,
    llama: &mut Llama,
    params: &mut Params,
    method: InitMethod,
    estimation: &[Example],
    times: &mut Timings,
) -> Result<InitState> {
    let lora = lora_config(args)?;
    let init_dir = args.out.join("init");
    if args.resume && method.modifies_base() {
        let state = InitState::load(&init_dir)?;
        state.restore(llama, params)?;
        return Ok(state);
    }
    let started = Instant::now();
    let grads = match &method {
        InitMethod::LoraGa(_) => Some(setup::estimate(args, llama, params, &lora, estimation)?),
        _ => None,
    };
    times.estimate_s = since(started);
    let started = Instant::now();
    let state = loraga::initialize(llama, params, lora, &method, grads.as_ref())?;
    eprintln!("initialised {} adapters ({}) in {:.1?}", state.layers.len(), args.method_name(), started.elapsed());
    times.init_s = since(started);
    Ok(state)
}

/// The result a user takes away: a PEFT adapter for the original base model, or the full model.
fn export(out: &std::path::Path, llama: &Llama, params: &Params, init: Option<&InitState>) -> Result<()> {
    let Some(init) = init else {
        let names: Vec<String> = llama.config.weight_shapes().into_iter().map(|(n, _)| n).collect();
        let tensors: Vec<(&str, Tensor)> = names
            .iter()
            .map(|n| Ok((n.as_str(), params.get(n)?.to(&Device::Cpu, DType::F32)?)))
            .collect::<Result<_>>()?;
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        return loraga_core::io::save_safetensors(out.join("model.safetensors"), &refs, None);
    };
    let (config, tensors) = init.converted_adapter(params)?;
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    loraga_core::io::adapter::save_adapter(out.join("adapter"), &config, &refs, &[])
}

impl TrainArgs {
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::LoraGa => match self.loraga_variant {
                LoraGaVariant::Reference => "lora-ga",
                LoraGaVariant::Peft => "lora-ga (peft)",
            },
            Method::Pissa => "pissa",
        }
    }
}
