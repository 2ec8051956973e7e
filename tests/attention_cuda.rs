//! Grouped-query causal attention and cross-entropy on CUDA (`loraga_core::cuda::attention`,
//! `loraga_core::cuda::cross_entropy`, and the tape ops that dispatch to them) against the CPU
//! tape on the same inputs: forward values and every gradient, f32 and bf16. Every test needs a
//! CUDA GPU and fails without one (run with `--include-ignored`). Inputs are fresh each run (the
//! seed is printed; LORAGA_TEST_SEED replays one).
//!
//! Each case runs twice on the GPU: through the tape (dispatch, dtypes, devices, leaf
//! gradients), and through the launchers directly with every output poisoned with NaN first, so
//! an element a kernel forgets to write fails the check.
//!
//! Tolerances, by ||gpu − cpu|| / ||cpu||:
//! - f32: 1e-5. cuBLAS runs with CUBLAS_COMPUTE_32F (full fp32, no TF32) and the softmax in f32,
//!   so both sides carry only f32 rounding in different summation orders (~1e-6 for sums of up
//!   to a few hundred terms).
//! - bf16 attention: 1e-2. Inputs are the same bf16 values on both sides; the GPU rounds P and dS
//!   to bf16 (they are GEMM operands) and the results to bf16. A numpy model of exactly these
//!   roundings gives 2e-3 (O) to 3e-3 (dQ, dK) on these shapes.
//! - cross-entropy: the loss is f32 from the same logits on both sides, 1e-5 in both dtypes; the
//!   gradient 1e-5 in f32 and 1e-2 in bf16 (one rounding to bf16, ~2e-3).

mod common;

use common::spectra::test_seed;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use loraga_core::autograd::{AttentionShape, IGNORE_INDEX, Params, Tape, loss};
use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::attention::{self as attn, AttentionGrads, KeyMask};
use loraga_core::cuda::cross_entropy as ce;
use loraga_core::cuda::{CudaDevice, CudaStorage};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Tensor};

fn gpu() -> CudaDevice {
    CudaDevice::new(0).expect("this test needs a CUDA GPU")
}

fn bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
    }
}

/// `n` standard-normal values times `std`, rounded to `dtype` (so the CPU sees exactly the
/// values the GPU stores).
fn values(rng: &mut impl Rng, n: usize, std: f32, dtype: DType) -> Vec<f32> {
    let v = randn(rng, n).into_iter().map(|x| x * std).collect();
    CpuStorage::from_f32_vec(dtype, v).to_f32_vec()
}

fn tensor(v: &[f32], shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_cpu(CpuStorage::from_f32_vec(dtype, v.to_vec()), shape.to_vec().into(), dev).unwrap()
}

fn storage(t: &Tensor) -> &CudaStorage {
    t.cuda_storage("test", "input").unwrap()
}

fn storage_mut(t: &mut Tensor) -> &mut CudaStorage {
    t.cuda_storage_mut("test", "output").unwrap()
}

fn nan(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::full(shape.to_vec(), dtype, f32::NAN, dev).unwrap()
}

fn check(what: &str, got: &Tensor, want: &[f32], dtype: DType) {
    assert_eq!(got.dtype(), dtype, "{what}: dtype");
    let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    let err = rel_error(&got.to_f32_vec().unwrap(), &want);
    let b = bound(dtype);
    assert!(err <= b, "{what}: rel. error {err:.2e} > {b:.0e}");
}

// ---------------------------------------------------------------------------------------------
// Attention

struct AttnInputs {
    s: AttentionShape,
    mask: Option<Vec<bool>>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

/// Output and gradients (o, dq, dk, dv) as f32 host vectors.
type AttnResults = [Vec<f32>; 4];

impl AttnInputs {
    fn q_shape(&self) -> [usize; 2] {
        [self.s.batch * self.s.seq, self.s.n_heads * self.s.head_dim]
    }
    fn kv_shape(&self) -> [usize; 2] {
        [self.s.batch * self.s.seq, self.s.n_kv_heads * self.s.head_dim]
    }

