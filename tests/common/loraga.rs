//! A tiny random Llama and batches for the LoRA-GA tests, and the f64 matrix helpers they check
//! with.

use faer::Mat;
use loraga_core::autograd::{Params, Tape};
use loraga_core::lora::{LoraConfig, LoraTarget};
use loraga_core::model::{Batch, Llama, LlamaConfig};
use loraga_core::testing::randn;
use loraga_core::{Device, Tensor};
use rand::Rng;

/// The shared tiny config (tests/common/tiny_llama.rs) with an untied head.
pub fn tiny_config() -> LlamaConfig {
    super::tiny_llama::config(false)
}

/// Every base weight random (std 0.3; norms 1 ± 0.1), frozen.
pub fn random_model(c: &LlamaConfig, rng: &mut impl Rng) -> (Llama, Params) {
    (Llama::new(c.clone()).unwrap(), super::tiny_llama::random_params(c, 0.3, rng))
}

/// `n` batches of 2 rows of `seq` tokens; the second row right-padded, a 2-token prompt ignored.
pub fn random_batches(c: &LlamaConfig, rng: &mut impl Rng, n: usize, seq: usize) -> Vec<Batch> {
    (0..n)
        .map(|_| {
            let len = rng.random_range(seq / 2..seq);
            let ids: Vec<u32> = (0..2 * seq).map(|_| rng.random_range(0..c.vocab_size as u32)).collect();
            let mask: Vec<bool> = (0..2 * seq).map(|i| i < seq || i - seq < len).collect();
            let labels = (0..2 * seq).map(|i| if !mask[i] || i % seq < 2 { -100 } else { ids[i] as i64 }).collect();
            Batch { batch: 2, seq, input_ids: ids, attention_mask: Some(mask), labels: Some(labels) }
        })
        .collect()
}

pub fn lora_config(r: usize, alpha: f32, use_rslora: bool) -> LoraConfig {
    LoraConfig { r, alpha, use_rslora, targets: LoraTarget::ALL.to_vec() }
}

/// Logits at the real (unpadded) tokens.
pub fn logits(model: &Llama, params: &Params, batch: &Batch) -> Vec<f32> {
    let mut tape = Tape::new();
    let out = model.forward(&mut tape, params, batch).unwrap();
    let v = model.config.vocab_size;
    let all = tape.value(out.logits).to_f32_vec().unwrap();
    let mask = batch.attention_mask.clone().unwrap_or(vec![true; all.len() / v]);
    all.chunks(v).zip(mask).filter(|(_, m)| *m).flat_map(|(row, _)| row.to_vec()).collect()
}

/// A tensor as an f64 matrix (any dtype, widened exactly).
pub fn mat(t: &Tensor) -> Mat<f64> {
    let (r, c) = (t.dims()[0], t.dims()[1]);
    let v = t.to_f32_vec().unwrap();
    Mat::from_fn(r, c, |i, j| v[i * c + j] as f64)
}

/// ‖got − want‖_F / ‖want‖_F.
pub fn rel(got: &Mat<f64>, want: &Mat<f64>) -> f64 {
    let e = (got - want).norm_l2() / want.norm_l2();
    if e.is_nan() { f64::INFINITY } else { e }
}

pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A copy of every parameter (values and trainable flags; no gradients).
pub fn clone_params(p: &Params) -> Params {
    let mut out = Params::new();
    for x in p.iter() {
        let v = x.value();
        let copy = Tensor::from_cpu(v.storage().to_cpu().unwrap(), v.shape().clone(), &Device::Cpu).unwrap();
        out.insert(x.name(), copy, x.trainable()).unwrap();
    }
    out
}

pub fn scaled(m: &Mat<f64>, s: f64) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| s * m[(i, j)])
}

/// Moves every A and B of `state` by ~10% of its RMS, as training would.
pub fn move_adapters(p: &mut Params, state: &loraga_core::loraga::InitState, rng: &mut impl Rng) {
    for l in &state.layers {
        for name in [loraga_core::lora::lora_a_name(&l.module), loraga_core::lora::lora_b_name(&l.module)] {
            let t = p.get(&name).unwrap();
            let v = t.to_f32_vec().unwrap();
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt().max(1e-3);
            let moved: Vec<f32> = v.iter().zip(randn(rng, v.len())).map(|(x, z)| x + 0.1 * rms * z).collect();
            let dims = t.dims().to_vec();
            p.set_value(&name, Tensor::from_vec(moved, dims, &Device::Cpu).unwrap()).unwrap();
        }
    }
}
