//! PEFT adapter directories: written adapters read back exactly; the rank-2r converted adapter on
//! the ORIGINAL weights gives the initialised-then-trained model (alpha/r and rsLoRA, every
//! method); the initial state saves and resumes bit for bit; bad adapters are refused by name.

mod common;

use common::loraga::*;
use common::spectra::test_seed;
use faer::Mat;
use loraga_core::autograd::Params;
use loraga_core::io::adapter::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use loraga_core::io::{AdapterConfig, SafetensorsCheckpoint, load_adapter, read_adapter, save_adapter};
use loraga_core::lora::{LoraConfig, lora_a_name, lora_b_name};
use loraga_core::loraga::*;
use loraga_core::model::{Batch, Llama};
use loraga_core::testing::rel_error;
use loraga_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

struct Case {
    model: Llama,
    w0: Params,
    batches: Vec<Batch>,
    grads: GradientEstimate,
    rng: StdRng,
}

fn case() -> Case {
    let mut rng = StdRng::seed_from_u64(test_seed());
    let c = tiny_config();
    let (model, mut w0) = random_model(&c, &mut rng);
    let batches = random_batches(&c, &mut rng, 2, 6);
    let targets = target_weights(&c, &lora_config(1, 1.0, false));
    let grads = estimate_gradients(&model, &mut w0, targets, &batches, &EstimateOptions::default()).unwrap();
    Case { model, w0, batches, grads, rng }
}

/// Initialises a copy of W0 and moves every A and B as training would (by ~10% of its norm).
fn trained(c: &mut Case, lora: &LoraConfig, method: &InitMethod) -> (Llama, Params, InitState) {
    let mut model = Llama::new(c.model.config.clone()).unwrap();
    let mut p = clone_params(&c.w0);
    let state = initialize(&mut model, &mut p, lora.clone(), method, Some(&c.grads)).unwrap();
    move_adapters(&mut p, &state, &mut c.rng);
    (model, p, state)
}

/// W + s·B·A of a module, in f64.
fn effective(p: &Params, lora: &LoraConfig, module: &str) -> Mat<f64> {
    let s =
        if lora.use_rslora { lora.alpha as f64 / (lora.r as f64).sqrt() } else { lora.alpha as f64 / lora.r as f64 };
    let w = mat(p.get(&format!("{module}.weight")).unwrap());
    let ba = mat(p.get(&lora_b_name(module)).unwrap()) * mat(p.get(&lora_a_name(module)).unwrap());
    w + scaled(&ba, s)
}

#[test]
fn written_adapters_read_back_exactly() {
    let mut c = case();
    let lora = lora_config(2, 8.0, true);
    let (model, p, state) = trained(&mut c, &lora, &InitMethod::LoraGa(LoraGaConfig::default()));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained");
    let (cfg, tensors) = state.trained_adapter(&p).unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_adapter(&out, &cfg, &refs, &[]).unwrap();
    let back = read_adapter(&out).unwrap();
    assert_eq!(back.config, cfg);
    assert_eq!(back.config.lora_config().unwrap(), lora);
    let (_, read) = back.tensors_for(&model, &p).unwrap();
    assert_eq!(read.len(), tensors.len());
    for ((n1, t1), (n2, t2)) in read.iter().zip(&tensors) {
        assert_eq!(n1, n2);
        assert_eq!(t1.to_vec::<f32>().unwrap(), t2.to_vec::<f32>().unwrap(), "{n1}");
    }
    // Loaded onto W_frz (the initialised base), it is the same model: identical logits.
    let mut fresh = Llama::new(c.model.config.clone()).unwrap();
    let mut only_base = Params::new();
    for x in p.iter().filter(|x| !x.name().contains("lora_")) {
        let v = Tensor::from_vec(x.value().to_vec::<f32>().unwrap(), x.value().dims().to_vec(), &Device::Cpu).unwrap();
        only_base.insert(x.name(), v, false).unwrap();
    }
    load_adapter(&out, &mut fresh, &mut only_base, true).unwrap();
    for b in &c.batches {
        assert_eq!(logits(&fresh, &only_base, b), logits(&model, &p, b));
    }
    // Overwriting an adapter directory is fine; the old files are gone, nothing half-written.
    save_adapter(&out, &cfg, &refs[..2], &[]).unwrap();
    assert_eq!(SafetensorsCheckpoint::open(out.join(ADAPTER_WEIGHTS)).unwrap().names().count(), 2);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("trained")], "no temporary directories left");
}