    /// O and the gradients for the upstream gradient dout, through the tape on `dev`.
    fn tape(&self, dtype: DType, dev: &Device) -> (Tensor, Tensor, Tensor, Tensor) {
        let mut tape = Tape::new();
        let q = tape.leaf(tensor(&self.q, &self.q_shape(), dtype, dev), true);
        let k = tape.leaf(tensor(&self.k, &self.kv_shape(), dtype, dev), true);
        let v = tape.leaf(tensor(&self.v, &self.kv_shape(), dtype, dev), true);
        let o = tape.attention(q, k, v, self.s, self.mask.as_deref()).unwrap();
        let out = tape.value(o).to_device(dev).unwrap();
        assert_eq!(out.device(), *dev);
        let seed = tensor(&self.dout, &self.q_shape(), dtype, dev);
        let grads = tape.backward_with(o, seed, &mut Params::new(), None).unwrap();
        let g = |x| grads.get(x).expect("a gradient").to_device(dev).unwrap();
        (out, g(q), g(k), g(v))
    }

    fn cpu(&self) -> AttnResults {
        let (o, dq, dk, dv) = self.tape(DType::F32, &Device::Cpu);
        [o, dq, dk, dv].map(|t| t.to_vec::<f32>().unwrap())
    }

    /// The launchers called directly, every output NaN before the launch.
    fn launchers(&self, dtype: DType, dev: &CudaDevice) -> (Tensor, Tensor, Tensor, Tensor) {
        let d = Device::Cuda(dev.clone());
        let (qs, kvs) = (self.q_shape(), self.kv_shape());
        let (q, k, v) =
            (tensor(&self.q, &qs, dtype, &d), tensor(&self.k, &kvs, dtype, &d), tensor(&self.v, &kvs, dtype, &d));
        let dout = tensor(&self.dout, &qs, dtype, &d);
        let mask = KeyMask::upload(dev, self.s.batch * self.s.seq, self.mask.as_deref()).unwrap();
        let mut o = nan(&qs, dtype, &d);
        attn::forward(storage(&q), storage(&k), storage(&v), self.s, &mask, storage_mut(&mut o)).unwrap();
        let (mut dq, mut dk, mut dv) = (nan(&qs, dtype, &d), nan(&kvs, dtype, &d), nan(&kvs, dtype, &d));
        let grads = AttentionGrads {
            dq: Some(storage_mut(&mut dq)),
            dk: Some(storage_mut(&mut dk)),
            dv: Some(storage_mut(&mut dv)),
        };
        attn::backward(storage(&q), storage(&k), storage(&v), storage(&dout), self.s, &mask, grads).unwrap();
        (o, dq, dk, dv)
    }
}

/// Left padding `left[b]` and right padding `right[b]` tokens per sequence.
fn padding(seq: usize, left: &[usize], right: &[usize]) -> Vec<bool> {
    left.iter().zip(right).flat_map(|(&l, &r)| (0..seq).map(move |j| j >= l && j + r < seq)).collect()
}

fn attention_inputs(rng: &mut impl Rng, s: AttentionShape, mask: Option<Vec<bool>>, dtype: DType) -> AttnInputs {
    let (qn, kvn) = (s.batch * s.seq * s.n_heads * s.head_dim, s.batch * s.seq * s.n_kv_heads * s.head_dim);
    AttnInputs {
        s,
        mask,
        q: values(rng, qn, 1.0, dtype),
        k: values(rng, kvn, 1.0, dtype),
        v: values(rng, kvn, 1.0, dtype),
        dout: values(rng, qn, 1.0, dtype),
    }
}

/// The shapes: GQA groups of 3 and 1 and 9/3 at head_dim 64; sequences of 1, 7, 33, 130 and 257
/// (past one 256-thread block per softmax row); no mask, left and right padding, a sequence that
/// is all padding, and a single padding token.
fn attention_cases() -> Vec<(AttentionShape, Option<Vec<bool>>)> {
    let shape =
        |batch, seq, n_heads, n_kv_heads, head_dim| AttentionShape { batch, seq, n_heads, n_kv_heads, head_dim };
    vec![
        (shape(2, 7, 6, 2, 8), None),
        (shape(3, 33, 4, 4, 16), Some(padding(33, &[5, 0, 33], &[0, 3, 0]))),
        (shape(2, 130, 9, 3, 64), Some(padding(130, &[40, 0], &[0, 17]))),
        (shape(4, 130, 6, 2, 16), None),
        (shape(1, 257, 9, 3, 64), Some(padding(257, &[3], &[0]))),
        (shape(3, 1, 6, 2, 8), None),
        (shape(2, 1, 6, 2, 8), Some(vec![false, true])),
        (shape(5, 7, 4, 1, 8), Some(padding(7, &[0, 1, 2, 6, 7], &[2, 0, 0, 0, 0]))),
    ]
}

fn attention_matches_cpu(dtype: DType) {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(test_seed());
    for (s, mask) in attention_cases() {
        let inputs = attention_inputs(&mut rng, s, mask, dtype);
        let want = inputs.cpu();
        let (o, dq, dk, dv) = inputs.tape(dtype, &Device::Cuda(dev.clone()));
        let (lo, ldq, ldk, ldv) = inputs.launchers(dtype, &dev);
        for (path, got) in [("tape", [o, dq, dk, dv]), ("launchers", [lo, ldq, ldk, ldv])] {
            for ((name, g), w) in ["O", "dQ", "dK", "dV"].iter().zip(&got).zip(&want) {
                assert!(g.device().is_cuda(), "{name} left the GPU");
                check(&format!("{dtype} {s:?} mask {} {path} {name}", inputs.mask.is_some()), g, w, dtype);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_f32_matches_the_cpu_tape() {
    attention_matches_cpu(DType::F32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_bf16_matches_the_cpu_tape() {
    attention_matches_cpu(DType::BF16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_gradients_only_where_needed_and_bad_inputs_are_errors() {
    let dev = gpu();
    let d = Device::Cuda(dev.clone());
    let mut rng = StdRng::seed_from_u64(test_seed());
    let s = AttentionShape { batch: 2, seq: 9, n_heads: 4, n_kv_heads: 2, head_dim: 8 };
    let inputs = attention_inputs(&mut rng, s, Some(padding(9, &[2, 0], &[0, 1])), DType::BF16);
    let want = inputs.cpu();

    // Only k needs a gradient: the backward skips dV (and would skip dQ) but dK must be right.
    let mut tape = Tape::new();
    let q = tape.constant(tensor(&inputs.q, &inputs.q_shape(), DType::BF16, &d));
    let k = tape.leaf(tensor(&inputs.k, &inputs.kv_shape(), DType::BF16, &d), true);
    let v = tape.constant(tensor(&inputs.v, &inputs.kv_shape(), DType::BF16, &d));
    let o = tape.attention(q, k, v, s, inputs.mask.as_deref()).unwrap();
    let seed = tensor(&inputs.dout, &inputs.q_shape(), DType::BF16, &d);
    let grads = tape.backward_with(o, seed, &mut Params::new(), None).unwrap();
    assert!(grads.get(q).is_none() && grads.get(v).is_none());
    check("dK alone", grads.get(k).unwrap(), &want[2], DType::BF16);

    // Mixed devices, mixed dtypes and a wrong upstream dtype are errors, not wrong answers.
    let mut tape = Tape::new();
    let q = tape.leaf(tensor(&inputs.q, &inputs.q_shape(), DType::F32, &d), true);
    let k_cpu = tape.leaf(tensor(&inputs.k, &inputs.kv_shape(), DType::F32, &Device::Cpu), true);
    let k16 = tape.leaf(tensor(&inputs.k, &inputs.kv_shape(), DType::BF16, &d), true);
    let v = tape.leaf(tensor(&inputs.v, &inputs.kv_shape(), DType::F32, &d), true);
    let e = tape.attention(q, k_cpu, v, s, None).unwrap_err().to_string();
    assert!(e.contains("k on the CPU"), "{e}");
    let e = tape.attention(q, k16, v, s, None).unwrap_err().to_string();
    assert!(e.contains("q is f32 but k is bf16"), "{e}");
    let o = tape.attention(q, v, v, s, None).unwrap();
    let seed = tensor(&inputs.dout, &inputs.q_shape(), DType::BF16, &d);
    let e = tape.backward_with(o, seed, &mut Params::new(), None).unwrap_err().to_string();
    assert!(e.contains("q is f32 but the output gradient is bf16"), "{e}");

    // The launcher checks lengths and the mask itself.
    let mask = KeyMask::upload(&dev, 17, None).unwrap();
    let (qt, kt) = (nan(&inputs.q_shape(), DType::F32, &d), nan(&inputs.kv_shape(), DType::F32, &d));
    let mut out = nan(&inputs.q_shape(), DType::F32, &d);
    let e = attn::forward(storage(&qt), storage(&kt), storage(&kt), s, &mask, storage_mut(&mut out)).unwrap_err();
    assert!(e.to_string().contains("the key mask covers 17 tokens, not 18"), "{e}");
    let mask = KeyMask::upload(&dev, 18, None).unwrap();
    let e = attn::forward(storage(&qt), storage(&qt), storage(&kt), s, &mask, storage_mut(&mut out)).unwrap_err();
    assert!(e.to_string().contains("k holds 576 elements, the shape needs 288"), "{e}");
    assert!(KeyMask::upload(&dev, 18, Some(&[true; 5])).is_err());
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

struct CeInputs {
    n: usize,
    vocab: usize,
    logits: Vec<f32>,
    targets: Vec<i64>,
    /// The upstream gradient of the loss.
    g: f32,
}

impl CeInputs {
    fn new(rng: &mut impl Rng, n: usize, vocab: usize, ignored: usize, dtype: DType) -> CeInputs {
        let mut targets: Vec<i64> = (0..n).map(|_| rng.random_range(0..vocab as i64)).collect();
        let mut rows: Vec<usize> = (0..n).collect();
        rows.shuffle(rng);
        rows[..ignored].iter().for_each(|&r| targets[r] = IGNORE_INDEX);
        // Last class and class 0 as targets too (edges of the row).
        targets[rows[ignored]] = vocab as i64 - 1;
        targets[rows[ignored + 1]] = 0;
        let logits = values(rng, n * vocab, 3.0, dtype);
        CeInputs { n, vocab, logits, targets, g: rng.random_range(0.25..2.0) }
    }

    /// (loss, dlogits) through the tape on `dev`; the upstream gradient g is a host tensor (as
    /// `Tape::backward` makes it) when `host_seed`, else on `dev`.
    fn tape(&self, dtype: DType, dev: &Device, host_seed: bool) -> (Tensor, Tensor) {
        let mut tape = Tape::new();
        let l = tape.leaf(tensor(&self.logits, &[self.n, self.vocab], dtype, dev), true);
        let loss = tape.cross_entropy(l, &self.targets).unwrap();
        let value = tape.value(loss).to_device(dev).unwrap();
        assert_eq!((value.dtype(), value.dims(), value.device()), (DType::F32, &[1usize][..], dev.clone()));
        let seed_dev = if host_seed { Device::Cpu } else { dev.clone() };
        let seed = tensor(&[self.g], &[1], DType::F32, &seed_dev);
        let grads = tape.backward_with(loss, seed, &mut Params::new(), None).unwrap();
        (value, grads.get(l).unwrap().to_device(dev).unwrap())
    }

    /// The launchers directly, loss and gradient NaN before the launches.
    fn launchers(&self, dtype: DType, dev: &CudaDevice) -> (Tensor, Tensor) {
        let d = Device::Cuda(dev.clone());
        let logits = tensor(&self.logits, &[self.n, self.vocab], dtype, &d);
        let mut loss = nan(&[1], DType::F32, &d);
        let state = ce::forward(storage(&logits), self.n, self.vocab, &self.targets, storage_mut(&mut loss)).unwrap();
        let g = tensor(&[self.g], &[1], DType::F32, &d);
        let mut dl = nan(&[self.n, self.vocab], dtype, &d);
        ce::backward(storage(&logits), &state, storage(&g), storage_mut(&mut dl)).unwrap();
        (loss, dl)
    }
}

fn cross_entropy_matches_cpu(dtype: DType) {
    let dev = gpu();
    let d = Device::Cuda(dev.clone());
    let mut rng = StdRng::seed_from_u64(test_seed());
    for (n, vocab, ignored) in [(9, 49152, 3), (37, 1000, 10), (5, 50257, 1), (3, 150_001, 0), (2, 7, 0)] {
        let c = CeInputs::new(&mut rng, n, vocab, ignored, dtype);
        let (loss, dl) = c.tape(DType::F32, &Device::Cpu, true);
        let (want_loss, want_dl) = (loss.to_vec::<f32>().unwrap(), dl.to_vec::<f32>().unwrap());
        let runs = [("tape, host seed", c.tape(dtype, &d, true)), ("tape, device seed", c.tape(dtype, &d, false))];
        for (path, (loss, dl)) in runs.into_iter().chain([("launchers", c.launchers(dtype, &dev))]) {
            let what = format!("{dtype} [{n}, {vocab}] {path}");
            assert!(loss.device().is_cuda() && dl.device().is_cuda(), "{what}: left the GPU");
            let err = rel_error(&loss.to_vec::<f32>().unwrap(), &[want_loss[0] as f64]);
            assert!(err <= 1e-5, "{what} loss: rel. error {err:.2e}");
            check(&format!("{what} dlogits"), &dl, &want_dl, dtype);
            // Ignored rows get exactly zero.
            let got = dl.to_f32_vec().unwrap();
            for (r, _) in c.targets.iter().enumerate().filter(|&(_, &t)| t == IGNORE_INDEX) {
                assert!(got[r * vocab..(r + 1) * vocab].iter().all(|&x| x == 0.0), "{what}: ignored row {r}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_f32_matches_the_cpu_tape() {
    cross_entropy_matches_cpu(DType::F32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_bf16_matches_the_cpu_tape() {
    cross_entropy_matches_cpu(DType::BF16);
}

/// Per-row losses (evaluation's path) on the device against the CPU's f64 rows, and their mean
/// against the tape's mean loss.
#[test]
#[ignore = "needs a CUDA GPU"]
fn row_losses_match_the_cpu() {
    let d = Device::Cuda(gpu());
    let mut rng = StdRng::seed_from_u64(test_seed());
    for dtype in [DType::F32, DType::BF16] {
        for (n, vocab, ignored) in [(9, 49152, 3), (37, 1000, 10), (3, 150_001, 0)] {
            let c = CeInputs::new(&mut rng, n, vocab, ignored, dtype);
            let want = loss::row_losses(&tensor(&c.logits, &[n, vocab], DType::F32, &Device::Cpu), &c.targets).unwrap();
            let got = loss::row_losses(&tensor(&c.logits, &[n, vocab], dtype, &d), &c.targets).unwrap();
            let what = format!("{dtype} [{n}, {vocab}] row losses");
            assert_eq!(got.len(), n, "{what}");
            for (r, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if c.targets[r] == IGNORE_INDEX {
                    assert!(g == 0.0 && w == 0.0, "{what}: ignored row {r} is {g} / {w}");
                } else {
                    assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: row {r}: {g} vs {w}");
                }
            }
            let (loss, _) = c.tape(DType::F32, &Device::Cpu, true);
            let mean = want.iter().sum::<f64>() / c.targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
            let err = rel_error(&loss.to_vec::<f32>().unwrap(), &[mean]);
            assert!(err <= 1e-6, "{what}: mean of rows vs the tape's loss: {err:.2e}");
        }
    }
    let l = Tensor::full([2, 3], DType::BF16, 0.5, &d).unwrap();
    let e = loss::row_losses(&l, &[3, 0]).unwrap_err().to_string();
    assert!(e.contains("target 3 at row 0"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_bad_targets_are_errors_on_the_gpu() {
    let d = Device::Cuda(gpu());
    let mut tape = Tape::new();
    let l = tape.constant(Tensor::full([2, 3], DType::BF16, 0.5, &d).unwrap());
    let e = tape.cross_entropy(l, &[3, 0]).unwrap_err().to_string();
    assert!(e.contains("target 3 at row 0"), "{e}");
    let e = tape.cross_entropy(l, &[IGNORE_INDEX, -1]).unwrap_err().to_string();
    assert!(e.contains("target -1 at row 1"), "{e}");
    let e = tape.cross_entropy(l, &[IGNORE_INDEX, IGNORE_INDEX]).unwrap_err().to_string();
    assert!(e.contains("every target"), "{e}");
    let e = tape.cross_entropy(l, &[0]).unwrap_err().to_string();
    assert!(e.contains("1 targets for 2 rows"), "{e}");
    // Uniform logits: the loss is ln 3 exactly up to f32 rounding.
    let y = tape.cross_entropy(l, &[2, IGNORE_INDEX]).unwrap();
    let got = tape.value(y).to_vec::<f32>().unwrap()[0] as f64;
    assert!((got - 3f64.ln()).abs() < 1e-6, "{got}");
}
