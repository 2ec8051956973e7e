//! CPU tests of AdamW, clipping and state save/load against f64 references written from the
//! textbook formulas (not from the implementation's order of operations). Inputs are fresh each
//! run: the seed comes from the clock (or LORAGA_TEST_SEED to replay a failure) and is printed.

use half::bf16;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::autograd::{Params, Tape};
use crate::device::Device;
use crate::testing::{randn, rel_error};

fn rng() -> StdRng {
    let seed = std::env::var("LORAGA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("LORAGA_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn cpu(v: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(v, dims.to_vec(), &Device::Cpu).unwrap()
}

fn values(p: &Params, name: &str) -> Vec<f32> {
    p.get(name).unwrap().to_vec::<f32>().unwrap()
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Ragged shapes: a matrix, a vector, a 3-d tensor and a single element.
const SHAPES: [(&str, &[usize]); 4] =
    [("a.weight", &[7, 13]), ("b.bias", &[33]), ("c.weight", &[3, 5, 2]), ("d", &[1])];

fn random_params(rng: &mut StdRng) -> Params {
    let mut p = Params::new();
    for (name, dims) in SHAPES {
        p.insert(name, cpu(randn(rng, dims.iter().product()), dims), true).unwrap();
    }
    p.insert("frozen", cpu(randn(rng, 9), &[9]), false).unwrap();
    p
}

/// The textbook AdamW in f64 (Loshchilov & Hutter, as torch documents it).
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn new(p: &[f32]) -> Reference {
        Reference { p: wide(p), m: vec![0.0; p.len()], v: vec![0.0; p.len()], t: 0 }
    }

    fn step(&mut self, g: &[f32], lr: f64, (b1, b2): (f64, f64), eps: f64, wd: f64) {
        self.t += 1;
        for i in 0..self.p.len() {
            let g = g[i] as f64;
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let m_hat = self.m[i] / (1.0 - b1.powi(self.t));
            let v_hat = self.v[i] / (1.0 - b2.powi(self.t));
            self.p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

#[test]
fn adamw_matches_the_f64_reference_over_several_steps() {
    let mut rng = rng();
    let mut params = random_params(&mut rng);
    let config = AdamWConfig { lr: 0.05, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.1 };
    // Biases get no decay; "d" misses a gradient in some steps, so its step count (and bias
    // correction) lags the others'.
    let mut opt = AdamW::new(config).unwrap().with_no_decay(|n| n.ends_with(".bias"));
    let start: Vec<Vec<f32>> = SHAPES.iter().map(|(n, _)| values(&params, n)).collect();
    let mut refs: Vec<Reference> = start.iter().map(|p| Reference::new(p)).collect();
    let frozen = values(&params, "frozen");
    let lrs = [0.05, 0.03, 0.05, 0.01, 0.04, 0.02];
    for (k, &lr) in lrs.iter().enumerate() {
        opt.set_lr(lr).unwrap();
        for ((name, dims), r) in SHAPES.iter().zip(&mut refs) {
            if *name == "d" && k % 2 == 1 {
                continue;
            }
            let g: Vec<f32> = randn(&mut rng, r.p.len()).iter().map(|x| x * 0.3).collect();
            params.set_grad(name, Some(cpu(g.clone(), dims))).unwrap();
            let wd = if name.ends_with(".bias") { 0.0 } else { config.weight_decay };
            r.step(&g, lr, config.betas, config.eps, wd);
        }
        params.set_grad("frozen", Some(cpu(randn(&mut rng, 9), &[9]))).unwrap();
        opt.step(&mut params).unwrap();
        params.zero_grad();
    }
    // Errors over all tensors together: a single element's moment can be near 0 by cancellation,
    // where a relative error means nothing; a wrong tensor still shows (lr·wd ≈ 5e-3 per step).
    let (mut got, mut want): ([Vec<f32>; 4], [Vec<f64>; 4]) = Default::default();
    for (((name, _), r), p0) in SHAPES.iter().zip(&refs).zip(&start) {
        let st = opt.state(name).unwrap();
        assert_eq!(st.step(), if *name == "d" { 3 } else { 6 }, "{name}");
        let p = values(&params, name);
        // The update itself (about 0.2 per element), not only the parameter it is added to.
        got[3].extend(p.iter().zip(p0).map(|(a, b)| a - b));
        want[3].extend(r.p.iter().zip(p0).map(|(a, &b)| a - b as f64));
        got[0].extend(p);
        got[1].extend(st.exp_avg().to_vec::<f32>().unwrap());
        got[2].extend(st.exp_avg_sq().to_vec::<f32>().unwrap());
        want[0].extend(&r.p);
        want[1].extend(&r.m);
        want[2].extend(&r.v);
    }
    let errs: Vec<f64> = got.iter().zip(&want).map(|(g, w)| rel_error(g, w)).collect();
    eprintln!("rel errors of p, m, v and of the update: {errs:?}");
    assert!(errs[..3].iter().all(|&e| e <= 1e-6) && errs[3] <= 1e-5, "rel errors of p, m, v, update: {errs:?}");
    assert_eq!(values(&params, "frozen"), frozen, "a frozen parameter must not move");
    assert!(opt.state("frozen").is_none());
}

#[test]
fn first_step_moves_each_weight_by_lr_thanks_to_bias_correction() {
    let mut rng = rng();
    let mut params = Params::new();
    let p0 = randn(&mut rng, 64);
    params.insert("w", cpu(p0.clone(), &[8, 8]), true).unwrap();
    // |g| >> eps, so m̂ / sqrt(v̂) = g / |g| exactly in exact arithmetic: each weight moves by lr.
    // Without the bias corrections it would move by lr (1 - b1) / sqrt(1 - b2) = 3.16 lr.
    let g: Vec<f32> = randn(&mut rng, 64).iter().map(|x| x.signum() * (0.5 + x.abs())).collect();
    params.set_grad("w", Some(cpu(g.clone(), &[8, 8]))).unwrap();
    let (lr, wd) = (1e-2, 0.5);
    let mut opt = AdamW::new(AdamWConfig { weight_decay: wd, ..AdamWConfig::new(lr) }).unwrap();
    opt.step(&mut params).unwrap();
    for ((&p, &p0), &g) in values(&params, "w").iter().zip(&p0).zip(&g) {
        let want = p0 as f64 * (1.0 - lr * wd) - lr * (g as f64).signum();
        // 4 ulps of the weight: the update (lr = 1e-2) is checked to ~1e-4 of itself.
        assert!((p as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(1.0), "{p} vs {want}");
    }
}

#[test]
fn bf16_gradients_give_the_same_step_as_their_f32_values() {
    let mut rng = rng();
    let (mut a, mut b) = (Params::new(), Params::new());
    let p0 = randn(&mut rng, 35);
    a.insert("w", cpu(p0.clone(), &[5, 7]), true).unwrap();
    b.insert("w", cpu(p0, &[5, 7]), true).unwrap();
    let (mut opt_a, mut opt_b) =
        (AdamW::new(AdamWConfig::new(1e-3)).unwrap(), AdamW::new(AdamWConfig::new(1e-3)).unwrap());
    for _ in 0..3 {
        let g: Vec<bf16> = randn(&mut rng, 35).into_iter().map(bf16::from_f32).collect();
        let widened: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
        a.set_grad("w", Some(Tensor::from_vec(g, [5, 7], &Device::Cpu).unwrap())).unwrap();
        b.set_grad("w", Some(cpu(widened, &[5, 7]))).unwrap();
        opt_a.step(&mut a).unwrap();
        opt_b.step(&mut b).unwrap();
        a.zero_grad();
        b.zero_grad();
    }
    assert_eq!(values(&a, "w"), values(&b, "w"));
}

#[test]
fn a_nonfinite_gradient_names_the_parameter_and_changes_nothing() {
    let mut rng = rng();
    let mut params = random_params(&mut rng);
    let mut opt = AdamW::new(AdamWConfig::new(0.1)).unwrap();
    for (name, dims) in SHAPES {
        params.set_grad(name, Some(cpu(randn(&mut rng, dims.iter().product()), dims))).unwrap();
    }
    opt.step(&mut params).unwrap();
    let before: Vec<Vec<f32>> = SHAPES.iter().map(|(n, _)| values(&params, n)).collect();
    for (bad, value) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        params.zero_grad();
        for (name, dims) in SHAPES {
            let mut g = randn(&mut rng, dims.iter().product());
            if name == "c.weight" {
                g[2 * 2 + 1] = bad; // [0, 2, 1] of [3, 5, 2]: row 2, column 1 of the last dim
            }
            params.set_grad(name, Some(cpu(g, dims))).unwrap();
        }
        let e = opt.step(&mut params).unwrap_err().to_string();
        assert!(e.contains("`c.weight`") && e.contains(value) && e.contains("[2, 1]"), "{e}");
        // All or nothing: the parameters before and after c.weight are untouched too.
        let after: Vec<Vec<f32>> = SHAPES.iter().map(|(n, _)| values(&params, n)).collect();
        assert_eq!(after, before);
        assert!(SHAPES.iter().all(|(n, _)| opt.state(n).unwrap().step() == 1));
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_parameter() {
    let mut params = Params::new();
    params.insert("w", cpu(vec![1.0; 6], &[2, 3]), true).unwrap();
    params.insert("v", cpu(vec![1.0; 3], &[3]), true).unwrap();
    let mut opt = AdamW::new(AdamWConfig::new(0.1)).unwrap();

    let e = params.set_grad("w", Some(cpu(vec![0.5; 6], &[3, 2]))).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("gradient of shape [3, 2] for a parameter of shape [2, 3]"), "{e}");
    // The tape's own accumulation does not check shapes; the step does.
    params.accumulate_grad("w", cpu(vec![0.5; 6], &[3, 2])).unwrap();
    let e = opt.step(&mut params).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("gradient of shape [3, 2] for a parameter of shape [2, 3]"), "{e}");
    params.zero_grad();

    // A live tape shares the value: updating it in place would change what the tape recorded.
    params.set_grad("v", Some(cpu(vec![0.5; 3], &[3]))).unwrap();
    let mut tape = Tape::new();
    tape.param(&params, "v").unwrap();
    let e = opt.step(&mut params).unwrap_err().to_string();
    assert!(e.contains("`v`") && e.contains("a tape still holds"), "{e}");
    drop(tape);
    opt.step(&mut params).unwrap();
    assert_eq!(opt.state("v").unwrap().step(), 1);

    let mut bf = Params::new();
    bf.insert("h", Tensor::from_vec(vec![bf16::ONE; 2], [2], &Device::Cpu).unwrap(), true).unwrap();
    bf.set_grad("h", Some(cpu(vec![1.0; 2], &[2]))).unwrap();
    let e = opt.step(&mut bf).unwrap_err().to_string();
    assert!(e.contains("`h`") && e.contains("f32 master weights"), "{e}");

    for bad in [
        AdamWConfig { betas: (1.0, 0.999), ..AdamWConfig::new(1e-3) },
        AdamWConfig { eps: -1.0, ..AdamWConfig::new(1e-3) },
        AdamWConfig::new(f64::NAN),
    ] {
        assert!(AdamW::new(bad).is_err(), "{bad:?}");
    }
}

/// Three steps, a save, a load into a fresh optimizer: both then take the same fourth step.
#[test]
fn state_round_trips_through_safetensors() {
    let mut rng = rng();
    let params0 = random_params(&mut rng);
    let snapshot = |p: &Params| -> Params {
        let mut q = Params::new();
        for x in p.iter() {
            q.insert(x.name(), cpu(x.value().to_vec::<f32>().unwrap(), x.value().dims()), x.trainable()).unwrap();
        }
        q
    };
    let config = AdamWConfig { weight_decay: 0.01, ..AdamWConfig::new(3e-3) };
    let mut a = snapshot(&params0);
    let mut opt_a = AdamW::new(config).unwrap();
    let grads = |rng: &mut StdRng| -> Vec<(&str, Vec<f32>)> {
        SHAPES.iter().map(|(n, d)| (*n, randn(rng, d.iter().product()))).collect()
    };
    for k in 0..3 {
        for (name, g) in grads(&mut rng) {
            if !(name == "d" && k == 1) {
                a.set_grad(name, Some(cpu(g, a.get(name).unwrap().dims()))).unwrap();
            }
        }
        opt_a.step(&mut a).unwrap();
        a.zero_grad();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    opt_a.save_state(&path).unwrap();
    let mut b = snapshot(&a);
    let mut opt_b = AdamW::new(config).unwrap();
    opt_b.load_state(&path, &b).unwrap();
    assert_eq!(opt_b.state("d").unwrap().step(), 2);
    assert_eq!(opt_b.state("a.weight").unwrap().step(), 3);
    for (name, g) in grads(&mut rng) {
        a.set_grad(name, Some(cpu(g.clone(), a.get(name).unwrap().dims()))).unwrap();
        b.set_grad(name, Some(cpu(g, b.get(name).unwrap().dims()))).unwrap();
    }
    opt_a.step(&mut a).unwrap();
    opt_b.step(&mut b).unwrap();
    for (name, _) in SHAPES {
        assert_eq!(values(&a, name), values(&b, name), "{name}");
        let (sa, sb) = (opt_a.state(name).unwrap(), opt_b.state(name).unwrap());
        assert_eq!(sa.step(), sb.step());
        assert_eq!(sa.exp_avg_sq().to_vec::<f32>().unwrap(), sb.exp_avg_sq().to_vec::<f32>().unwrap());
    }
}

#[test]
fn loading_a_bad_state_file_names_the_file_and_keeps_the_state() {
    let mut rng = rng();
    let mut params = random_params(&mut rng);
    let mut opt = AdamW::new(AdamWConfig::new(1e-3)).unwrap();
    for (name, dims) in SHAPES {
        params.set_grad(name, Some(cpu(randn(&mut rng, dims.iter().product()), dims))).unwrap();
    }
    opt.step(&mut params).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("state.safetensors");
    opt.save_state(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
    let e = opt.load_state(&truncated, &params).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors") && e.contains("truncated?"), "{e}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let e = opt.load_state(&garbage, &params).unwrap_err().to_string();
    assert!(e.contains("garbage.safetensors"), "{e}");

    // A state for parameters the model does not have, and one whose shapes differ.
    let mut other = Params::new();
    other.insert("a.weight", cpu(vec![0.0; 91], &[13, 7]), true).unwrap();
    let e = opt.load_state(&good, &other).unwrap_err().to_string();
    assert!(e.contains("state.safetensors") && e.contains("'a.weight.exp_avg' has shape [7, 13]"), "{e}");
    let e = opt.load_state(&good, &Params::new()).unwrap_err().to_string();
    assert!(e.contains("state.safetensors") && e.contains("not a parameter"), "{e}");

    let step_before = opt.state("a.weight").unwrap().step();
    assert_eq!(step_before, 1, "failed loads must keep the current state");
}

#[test]
fn clip_matches_the_f64_norm_and_scales_every_gradient() {
    let mut rng = rng();
    let mut params = random_params(&mut rng);
    let mut want = Vec::new();
    for (k, (name, dims)) in SHAPES.iter().enumerate() {
        let n = dims.iter().product();
        // Half the gradients in bf16: clipping must handle both.
        let g = if k % 2 == 0 {
            let v = randn(&mut rng, n);
            want.push(wide(&v));
            cpu(v, dims)
        } else {
            let v: Vec<bf16> = randn(&mut rng, n).into_iter().map(bf16::from_f32).collect();
            want.push(v.iter().map(|x| x.to_f64()).collect());
            Tensor::from_vec(v, dims.to_vec(), &Device::Cpu).unwrap()
        };
        params.set_grad(name, Some(g)).unwrap();
    }
    // A frozen parameter's gradient (a hook could leave one) takes no part.
    params.set_grad("frozen", Some(cpu(vec![1e3; 9], &[9]))).unwrap();
    let norm_ref = want.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();

    // Not clipped: the norm comes back and the gradients stay bit for bit.
    let before: Vec<Vec<f32>> =
        SHAPES.iter().map(|(n, _)| params.grad(n).unwrap().unwrap().to_f32_vec().unwrap()).collect();
    let norm = clip_grad_norm(&mut params, (norm_ref * 2.0) as f32).unwrap();
    assert!((norm as f64 - norm_ref).abs() <= 1e-6 * norm_ref, "{norm} vs {norm_ref}");
    let after: Vec<Vec<f32>> =
        SHAPES.iter().map(|(n, _)| params.grad(n).unwrap().unwrap().to_f32_vec().unwrap()).collect();
    assert_eq!(before, after);

    let max_norm = (norm_ref / 3.0) as f32;
    let norm = clip_grad_norm(&mut params, max_norm).unwrap();
    assert!((norm as f64 - norm_ref).abs() <= 1e-6 * norm_ref, "{norm} vs {norm_ref}");
    let coef = max_norm as f64 / (norm_ref + 1e-6);
    for (k, ((name, _), w)) in SHAPES.iter().zip(&want).enumerate() {
        let got = params.grad(name).unwrap().unwrap().to_f32_vec().unwrap();
        let scaled: Vec<f64> = w.iter().map(|x| x * coef).collect();
        let e = rel_error(&got, &scaled);
        let tol = if k % 2 == 0 { 1e-6 } else { 4e-3 }; // bf16 results round to 8 bits
        assert!(e <= tol, "{name}: clipped gradient rel error {e}");
    }
    let clipped = clip_grad_norm(&mut params, f32::INFINITY).unwrap() as f64;
    assert!((clipped - max_norm as f64).abs() <= 4e-3 * max_norm as f64, "{clipped} vs {max_norm}");
    assert_eq!(values(&params, "frozen").len(), 9);
    assert_eq!(params.grad("frozen").unwrap().unwrap().to_vec::<f32>().unwrap(), vec![1e3; 9]);
}

#[test]
fn clip_names_the_first_parameter_with_a_nonfinite_gradient() {
    let mut rng = rng();
    let mut params = random_params(&mut rng);
    for (name, dims) in SHAPES {
        let mut g = randn(&mut rng, dims.iter().product());
        match name {
            "b.bias" => g[17] = f32::INFINITY,
            "c.weight" => g[0] = f32::NAN,
            _ => {}
        }
        params.set_grad(name, Some(cpu(g, dims))).unwrap();
    }
    let before = params.grad("a.weight").unwrap().unwrap().to_vec::<f32>().unwrap();
    let e = clip_grad_norm(&mut params, 1e-3).unwrap_err().to_string();
    assert!(e.contains("`b.bias`") && e.contains("inf at [0, 17]"), "{e}");
    assert_eq!(params.grad("a.weight").unwrap().unwrap().to_vec::<f32>().unwrap(), before);
    assert!(clip_grad_norm(&mut params, 0.0).is_err());
    assert!(clip_grad_norm(&mut params, f32::NAN).is_err());
}

#[test]
fn a_whole_training_step_on_the_tape() {
    // x W^T against targets, the tape dropped by backward, then clip and step: the loss drops.
    let mut rng = rng();
    let mut params = Params::new();
    params.insert("w", cpu(randn(&mut rng, 12), &[3, 4]), true).unwrap();
    let x = randn(&mut rng, 8);
    // 60 steps at up to 0.1: enough for every random start to fit two examples (20 steps at 0.05
    // left some seeds just short of halving the loss).
    let mut opt = AdamW::new(AdamWConfig::new(0.1)).unwrap();
    let schedule = LrSchedule::new(0.1, 2, 60, Decay::Cosine).unwrap();
    let loss = |p: &mut Params, backward: bool| -> f32 {
        let mut tape = Tape::new();
        let xv = tape.constant(cpu(x.clone(), &[2, 4]));
        let w = tape.param(p, "w").unwrap();
        let y = tape.linear(xv, w).unwrap();
        let l = tape.cross_entropy(y, &[2, 0]).unwrap();
        let value = tape.value(l).to_vec::<f32>().unwrap()[0];
        if backward {
            tape.backward(l, p, None).unwrap();
        }
        value
    };
    let first = loss(&mut params, false);
    for k in 0..60 {
        loss(&mut params, true);
        clip_grad_norm(&mut params, 1.0).unwrap();
        opt.set_lr(schedule.lr_at(k)).unwrap();
        opt.step(&mut params).unwrap();
        params.zero_grad();
    }
    let last = loss(&mut params, false);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}
