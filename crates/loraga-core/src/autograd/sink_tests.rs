//! Gradient sinks against the tape's ordinary gradients: the same sums, added in place, for
//! trainable and frozen weights, through a cast and a tied (embedding + linear) weight; the op is
//! not asked for a sunk weight's gradient; bad buffers and undeclared sinks are errors by name.

use std::cell::RefCell;
use std::rc::Rc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::tape::WeightGrad;
use super::{GradSinks, HookAction, LeafGrads, Params, Tape, Var};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;
use crate::testing::{randn, rel_error};

const IDS: [u32; 6] = [3, 0, 3, 6, 1, 2];
const TARGETS: [i64; 6] = [1, 4, 0, 6, 2, 2];

fn t(v: Vec<f32>, s: &[usize]) -> Tensor {
    Tensor::from_vec(v, s.to_vec(), &Device::Cpu).unwrap()
}

struct Toy {
    params: Params,
    x: Vec<f32>,
}

/// `emb` [7, 5] is tied: an embedding table and, through a cast, the output head; `proj` [5, 4]
/// is a plain linear weight; `norm` stays frozen.
fn toy(rng: &mut ChaCha8Rng, trainable: bool) -> Toy {
    let mut params = Params::new();
    params.insert("emb", t(randn(rng, 35), &[7, 5]), trainable).unwrap();
    params.insert("proj", t(randn(rng, 20), &[5, 4]), trainable).unwrap();
    params.insert("norm", t(randn(rng, 4), &[4]), false).unwrap();
    Toy { params, x: randn(rng, 24) }
}

fn forward(tape: &mut Tape, toy: &Toy) -> Result<(Var, Var)> {
    let x = tape.leaf(t(toy.x.clone(), &[6, 4]), true);
    let (emb, proj, norm) =
        (tape.param(&toy.params, "emb")?, tape.param(&toy.params, "proj")?, tape.param(&toy.params, "norm")?);
    let n = tape.rms_norm(x, norm, 1e-5)?;
    let h = tape.linear(n, proj)?;
    let e = tape.embedding(&IDS, emb)?;
    let s = tape.add(h, e)?;
    let head = tape.cast(emb, DType::F32)?;
    let logits = tape.linear(s, head)?;
    Ok((x, tape.cross_entropy(logits, &TARGETS)?))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

#[test]
fn sinks_receive_alpha_times_the_ordinary_gradient_in_place() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut plain = toy(&mut rng, true);
    let mut tape = Tape::new();
    let (x, loss) = forward(&mut tape, &plain).unwrap();
    let want_dx = f32s(tape.backward(loss, &mut plain.params, None).unwrap().get(x).unwrap());
    let want = |name: &str| f32s(plain.params.grad(name).unwrap().unwrap());

    for trainable in [true, false] {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let mut sunk = toy(&mut rng, trainable);
        // Buffers that already hold a sum: the sink adds to them.
        let (b_emb, b_proj) = (randn(&mut rng, 35), randn(&mut rng, 20));
        let (mut g_emb, mut g_proj) = (t(b_emb.clone(), &[7, 5]), t(b_proj.clone(), &[5, 4]));
        let mut tape = Tape::new();
        tape.sink("emb").unwrap();
        tape.sink("proj").unwrap();
        let (x, loss) = forward(&mut tape, &sunk).unwrap();
        let mut sinks = GradSinks::new();
        sinks.insert(&sunk.params, "emb", &mut g_emb, 0.5).unwrap();
        sinks.insert(&sunk.params, "proj", &mut g_proj, 1.0).unwrap();
        let mut seen = Vec::new();
        let mut hook = |name: &str, _: &Tensor| {
            seen.push(name.to_string());
            Ok(HookAction::Keep)
        };
        let leaves: LeafGrads = tape.backward_into(loss, &mut sunk.params, Some(&mut hook), &mut sinks).unwrap();
        assert_eq!(f32s(leaves.get(x).unwrap()), want_dx, "the input's gradient is untouched");
        assert!(sinks.reached("emb") && sinks.reached("proj"));
        drop(sinks);
        assert!(seen.is_empty(), "the hook saw {seen:?}");
        for name in ["emb", "proj"] {
            assert!(sunk.params.grad(name).unwrap().is_none(), "{name}: no gradient kept in the parameters");
        }
        for (name, got, before, alpha) in [("emb", &g_emb, &b_emb, 0.5), ("proj", &g_proj, &b_proj, 1.0)] {
            let reference: Vec<f64> =
                before.iter().zip(want(name)).map(|(b, g)| f64::from(*b) + alpha * f64::from(g)).collect();
            let e = rel_error(&f32s(got), &reference);
            assert!(e < 1e-6, "{name} (trainable: {trainable}): {e:.2e}");
        }
    }
}

