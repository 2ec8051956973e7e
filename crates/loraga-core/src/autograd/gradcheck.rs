//! Finite-difference gradient checks for the tape's ops (tests only).
//!
//! For a random seed R, the analytic gradients of f(x) = sum(op(x) * R) from the tape are compared
//! with central differences (f(x + eps e) - f(x - eps e)) / 2 eps, where f is evaluated with
//! the same f32 forward and summed in f64. With eps = 1e-3 the truncation error is ~1e-6 relative
//! and f32 rounding contributes ~1e-4, so 1e-2 relative error separates a correct backward from
//! a wrong one (a wrong sign or a missing term gives O(1)).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Params, Tape, Var};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::Tensor;
use crate::testing::{randn, rel_error};

const EPS: f32 = 1e-3;
const TOL: f64 = 1e-2;

fn leaves(tape: &mut Tape, inputs: &[(Vec<f32>, Vec<usize>)], requires_grad: bool) -> Vec<Var> {
    inputs
        .iter()
        .map(|(v, s)| tape.leaf(Tensor::from_vec(v.clone(), s.clone(), &Device::Cpu).unwrap(), requires_grad))
        .collect()
}

fn eval(build: &dyn Fn(&mut Tape, &[Var]) -> Result<Var>, inputs: &[(Vec<f32>, Vec<usize>)], seed: &[f32]) -> f64 {
    let mut tape = Tape::new();
    let vars = leaves(&mut tape, inputs, false);
    let y = build(&mut tape, &vars).unwrap();
    let out = tape.value(y).to_vec::<f32>().unwrap();
    out.iter().zip(seed).map(|(&o, &r)| o as f64 * r as f64).sum()
}

/// Checks the gradient of every input, each filled with standard-normal values of `shapes[i]`.
pub(crate) fn check(name: &str, shapes: &[&[usize]], build: impl Fn(&mut Tape, &[Var]) -> Result<Var>) {
    let mut rng = ChaCha8Rng::seed_from_u64(name.len() as u64 * 7919);
    let inputs: Vec<(Vec<f32>, Vec<usize>)> =
        shapes.iter().map(|s| (randn(&mut rng, s.iter().product()), s.to_vec())).collect();

    let mut tape = Tape::new();
    let vars = leaves(&mut tape, &inputs, true);
    let y = build(&mut tape, &vars).unwrap();
    let out_shape = tape.value(y).dims().to_vec();
    let seed = randn(&mut rng, out_shape.iter().product());
    let seed_t = Tensor::from_vec(seed.clone(), out_shape, &Device::Cpu).unwrap();
    let grads = tape.backward_with(y, seed_t, &mut Params::new(), None).unwrap();

    for (i, var) in vars.iter().enumerate() {
        let analytic =
            grads.get(*var).map(|g| g.to_vec::<f32>().unwrap()).unwrap_or_else(|| vec![0.0; inputs[i].0.len()]);
        let mut numeric = Vec::with_capacity(analytic.len());
        for e in 0..inputs[i].0.len() {
            let mut plus = inputs.clone();
            plus[i].0[e] += EPS;
            let mut minus = inputs.clone();
            minus[i].0[e] -= EPS;
            numeric.push((eval(&build, &plus, &seed) - eval(&build, &minus, &seed)) / (2.0 * EPS as f64));
        }
        let err = rel_error(&analytic, &numeric);
        assert!(err < TOL, "{name}: input {i}: relative error {err:.2e} between the backward and finite differences");
    }
}
