//! `loraga train` end to end on the real model (SmolLM2-135M from its GGUF, on the CPU; needs
//! `scripts/fetch-smollm2.sh`): a LoRA-GA run stopped after one step and resumed gives exactly
//! the losses of the same run done in one go, and leaves a PEFT adapter, checkpoint and metrics;
//! `loraga eval` applies that adapter to the original model.

use std::path::Path;
use std::process::Command;

use loraga_core::data::{Fields, synthetic, to_jsonl};
use loraga_core::testing::repo_path;

fn loraga() -> Command {
    Command::new(std::env::var_os("LORAGA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_loraga").into()))
}

fn train(data: &Path, out: &Path, extra: &[&str]) {
    let model = repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-smollm2.sh", model.display());
    let o = loraga()
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(data)
        .args(["--method", "lora-ga", "--rank", "4", "--steps", "3", "--batch-size", "2", "--max-len", "48"])
        .args(["--loraga-batches", "1", "--loraga-batch-size", "2", "--device", "cpu", "--eval-every", "0"])
        .args(["--checkpoint-every", "0", "--warmup-ratio", "0", "--lr", "1e-3", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "loraga train failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

#[test]
fn a_stopped_and_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, to_jsonl(&synthetic::problems(12, 3), &Fields::default())).unwrap();

    let straight = dir.path().join("straight");
    train(&data, &straight, &[]);
    let resumed = dir.path().join("resumed");
    train(&data, &resumed, &["--stop-after", "1"]);
    assert_eq!(losses(&resumed).len(), 1, "the stopped run did one step");
    assert!(!resumed.join("adapter").exists(), "a stopped run exports nothing yet");
    train(&data, &resumed, &["--resume"]);

    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "resuming changed the run");
    assert!(a.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    for run in [&straight, &resumed] {
        for f in ["run.json", "checkpoint/state.json", "init/loraga_init.json", "adapter/adapter_config.json"] {
            assert!(run.join(f).is_file(), "{} has no {f}", run.display());
        }
    }
    // Where the time went: every phase measured, the steps counted, nothing negative.
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("timings.json")).unwrap()).unwrap();
    assert_eq!(
        (t["steps"].as_u64(), t["evals"].as_u64(), t["checkpoints"].as_u64()),
        (Some(3), Some(0), Some(1)),
        "{t}"
    );
    for k in ["model_load_s", "tokenize_s", "estimate_s", "init_s", "train_steps_s", "first_step_s", "export_s"] {
        assert!(t[k].as_f64().unwrap() > 0.0, "{k} in {t}");
    }
    let phases: f64 = ["device_s", "model_load_s", "tokenize_s", "estimate_s", "init_s", "train_steps_s", "eval_s"]
        .iter()
        .chain(&["checkpoint_s", "export_s", "other_s"])
        .map(|k| t[k].as_f64().unwrap())
        .sum();
    assert!((phases - t["total_s"].as_f64().unwrap()).abs() < 1e-6, "{t}");

    // The exported adapter is the rank-2r conversion for the original model.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);

    // The adapter loads onto the original model for evaluation (loss and GSM8K exact match).
    let model = repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let report = dir.path().join("eval.json");
    let o = loraga()
        .args(["eval", "--examples", "2", "--gsm8k", "--max-new-tokens", "8", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(straight.join("adapter"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "loraga eval failed:\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("2 examples: mean answer loss") && text.contains("GSM8K exact match:"), "{text}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["loss_token_weighted"].as_f64().unwrap().is_finite() && r["gsm8k_total"] == 2, "{r}");

    // A second fresh run into the same folder is refused rather than mixed with the first.
    let o = loraga()
        .args(["train", "--model", "x.gguf", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&straight)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Full fine-tuning exports model.safetensors; `loraga eval --weights` scores it on the original
/// model's configuration and tokenizer: two steps at 1e-3 on the evaluated examples lower their
/// loss, and a file with a foreign tensor is refused by name.
#[test]
fn full_fine_tuning_weights_evaluate_with_eval_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, to_jsonl(&synthetic::problems(10, 5), &Fields::default())).unwrap();
    let model = repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-smollm2.sh", model.display());
    let run = dir.path().join("full");
    let o = loraga()
        .arg("train")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--method", "full", "--steps", "2", "--batch-size", "4", "--max-len", "48", "--device", "cpu"])
        .args(["--loraga-batches", "1", "--loraga-batch-size", "2", "--eval-every", "0", "--checkpoint-every", "0"])
        .args(["--warmup-ratio", "0", "--lr", "1e-4", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "loraga train failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let eval = |weights: Option<&Path>| {
        let mut c = loraga();
        c.args(["eval", "--examples", "8", "--device", "cpu", "--model"]).arg(&model).arg("--data").arg(&data);
        if let Some(w) = weights {
            c.arg("--weights").arg(w);
        }
        c.output().unwrap()
    };
    let loss = |o: std::process::Output| -> f64 {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "loraga eval failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let after = text.split("mean answer loss ").nth(1).unwrap_or_else(|| panic!("{text}"));
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (base, tuned) = (loss(eval(None)), loss(eval(Some(&run.join("model.safetensors")))));
    assert!(tuned < base, "fine-tuned loss {tuned} is not below the base model's {base}");

    let foreign = dir.path().join("foreign.safetensors");
    let t = loraga_core::Tensor::zeros([2, 2], loraga_core::DType::F32, &loraga_core::Device::Cpu).unwrap();
    loraga_core::io::save_safetensors(&foreign, &[("not.a.weight", &t)], None).unwrap();
    let o = eval(Some(&foreign));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not.a.weight"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The micro-batches `loraga train --write-batch-plan` writes for these options: per batch, the
/// record numbers and the examples' token counts.
fn batch_plan(data: &Path, dir: &Path, name: &str, extra: &[&str]) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let plan = dir.join(format!("{name}.json"));
    let o = loraga()
        .arg("train")
        .arg("--model")
        .arg(repo_path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .arg("--data")
        .arg(data)
        .args(["--steps", "8", "--batch-size", "4", "--max-len", "384", "--loraga-batches", "1"])
        .args(["--loraga-batch-size", "2", "--device", "cpu", "--out"])
        .arg(dir.join(name))
        .arg("--write-batch-plan")
        .arg(&plan)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "loraga train --write-batch-plan failed:\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(!dir.join(name).join("metrics.jsonl").exists(), "writing the plan trained");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let rows = |key: &str| -> Vec<Vec<usize>> { serde_json::from_value(v[key].clone()).unwrap() };
    (rows("records"), rows("lengths"))
}

#[test]
fn the_data_options_shape_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, to_jsonl(&synthetic::problems(40, 5), &Fields::default())).unwrap();
    let padding = |lengths: &[Vec<usize>]| -> usize {
        lengths.iter().map(|b| b.len() * b.iter().max().unwrap() - b.iter().sum::<usize>()).sum()
    };

    // Bucketing (the default) sorts the epoch's examples by length before batching: the same
    // examples as without it (8 steps of 4 stay within the 38 training examples' first epoch),
    // much less padding.
    let (bucketed, bucketed_len) = batch_plan(&data, dir.path(), "bucketed", &[]);
    let (plain, plain_len) = batch_plan(&data, dir.path(), "plain", &["--no-bucketing"]);
    assert_eq!(bucketed.len(), 8);
    assert!(bucketed.iter().chain(&plain).all(|b| b.len() == 4));
    let distinct = |p: &[Vec<usize>]| p.concat().into_iter().collect::<std::collections::BTreeSet<_>>().len();
    assert_eq!((distinct(&bucketed), distinct(&plain)), (32, 32));
    let (pb, pp) = (padding(&bucketed_len), padding(&plain_len));
    assert!(pb * 2 < pp, "bucketing should cut padding: {pb} vs {pp} tokens");

    // Chat templates: the model's own (SmolLM2's ChatML with its default system turn) makes every
    // example longer than the built-in ChatML by the same system turn; both batch alike.
    let (chatml, chatml_len) = batch_plan(&data, dir.path(), "chatml", &["--chat-template", "chatml"]);
    let (model, model_len) = batch_plan(&data, dir.path(), "model", &["--chat-template", "model"]);
    assert_eq!(chatml, model, "a constant length shift changes no batch");
    let diffs: std::collections::BTreeSet<i64> =
        model_len.concat().iter().zip(chatml_len.concat()).map(|(&m, c)| m as i64 - c as i64).collect();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(*diffs.first().unwrap() > 10, "{diffs:?}");
}
