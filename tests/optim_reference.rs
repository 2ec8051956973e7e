//! loraga's optimizers against PyTorch's own numbers: torch.optim.AdamW (single-tensor path) with
//! torch.nn.utils.clip_grad_norm_ before every step, over six steps with a no-decay group and a
//! parameter that misses some steps; and transformers' three warmup schedules and warmup-ratio
//! rounding. f32 results within 1e-6 relative error (the paths perform the same f32 operations;
//! the norm is summed in f64 here and in f32 there), schedules within 1e-12.
//!
//! The fixture in tests/fixtures/optim/ is written by `scripts/fixtures/adamw_reference.py`
//! (torch + transformers, on a CPU in f32). A missing fixture fails the test.

use std::path::PathBuf;

use loraga_core::autograd::Params;
use loraga_core::io::SafetensorsCheckpoint;
use loraga_core::optim::{AdamW, AdamWConfig, Decay, LrSchedule, clip_grad_norm, warmup_steps_from_ratio};
use loraga_core::testing::{rel_error, repo_path};
use loraga_core::{DType, Device};
use serde_json::Value;

const TOL: f64 = 1e-6;

fn fixture() -> (SafetensorsCheckpoint, Value) {
    let dir: PathBuf = repo_path("tests/fixtures/optim");
    let (tensors, meta) = (dir.join("tensors.safetensors"), dir.join("meta.json"));
    assert!(
        tensors.exists() && meta.exists(),
        "{} or {} is missing: run `python3 scripts/fixtures/adamw_reference.py` where torch and \
         transformers are installed (the GPU machine), then commit tests/fixtures/optim/",
        tensors.display(),
        meta.display()
    );
    let meta = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    (SafetensorsCheckpoint::open(&tensors).unwrap(), meta)
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn adamw_and_clipping_match_torch() {
    let (file, meta) = fixture();
    let t = |name: &str| file.tensor(name, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<String> =
        meta["params"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    let no_decay: Vec<String> =
        meta["no_decay"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    let betas = f64s(&meta["betas"]);
    let config = AdamWConfig {
        lr: 0.0,
        betas: (betas[0], betas[1]),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    };
    let mut opt = AdamW::new(config).unwrap().with_no_decay(move |n| no_decay.iter().any(|d| d == n));
    let mut params = Params::new();
    for n in &names {
        params.insert(n.clone(), t(&format!("init.{n}")), true).unwrap();
    }
    let max_norm = meta["max_norm"].as_f64().unwrap() as f32;
    let (lrs, norms) = (f64s(&meta["lrs"]), f64s(&meta["norms"]));
    for k in 0..meta["steps"].as_u64().unwrap() as usize {
        for n in &names {
            let g = format!("grad.{k}.{n}");
            params.set_grad(n, file.contains(&g).then(|| t(&g))).unwrap();
        }
        let norm = clip_grad_norm(&mut params, max_norm).unwrap() as f64;
        let e = (norm - norms[k]).abs() / norms[k];
        assert!(e <= TOL, "step {k}: gradient norm {norm} vs torch's {}", norms[k]);
        opt.set_lr(lrs[k]).unwrap();
        opt.step(&mut params).unwrap();
        params.zero_grad();

        // Over all parameters together: a one-element moment can sit near 0 by cancellation.
        let (mut got, mut want): ([Vec<f32>; 3], [Vec<f64>; 3]) = Default::default();
        for n in &names {
            let st = opt.state(n).unwrap();
            let ours = [params.get(n).unwrap(), st.exp_avg(), st.exp_avg_sq()];
            for (i, (ours, key)) in ours.iter().zip(["param", "exp_avg", "exp_avg_sq"]).enumerate() {
                got[i].extend(ours.to_vec::<f32>().unwrap());
                want[i].extend(t(&format!("{key}.{k}.{n}")).to_vec::<f32>().unwrap().iter().map(|&x| x as f64));
            }
        }
        let errs: Vec<f64> = got.iter().zip(&want).map(|(g, w)| rel_error(g, w)).collect();
        eprintln!("step {k}: norm rel error {e:.2e}; param, exp_avg, exp_avg_sq rel errors {errs:?}");
        assert!(errs.iter().all(|&e| e <= TOL), "step {k}: param, exp_avg, exp_avg_sq rel errors {errs:?}");
    }
    for n in &names {
        let want = meta["final_steps"][n].as_f64().unwrap() as u64;
        assert_eq!(opt.state(n).unwrap().step(), want, "{n}: step count");
    }
}

#[test]
fn schedules_match_transformers() {
    let (_, meta) = fixture();
    let schedules = meta["schedules"].as_array().unwrap();
    assert!(!schedules.is_empty());
    for s in schedules {
        let decay = match s["kind"].as_str().unwrap() {
            "constant" => Decay::Constant,
            "linear" => Decay::Linear,
            "cosine" => Decay::Cosine,
            other => panic!("unknown schedule kind {other}"),
        };
        let (warmup, total) = (s["warmup"].as_u64().unwrap(), s["total"].as_u64().unwrap());
        let ours = LrSchedule::new(s["base_lr"].as_f64().unwrap(), warmup, total, decay).unwrap();
        for (k, want) in f64s(&s["lrs"]).into_iter().enumerate() {
            let got = ours.lr_at(k as u64);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1e-300),
                "{decay:?} warmup {warmup} total {total}: lr before step {k} is {got}, transformers {want}"
            );
        }
    }
    match &meta["warmup_from_ratio"] {
        Value::Array(rows) => {
            // transformers 5 spells a warmup ratio as a float warmup_steps below 1; the fixture's
            // ratio 1.0 (written by the script's first version) meant one step there, not a ratio.
            for r in rows.iter().filter(|r| r["ratio"].as_f64().unwrap() < 1.0) {
                let (total, ratio) = (r["total"].as_u64().unwrap(), r["ratio"].as_f64().unwrap());
                let want = r["warmup_steps"].as_u64().unwrap();
                assert_eq!(warmup_steps_from_ratio(total, ratio).unwrap(), want, "total {total}, ratio {ratio}");
            }
        }
        other => panic!("the fixture has no TrainingArguments.get_warmup_steps values: {other}"),
    }
}
