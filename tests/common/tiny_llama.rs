//! Tiny random Llamas for tests.

use loraga_core::autograd::Params;
use loraga_core::lora::{LoraConfig, LoraTarget, lora_b_name};
use loraga_core::model::{Llama, LlamaConfig};
use loraga_core::testing::randn;
use loraga_core::{Device, Tensor};
use rand::Rng;

/// GQA, non-square MLP, 2 layers: q/o [16, 16], k/v [8, 16], gate/up [24, 16], down [16, 24].
pub fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        vocab_size: 37,
        tie_word_embeddings: tied,
        max_position_embeddings: 64,
    }
}

/// Random frozen weights for every base weight of `c`: norms 1 + 0.1 N(0, 1), others `std` N(0, 1).
pub fn random_params(c: &LlamaConfig, std: f32, rng: &mut impl Rng) -> Params {
    let mut p = Params::new();
    for (name, shape) in c.weight_shapes() {
        let n = shape.iter().product();
        let (offset, scale) = if name.ends_with("norm.weight") { (1.0, 0.1) } else { (0.0, std) };
        let v: Vec<f32> = randn(rng, n).iter().map(|x| offset + scale * x).collect();
        p.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap(), false).unwrap();
    }
    p
}

/// A 3-layer GQA Llama (4 heads over 2 KV heads, head_dim 8, vocab 53, 40 positions) with random
/// base weights (std 0.3) and LoRA (r 3) on every module, B random too so that it shows.
pub fn with_random_lora(tied: bool, rng: &mut impl Rng) -> (Llama, Params) {
    let c = LlamaConfig {
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        vocab_size: 53,
        tie_word_embeddings: tied,
        max_position_embeddings: 40,
    };
    let mut p = random_params(&c, 0.3, rng);
    let mut m = Llama::new(c.clone()).unwrap();
    let lora = LoraConfig { r: 3, alpha: 6.0, use_rslora: false, targets: LoraTarget::ALL.to_vec() };
    m.add_lora(&mut p, lora, rng).unwrap();
    for l in 0..c.num_hidden_layers {
        for t in LoraTarget::ALL {
            let name = lora_b_name(&t.module_path(l));
            let dims = p.get(&name).unwrap().dims().to_vec();
            let b: Vec<f32> = randn(rng, dims[0] * dims[1]).iter().map(|x| 0.2 * x).collect();
            p.set_value(&name, Tensor::from_vec(b, dims, &Device::Cpu).unwrap()).unwrap();
        }
    }
    (m, p)
}

/// `n` random token ids below `vocab`.
pub fn random_ids(rng: &mut impl Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}
