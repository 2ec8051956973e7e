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