/// PEFT's `subtract_mutated_init` conversion: on the original W0, the rank-2r adapter gives the
/// trained model's effective weights up to W_frz's f32 rounding (rel 1e-6) and its logits.
#[test]
fn converted_adapter_on_the_original_weights_is_the_trained_model() {
    let mut c = case();
    let methods = [
        InitMethod::LoraGa(LoraGaConfig::default()),
        InitMethod::LoraGa(LoraGaConfig::peft()),
        InitMethod::Pissa(PissaConfig::default()),
        InitMethod::Lora { seed: 9 },
    ];
    for method in &methods {
        for lora in [lora_config(2, 8.0, false), lora_config(3, 5.0, true)] {
            let (model, p, state) = trained(&mut c, &lora, method);
            let dir = tempfile::tempdir().unwrap();
            state.save_converted(&p, dir.path().join("converted"), Some("tiny-llama")).unwrap();
            let mut original = Llama::new(c.model.config.clone()).unwrap();
            let mut w0 = clone_params(&c.w0);
            let converted = load_adapter(dir.path().join("converted"), &mut original, &mut w0, false).unwrap();
            let expect_r = if method.modifies_base() { 2 * lora.r } else { lora.r };
            assert_eq!(converted.r, expect_r, "{method:?}");
            let s = |l: &LoraConfig| if l.use_rslora { l.alpha / (l.r as f32).sqrt() } else { l.alpha / l.r as f32 };
            assert!(
                (s(&converted) - s(&lora)).abs() < 1e-6 * s(&lora),
                "{method:?}: scaling {} vs {}",
                s(&converted),
                s(&lora)
            );
            for l in &state.layers {
                let e = rel(&effective(&w0, &converted, &l.module), &effective(&p, &lora, &l.module));
                assert!(e < 1e-6, "{method:?} rslora={}: {}: effective weights {e:.2e}", lora.use_rslora, l.module);
            }
            for b in &c.batches {
                let e = rel_error(&logits(&original, &w0, b), &wide(&logits(&model, &p, b)));
                assert!(e < 1e-5, "{method:?}: logits {e:.2e}");
            }
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join("converted").join(ADAPTER_CONFIG)).unwrap(),
            )
            .unwrap();
            assert_eq!(json["base_model_name_or_path"], "tiny-llama");
            assert_eq!(json["init_lora_weights"], true);
        }
    }
}

#[test]
fn init_state_and_gradient_cache_resume_bit_for_bit() {
    let c = case();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LoraGaConfig { direction: Direction::Random, scale: Scale::WeightSvd, seed: 77, ..LoraGaConfig::peft() };
    for (i, method) in [
        InitMethod::LoraGa(cfg),
        InitMethod::Pissa(PissaConfig { svd: PissaSvd::Fast { niter: 3 }, seed: 4, adapter_dtype: Some(DType::F32) }),
        InitMethod::Lora { seed: 2 },
    ]
    .iter()
    .enumerate()
    {
        let lora = lora_config(2, 4.0, i == 0);
        let mut model = Llama::new(c.model.config.clone()).unwrap();
        let mut p = clone_params(&c.w0);
        let state = initialize(&mut model, &mut p, lora.clone(), method, Some(&c.grads)).unwrap();
        let path = dir.path().join(format!("state{i}"));
        state.save(&path).unwrap();
        let back = InitState::load(&path).unwrap();
        assert_eq!((&back.method, &back.lora), (method, &lora));
        let mut model2 = Llama::new(c.model.config.clone()).unwrap();
        let mut p2 = clone_params(&c.w0);
        back.restore(&mut model2, &mut p2).unwrap();
        assert_eq!(model2.lora, model.lora);
        assert_eq!(p2.len(), p.len());
        for x in p.iter() {
            let y = p2.param(x.name()).unwrap();
            assert_eq!(x.value().to_vec::<f32>().unwrap(), y.value().to_vec::<f32>().unwrap(), "{}", x.name());
            assert_eq!(x.trainable(), y.trainable(), "{}", x.name());
        }
        // A plain adapter is not a state, and restoring twice is refused.
        assert!(back.restore(&mut model2, &mut p2).unwrap_err().to_string().contains("already has an adapter"));
        std::fs::remove_file(path.join("loraga_init.json")).unwrap();
        assert!(InitState::load(&path).unwrap_err().to_string().contains("not a saved initial state"));
    }
    let cache = dir.path().join("grads.safetensors");
    c.grads.save(&cache).unwrap();
    let back = GradientEstimate::load(&cache).unwrap();
    assert_eq!((back.len(), back.batches()), (c.grads.len(), 2));
    for (n, t) in c.grads.iter() {
        assert_eq!(back.get(n).unwrap().to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap(), "{n}");
    }
}

