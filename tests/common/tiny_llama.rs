//! Tiny random Llamas for CPU tests.

use loraga_core::autograd::Params;
use loraga_core::model::LlamaConfig;
use loraga_core::testing::randn;
use loraga_core::{Device, Tensor};
use rand::Rng;

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
