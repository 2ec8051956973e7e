//! The tape's bookkeeping (hooks, accumulation, frozen parameters) and a finite-difference check
//! of every op's backward.

use std::sync::Arc;

use super::gradcheck::check;
use super::{AttentionShape, HookAction, IGNORE_INDEX, Params, RopeTable, Tape};
use crate::device::Device;
use crate::tensor::Tensor;

fn t(v: Vec<f32>, s: &[usize]) -> Tensor {
    Tensor::from_vec(v, s.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn gradcheck_linear_add_mul_scale() {
    check("linear", &[&[5, 3], &[4, 3]], |t, v| t.linear(v[0], v[1]));
    check("add", &[&[3, 4], &[3, 4]], |t, v| t.add(v[0], v[1]));
    check("mul", &[&[3, 4], &[3, 4]], |t, v| t.mul(v[0], v[1]));
    check("scale", &[&[3, 4]], |t, v| t.scale(v[0], -1.7));
    check("cast", &[&[3, 4]], |t, v| t.cast(v[0], crate::DType::F32));
    // A graph that reuses a value: y = (x W^T) * (x W^T) + x W^T.
    check("reuse", &[&[3, 4], &[2, 4]], |t, v| {
        let y = t.linear(v[0], v[1])?;
        let sq = t.mul(y, y)?;
        t.add(sq, y)
    });
}

#[test]
fn gradcheck_embedding_silu_swiglu_rmsnorm() {
    // Token 2 appears twice: its row's gradient must be the sum.
    check("embedding", &[&[5, 3]], |t, v| t.embedding(&[2, 0, 2, 4], v[0]));
    check("silu", &[&[4, 5]], |t, v| t.silu(v[0]));
    check("swiglu", &[&[4, 5], &[4, 5]], |t, v| t.swiglu(v[0], v[1]));
    check("rms_norm", &[&[3, 6], &[6]], |t, v| t.rms_norm(v[0], v[1], 1e-5));
}

#[test]
fn gradcheck_rope() {
    let table = Arc::new(RopeTable::new(4, 8, 10000.0).unwrap());
    // Two sequences of three tokens, two heads of dimension 4.
    check("rope", &[&[6, 8]], move |t, v| t.rope(v[0], &table, &[0, 1, 2, 0, 1, 5]));
}

#[test]
fn gradcheck_attention_gqa_with_padding() {
    let s = AttentionShape { batch: 2, seq: 4, n_heads: 4, n_kv_heads: 2, head_dim: 3 };
    // Sequence 0 is right-padded (last token), sequence 1 left-padded (first token: it sees no
    // key and must get zero output and gradient, not NaN).
    let mask = [true, true, true, false, false, true, true, true];
    check("attention", &[&[8, 12], &[8, 6], &[8, 6]], move |t, v| t.attention(v[0], v[1], v[2], s, Some(&mask)));
    let s1 = AttentionShape { batch: 1, seq: 5, n_heads: 2, n_kv_heads: 2, head_dim: 2 };
    check("attention_nomask", &[&[5, 4], &[5, 4], &[5, 4]], move |t, v| t.attention(v[0], v[1], v[2], s1, None));
}

#[test]
fn gradcheck_cross_entropy() {
    check("cross_entropy", &[&[5, 7]], |t, v| t.cross_entropy(v[0], &[3, IGNORE_INDEX, 0, 6, IGNORE_INDEX]));
}

#[test]
fn cross_entropy_matches_by_hand_and_rejects_bad_targets() {
    let mut tape = Tape::new();
    let l = tape.constant(t(vec![0.0, 0.0, 1.0, 2.0, 0.5, 0.5], &[2, 3]));
    let y = tape.cross_entropy(l, &[2, IGNORE_INDEX]).unwrap();
    let want = (2.0 + 1.0f64.exp()).ln() - 1.0; // row [0, 0, 1], class 2
    assert!((tape.value(y).to_vec::<f32>().unwrap()[0] as f64 - want).abs() < 1e-6);
    assert!(tape.cross_entropy(l, &[IGNORE_INDEX, IGNORE_INDEX]).unwrap_err().to_string().contains("every target"));
    assert!(tape.cross_entropy(l, &[3, 0]).unwrap_err().to_string().contains("target 3 at row 0"));
    assert!(tape.cross_entropy(l, &[0]).unwrap_err().to_string().contains("1 targets for 2 rows"));
}

#[test]
fn attention_masks_future_and_padding() {
    // One head of dimension 1, values 1, 10, 100: query 1 sees keys 0 and 1 only, and with key 0
    // masked it sees key 1 only.
    let s = AttentionShape { batch: 1, seq: 3, n_heads: 1, n_kv_heads: 1, head_dim: 1 };
    let mut tape = Tape::new();
    let q = tape.constant(t(vec![0.0; 3], &[3, 1]));
    let k = tape.constant(t(vec![0.0; 3], &[3, 1]));
    let v = tape.constant(t(vec![1.0, 10.0, 100.0], &[3, 1]));
    let o = tape.attention(q, k, v, s, None).unwrap();
    let close = |got: Vec<f32>, want: [f32; 3]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-4);
    assert!(close(tape.value(o).to_vec::<f32>().unwrap(), [1.0, 5.5, 37.0]));
    let o = tape.attention(q, k, v, s, Some(&[false, true, true])).unwrap();
    assert!(close(tape.value(o).to_vec::<f32>().unwrap(), [0.0, 10.0, 55.0]));
}

/// A two-layer toy: y = sum-free loss of ((x W1^T) W2^T) against targets.
fn toy_params() -> Params {
    let mut p = Params::new();
    p.insert("w1", t(vec![0.5, -1.0, 0.25, 2.0, 1.0, 0.0], &[2, 3]), true).unwrap();
    p.insert("w2", t(vec![1.0, 2.0, -1.0, 0.5, 0.0, 1.0], &[3, 2]), true).unwrap();
    p.insert("frozen", t(vec![1.0, 1.0, 1.0], &[3]), false).unwrap();
    p
}

fn toy_loss(tape: &mut Tape, p: &Params, x: Vec<f32>) -> super::Var {
    let x = tape.constant(t(x, &[2, 3]));
    let (w1, w2, f) = (tape.param(p, "w1").unwrap(), tape.param(p, "w2").unwrap(), tape.param(p, "frozen").unwrap());
    let n = tape.rms_norm(x, f, 1e-5).unwrap();
    let h = tape.linear(n, w1).unwrap();
    let y = tape.linear(h, w2).unwrap();
    tape.cross_entropy(y, &[1, 2]).unwrap()
}

#[test]
fn gradients_accumulate_and_frozen_params_get_none() {
    let mut p = toy_params();
    let (xa, xb) = (vec![1.0, 2.0, 3.0, -1.0, 0.5, 2.0], vec![0.3, -2.0, 1.0, 1.0, 1.0, -0.5]);
    let single = |x: Vec<f32>| {
        let mut q = toy_params();
        let mut tape = Tape::new();
        let l = toy_loss(&mut tape, &q, x);
        tape.backward(l, &mut q, None).unwrap();
        q.grad("w1").unwrap().unwrap().to_vec::<f32>().unwrap()
    };
    for x in [xa.clone(), xb.clone()] {
        let mut tape = Tape::new();
        let l = toy_loss(&mut tape, &p, x);
        tape.backward(l, &mut p, None).unwrap();
    }
    let sum: Vec<f32> = single(xa).iter().zip(single(xb)).map(|(a, b)| a + b).collect();
    assert_eq!(p.grad("w1").unwrap().unwrap().to_vec::<f32>().unwrap(), sum);
    assert!(p.grad("frozen").unwrap().is_none());
    p.zero_grad();
    assert!(p.grad("w1").unwrap().is_none());
}

#[test]
fn hook_sees_each_gradient_once_as_soon_as_it_is_final() {
    let mut p = toy_params();
    let mut tape = Tape::new();
    let l = toy_loss(&mut tape, &p, vec![1.0, 2.0, 3.0, -1.0, 0.5, 2.0]);
    let mut seen = Vec::new();
    let mut hook = |name: &str, g: &Tensor| {
        seen.push((name.to_string(), g.dims().to_vec()));
        Ok(if name == "w2" { HookAction::Drop } else { HookAction::Keep })
    };
    tape.backward(l, &mut p, Some(&mut hook)).unwrap();
    // w2 is used last, so its gradient is final first; frozen parameters are not shown.
    assert_eq!(seen, vec![("w2".to_string(), vec![3, 2]), ("w1".to_string(), vec![2, 3])]);
    assert!(p.grad("w2").unwrap().is_none(), "a dropped gradient must not be accumulated");
    assert!(p.grad("w1").unwrap().is_some());
}

#[test]
fn tied_parameter_gets_one_summed_gradient() {
    // y = E[ids] E^T (a tied embedding and head): one hook call with both uses summed.
    let mut p = Params::new();
    p.insert("emb", t(vec![0.1, 0.2, -0.3, 0.4, 0.5, -0.6], &[3, 2]), true).unwrap();
    let mut tape = Tape::new();
    let e = tape.param(&p, "emb").unwrap();
    let x = tape.embedding(&[0, 2], e).unwrap();
    let e2 = tape.param(&p, "emb").unwrap();
    assert_eq!(e, e2);
    let logits = tape.linear(x, e2).unwrap();
    let l = tape.cross_entropy(logits, &[1, 0]).unwrap();
    let mut calls = 0;
    let mut hook = |_: &str, _: &Tensor| {
        calls += 1;
        Ok(HookAction::Keep)
    };
    tape.backward(l, &mut p, Some(&mut hook)).unwrap();
    assert_eq!(calls, 1);
    check("tied", &[&[3, 2]], |t, v| {
        let x = t.embedding(&[0, 2], v[0])?;
        let logits = t.linear(x, v[0])?;
        t.cross_entropy(logits, &[1, 0])
    });
}

#[test]
fn errors_name_the_problem() {
    let mut tape = Tape::new();
    let x = tape.constant(t(vec![0.0; 6], &[2, 3]));
    let w = tape.constant(t(vec![0.0; 8], &[2, 4]));
    assert!(tape.linear(x, w).unwrap_err().to_string().contains("weight is [2, 4]"));
    assert!(tape.embedding(&[3], x).unwrap_err().to_string().contains("token id 3"));
    let bf = tape.constant(Tensor::zeros([2, 3], crate::DType::BF16, &Device::Cpu).unwrap());
    assert!(tape.add(x, bf).unwrap_err().to_string().contains("f32 tensors, got bf16"));
    let e = tape.cast(x, crate::DType::BF16).unwrap_err().to_string();
    assert!(e.contains("keep f32 only, asked for bf16"), "{e}");
    assert!(tape.cast(bf, crate::DType::F32).unwrap_err().to_string().contains("f32 tensors, got bf16"));
    let mut p = Params::new();
    assert!(tape.param(&p, "nope").unwrap_err().to_string().contains("`nope`"));
    p.insert("a", t(vec![0.0], &[1]), true).unwrap();
    assert!(p.insert("a", t(vec![0.0], &[1]), true).is_err());
    let y = tape.add(x, x).unwrap();
    assert!(tape.backward(y, &mut p, None).unwrap_err().to_string().contains("one element"));
}

#[test]
fn rope_rotates_halves_as_hugging_face() {
    // head_dim 4 at position 1, theta 10000: angles [1, 0.01] for pairs (0, 2) and (1, 3).
    let table = Arc::new(RopeTable::new(4, 2, 10000.0).unwrap());
    let mut tape = Tape::new();
    let x = tape.constant(t(vec![1.0, 2.0, 3.0, 4.0], &[1, 4]));
    let y = tape.rope(x, &table, &[1]).unwrap();
    let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.01f32.cos(), 0.01f32.sin());
    let want = [1.0 * c1 - 3.0 * s1, 2.0 * c2 - 4.0 * s2, 3.0 * c1 + 1.0 * s1, 4.0 * c2 + 2.0 * s2];
    let got = tape.value(y).to_vec::<f32>().unwrap();
    assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} vs {want:?}");
    let y0 = tape.rope(x, &table, &[0]).unwrap();
    assert_eq!(tape.value(y0).to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0], "position 0 is the identity");
    assert!(tape.rope(x, &table, &[2]).unwrap_err().to_string().contains("position 2"));
}