#[test]
fn the_op_is_not_asked_for_a_sunk_weight_gradient() {
    let asked = Rc::new(RefCell::new(Vec::new()));
    let run = |sink: bool| {
        let mut params = Params::new();
        params.insert("w", t(vec![1.0, -2.0, 0.5, 3.0, 0.25, -1.0], &[2, 3]), true).unwrap();
        let mut tape = Tape::new();
        if sink {
            tape.sink("w").unwrap();
        }
        let x = tape.leaf(t(vec![0.5, 1.0, -1.5, 2.0, 0.0, 1.0], &[2, 3]), true);
        let w = tape.param(&params, "w").unwrap();
        let y = tape.value(x).matmul_t(tape.value(w)).unwrap();
        let log = asked.clone();
        // A linear op whose backward records what it is asked for (it answers dx only).
        let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            log.borrow_mut().push(needs.to_vec());
            let dx = dy.matmul(inp[1])?;
            let dw = needs[1].then(|| Tensor::zeros(inp[1].dims(), DType::F32, &Device::Cpu)).transpose()?;
            Ok(vec![Some(dx), dw])
        });
        let y = tape.push_weight_op("probe", y, &[x, w], back, Some(WeightGrad { weight: 1, x: 0 }));
        let loss = tape.cross_entropy(y, &[0, 1]).unwrap();
        let mut g = Tensor::zeros([2, 3], DType::F32, &Device::Cpu).unwrap();
        let mut sinks = GradSinks::new();
        if sink {
            sinks.insert(&params, "w", &mut g, 1.0).unwrap();
        }
        tape.backward_into(loss, &mut params, None, &mut sinks).unwrap();
    };
    run(false);
    run(true);
    assert_eq!(*asked.borrow(), vec![vec![true, true], vec![true, false]]);
}

#[test]
fn bad_sinks_are_errors_naming_the_weight() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut toy = toy(&mut rng, true);
    let p = &toy.params;
    let mut bf16 = Tensor::zeros([7, 5], DType::BF16, &Device::Cpu).unwrap();
    let e = GradSinks::new().insert(p, "emb", &mut bf16, 1.0).unwrap_err().to_string();
    assert!(e.contains("`emb`") && e.contains("bf16") && e.contains("f32"), "{e}");
    let mut wrong = Tensor::zeros([5, 7], DType::F32, &Device::Cpu).unwrap();
    let e = GradSinks::new().insert(p, "emb", &mut wrong, 1.0).unwrap_err().to_string();
    assert!(e.contains("`emb`") && e.contains("[5, 7]") && e.contains("[7, 5]"), "{e}");
    let mut ok = Tensor::zeros([7, 5], DType::F32, &Device::Cpu).unwrap();
    let e = GradSinks::new().insert(p, "nope", &mut ok, 1.0).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");

    // Declared but not given, given but not declared, declared after its first use.
    let mut tape = Tape::new();
    tape.sink("emb").unwrap();
    let (_, loss) = forward(&mut tape, &toy).unwrap();
    let e = tape.backward(loss, &mut toy.params, None).unwrap_err().to_string();
    assert!(e.contains("`emb`") && e.contains("no sink buffer"), "{e}");
    let mut tape = Tape::new();
    let (_, loss) = forward(&mut tape, &toy).unwrap();
    let mut sinks = GradSinks::new();
    sinks.insert(&toy.params, "emb", &mut ok, 1.0).unwrap();
    let e = tape.backward_into(loss, &mut toy.params, None, &mut sinks).unwrap_err().to_string();
    assert!(e.contains("`emb`") && e.contains("never declared"), "{e}");
    let mut tape = Tape::new();
    forward(&mut tape, &toy).unwrap();
    let e = tape.sink("proj").unwrap_err().to_string();
    assert!(e.contains("`proj`") && e.contains("before the forward pass"), "{e}");
}