#[test]
fn bad_adapters_are_refused_by_name() {
    let mut c = case();
    let lora = lora_config(2, 8.0, false);
    let (model, p, state) = trained(&mut c, &lora, &InitMethod::Lora { seed: 1 });
    let (cfg, tensors) = state.trained_adapter(&p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let check = |name: &str, cfg: &AdapterConfig, refs: &[(&str, &Tensor)], want: &[&str]| {
        let d = dir.path().join(name);
        save_adapter(&d, cfg, refs, &[]).unwrap();
        let e = match read_adapter(&d) {
            Err(e) => e.to_string(),
            Ok(a) => a.tensors_for(&model, &c.w0).err().unwrap().to_string(),
        };
        assert!(want.iter().all(|w| e.contains(w)), "{name}: {e}");
    };
    let q = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
    let missing: Vec<_> = refs.iter().copied().filter(|(n, _)| *n != q).collect();
    check("missing", &cfg, &missing, &[q, "is missing"]);
    let wrong = Tensor::zeros([16, 3], DType::F32, &Device::Cpu).unwrap();
    let reshaped: Vec<_> = refs.iter().map(|&(n, t)| if n == q { (n, &wrong) } else { (n, t) }).collect();
    check("shape", &cfg, &reshaped, &[q, "[16, 3]", "expected [16, 2]"]);
    let extra = Tensor::zeros([2, 16], DType::F32, &Device::Cpu).unwrap();
    let mut more = refs.clone();
    more.push(("base_model.model.lm_head.lora_A.weight", &extra));
    check("extra", &cfg, &more, &["lm_head.lora_A.weight", "not a LoRA weight"]);
    let fewer_targets = AdapterConfig { target_modules: vec!["q_proj".into()], ..cfg.clone() };
    check("targets", &fewer_targets, &refs, &["not a LoRA weight of this model's targets"]);
    let unknown = AdapterConfig { target_modules: vec!["lm_head".into()], ..cfg.clone() };
    check("unknown", &unknown, &refs, &["lm_head"]);

    // Config fields that change the math, and a corrupt weights file.
    let good = dir.path().join("good");
    save_adapter(&good, &cfg, &refs, &[]).unwrap();
    let json_path = good.join(ADAPTER_CONFIG);
    let original = std::fs::read_to_string(&json_path).unwrap();
    for (edit, want) in [
        (r#""peft_type": "LORA""#, r#""peft_type": "IA3""#),
        (r#""use_dora": false"#, r#""use_dora": true"#),
        (r#""rank_pattern": {}"#, r#""rank_pattern": {"q_proj": 4}"#),
        (r#""fan_in_fan_out": false"#, r#""fan_in_fan_out": true"#),
    ] {
        assert!(original.contains(edit), "{edit}");
        std::fs::write(&json_path, original.replace(edit, want)).unwrap();
        let e = read_adapter(&good).err().unwrap().to_string();
        assert!(e.contains(ADAPTER_CONFIG), "{want}: {e}");
    }
    std::fs::write(&json_path, &original).unwrap();
    let weights = good.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 7]).unwrap();
    let e = read_adapter(&good).err().unwrap().to_string();
    assert!(e.contains(ADAPTER_WEIGHTS) && e.contains("truncated"), "{e}");
    std::fs::remove_file(&weights).unwrap();
    assert!(read_adapter(&good).err().unwrap().to_string().contains("no adapter_model.safetensors"));

    // Writing over a directory that holds anything else is refused, and leaves it alone.
    let precious = dir.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("notes.txt"), "keep").unwrap();
    let e = save_adapter(&precious, &cfg, &refs, &[]).unwrap_err().to_string();
    assert!(e.contains("notes.txt") && e.contains("refusing"), "{e}");
    assert_eq!(std::fs::read_to_string(precious.join("notes.txt")).unwrap(), "keep");
}

/// The fields PEFT 0.21's `PeftModel.from_pretrained` reads, and the file metadata it writes.
#[test]
fn adapter_files_have_what_peft_reads() {
    let mut c = case();
    let lora = lora_config(2, 8.0, true);
    let (_, p, state) = trained(&mut c, &lora, &InitMethod::LoraGa(LoraGaConfig::default()));
    let dir = tempfile::tempdir().unwrap();
    state.save_converted(&p, dir.path().join("a"), None).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("a").join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert!((json["lora_alpha"].as_f64().unwrap() - 8.0 * 2f64.sqrt()).abs() < 1e-5);
    assert_eq!(json["use_rslora"], true);
    assert_eq!(json["target_modules"].as_array().unwrap().len(), 7);
    assert!(json["base_model_name_or_path"].is_null());
    let file = SafetensorsCheckpoint::open(dir.path().join("a").join(ADAPTER_WEIGHTS)).unwrap();
    assert_eq!(file.metadata("format"), Some("pt"));
    assert_eq!(
        file.shape_and_dtype("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").unwrap().0,
        vec![4, 24]
    );
}
