//! The autograd tape's basic ops on a CUDA device (linear, add, mul, scale, embedding, silu,
//! swiglu, rms_norm, rope, cast, gradient accumulation), forward and backward, in f32 and in
//! bf16, against the CPU tape run on the same inputs widened to f32.
//!
//! Every input and every seed gradient holds values that are exact in the dtype under test, so
//! the CPU sees the very numbers the GPU does. Each op computes in f32 registers from those exact
//! values and rounds its result once, to the dtype it stores. Hence the bounds on
//! ||gpu - cpu|| / ||cpu||, by the dtype a compared value is stored in:
//! - f32: 1e-5. GPU and CPU differ only in the order of f32 roundings and in 1-ulp library
//!   functions (expf, sqrtf): ~1e-7 per operation, ~1e-6 after the longest sums here. linear on
//!   CUDA goes through `GemmPath::Auto`: f32 operands take the naive kernel in full f32 (no TF32
//!   anywhere), bf16 ones the Hopper engine (or the naive kernel) whose products of bf16 values
//!   are exact in f32 and accumulate in f32; tests/lora_linear.rs holds the engine's f32
//!   weight-gradient accumulation to the same 1e-5 over 384 tokens.
//! - bf16: 4e-3 = bf16's unit roundoff 2^-8 = 3.9e-3 (the largest relative error of one
//!   round-to-nearest, so also of the norm), plus the f32 differences above.
//! - bit for bit: the embedding forward (a copy), cast, and in-place accumulation (one f32 add,
//!   rounded once, as half::bf16::from_f32 rounds on the CPU).
//! - graphs where a value is rounded to bf16 more than once on its way (the chain, mixed-dtype
//!   accumulation): 1e-2. A numpy emulation of the chain with the GPU's roundings gives
//!   2.5e-3 to 5.4e-3 (each rounding adds ~1.1e-3 rms; four to six of them reach a gradient).
//!
//! Outputs are poisoned with NaN before every kernel (`poison_outputs`), so an element a kernel
//! leaves unwritten fails. Shapes are ragged (rows and widths not multiples of the block, warp or
//! vector sizes), and a few are large enough that the grid-stride loops go round more than once.
//! Every test needs a GPU and fails without one.

use std::sync::Arc;

use half::bf16;
use loraga_core::autograd::{Params, RopeTable, Tape, Var};
use loraga_core::cpu::CpuStorage;
use loraga_core::cuda::ops::{elementwise, poison_outputs};
use loraga_core::cuda::{CudaDevice, CudaStorage};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Result, Storage, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

fn gpu() -> Device {
    poison_outputs(true);
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

/// `v` rounded to `dtype` (to nearest even for bf16), back in f32.
fn round(dtype: DType, v: Vec<f32>) -> Vec<f32> {
    CpuStorage::from_f32_vec(dtype, v).to_f32_vec()
}

/// `n` standard normals, exact in `dtype`.
fn values(rng: &mut StdRng, n: usize, dtype: DType) -> Vec<f32> {
    round(dtype, randn(rng, n))
}

/// A tensor of `dtype` on `dev` holding `v` (exact in `dtype`).
fn tensor(v: &[f32], shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_cpu(CpuStorage::from_f32_vec(dtype, v.to_vec()), shape.to_vec().into(), dev).unwrap()
}

const F32_BOUND: f64 = 1e-5;

fn bound(stored: DType) -> f64 {
    match stored {
        DType::F32 => F32_BOUND,
        DType::BF16 => 4e-3,
    }
}

fn check(what: &str, got: &[f32], want: &[f32], bound: f64) {
    let reference: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    let err = rel_error(got, &reference);
    assert!(err <= bound, "{what}: relative error {err:.2e} > {bound:.0e}");
}

type Build<'a> = &'a dyn Fn(&mut Tape, &[Var]) -> Result<Var>;
type Inputs = Vec<(Vec<f32>, Vec<usize>)>;

/// A graph's output and the gradient of each input, as f32 values with the dtype they had.
struct Run {
    out: (Vec<f32>, DType),
    grads: Vec<(Vec<f32>, DType)>,
}

/// Builds the graph on `dev` with every input a leaf of `dtype` that needs a gradient, and
/// backpropagates `seed` (stored in the output's dtype).
fn run(dev: &Device, dtype: DType, inputs: &Inputs, seed: &[f32], build: Build) -> Run {
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|(v, s)| tape.leaf(tensor(v, s, dtype, dev), true)).collect();
    let y = build(&mut tape, &vars).unwrap();
    let out = tape.value(y);
    let (out_vals, out_dtype, dims) = (out.to_f32_vec().unwrap(), out.dtype(), out.dims().to_vec());
    let seed = tensor(seed, &dims, out_dtype, dev);
    let grads = tape.backward_with(y, seed, &mut Params::new(), None).unwrap();
    let grads = vars
        .iter()
        .map(|&v| {
            let g = grads.get(v).expect("every input gets a gradient");
            (g.to_f32_vec().unwrap(), g.dtype())
        })
        .collect();
    Run { out: (out_vals, out_dtype), grads }
}

/// Runs `build` on the CPU in f32 and on the GPU in `dtype` with the same fresh inputs of
/// `shapes` and the same seed, and checks the GPU's dtypes and errors: values stored in bf16
/// within `bound(BF16)`, in f32 within `f32_bound` (normally `bound(F32)`). Input i's gradient
/// is f32 when `weight_like[i]`, else in `dtype`. Returns both runs for further checks.
#[allow(clippy::too_many_arguments)]
fn compare(
    name: &str,
    rng: &mut StdRng,
    dev: &Device,
    dtype: DType,
    shapes: &[&[usize]],
    weight_like: &[bool],
    f32_bound: f64,
    build: Build,
) -> (Run, Run) {
    let bound_for = |stored: DType| if stored == DType::F32 { f32_bound } else { bound(stored) };
    let inputs: Inputs = shapes.iter().map(|s| (values(rng, s.iter().product(), dtype), s.to_vec())).collect();
    let out_len = {
        let mut tape = Tape::new();
        let vars: Vec<Var> =
            inputs.iter().map(|(v, s)| tape.constant(tensor(v, s, DType::F32, &Device::Cpu))).collect();
        let y = build(&mut tape, &vars).unwrap();
        tape.value(y).shape().elem_count()
    };
    let seed = values(rng, out_len, dtype);
    let cpu = run(&Device::Cpu, DType::F32, &inputs, &seed, build);
    let gpu = run(dev, dtype, &inputs, &seed, build);
    let what = format!("{name} {dtype} {shapes:?}");
    assert_eq!(gpu.out.1, dtype, "{what}: output dtype");
    check(&format!("{what}: output"), &gpu.out.0, &cpu.out.0, bound_for(dtype));
    for (i, ((g, g_dtype), (c, _))) in gpu.grads.iter().zip(&cpu.grads).enumerate() {
        let want = if weight_like[i] { DType::F32 } else { dtype };
        assert_eq!(*g_dtype, want, "{what}: dtype of the gradient of input {i}");
        check(&format!("{what}: gradient of input {i}"), g, c, bound_for(want));
    }
    (cpu, gpu)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_matches_the_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(61);
    // Ragged (the naive kernel) and multiples of 8 (the Hopper engine in bf16 on sm_90a).
    for (n, k, m) in [(37, 75, 53), (72, 128, 200), (1, 9, 3)] {
        for dtype in DTYPES {
            compare("linear", &mut rng, &dev, dtype, &[&[n, k], &[m, k]], &[false, true], F32_BOUND, &|t, v| {
                t.linear(v[0], v[1])
            });
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_ops_match_the_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(62);
    // 33 x 71 = 2343 elements: not a multiple of 4 or 8, so the packed loops leave a tail; the
    // large shape makes every grid-stride loop go round more than once.
    for shape in [[33usize, 71], [1, 3], [1000, 5003]] {
        let s: &[usize] = &shape;
        for dtype in DTYPES {
            let two = [s, s];
            compare("add", &mut rng, &dev, dtype, &two, &[false, false], F32_BOUND, &|t, v| t.add(v[0], v[1]));
            compare("mul", &mut rng, &dev, dtype, &two, &[false, false], F32_BOUND, &|t, v| t.mul(v[0], v[1]));
            compare("scale", &mut rng, &dev, dtype, &[s], &[false], F32_BOUND, &|t, v| t.scale(v[0], -1.7));
            compare("silu", &mut rng, &dev, dtype, &[s], &[false], F32_BOUND, &|t, v| t.silu(v[0]));
            compare("swiglu", &mut rng, &dev, dtype, &two, &[false, false], F32_BOUND, &|t, v| t.swiglu(v[0], v[1]));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_with_repeated_ids_matches_the_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(63);
    // Ids repeat (3 and 7 often), include the first and last rows; 5000 rows make the row loop
    // of the kernels go round more than once.
    let few: Vec<u32> = (0..41u32).map(|i| [3, 7, 3, 49, 0, 7, 3, 12][i as usize % 8] + (i / 40) * 5).collect();
    let many: Vec<u32> = (0..5000u32).map(|i| (i * 7919) % 50).collect();
    for ids in [few, many] {
        for dtype in DTYPES {
            let (cpu, gpu) = compare("embedding", &mut rng, &dev, dtype, &[&[50, 67]], &[true], F32_BOUND, &|t, v| {
                t.embedding(&ids, v[0])
            });
            assert_eq!(gpu.out.0, cpu.out.0, "the embedding forward is a copy: bit for bit");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_matches_the_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(64);
    // d below, between and above multiples of the 32-lane warp; 300 rows give several dw chunks
    // and a partial last one, 70001 rows the most chunks (1015 of 69 rows). (d = 1 would make dx
    // pure cancellation, r g w eps / (x^2 + eps), so it is left out.)
    for (n, d) in [(300, 100), (7, 37), (5, 1030), (1, 3), (70001, 37)] {
        // The CPU tape sums dw over the rows one after the other in f32: over 70001 rows its own
        // error is about u sqrt(n / 2) = 1.1e-5 (4.3e-6 measured on such data, against 6.9e-7
        // for the GPU's chunked sum), so that case gets 3e-5.
        let f32_bound = if n > 10_000 { 3e-5 } else { F32_BOUND };
        for dtype in DTYPES {
            let shapes: [&[usize]; 2] = [&[n, d], &[d]];
            compare("rms_norm", &mut rng, &dev, dtype, &shapes, &[false, true], f32_bound, &|t, v| {
                t.rms_norm(v[0], v[1], 1e-5)
            });
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_matches_the_cpu() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(65);
    // Llama's head_dim 64 (3 heads), and head_dim 6 (an odd half); 9000 rows make the
    // grid-stride loop go round more than once. Positions repeat and reach the table's end.
    for (rows, heads, head_dim, max_pos) in [(37, 3, 64, 512), (11, 3, 6, 20), (9000, 3, 64, 512)] {
        let table = Arc::new(RopeTable::new(head_dim, max_pos, 10000.0).unwrap());
        let positions: Vec<u32> =
            (0..rows).map(|r| if r == 0 { max_pos as u32 - 1 } else { (r as u32 * 131) % max_pos as u32 }).collect();
        for dtype in DTYPES {
            // Twice on one tape: the second call finds the table already on the device.
            compare("rope", &mut rng, &dev, dtype, &[&[rows, heads * head_dim]], &[false], F32_BOUND, &|t, v| {
                let y = t.rope(v[0], &table, &positions)?;
                let z = t.rope(v[0], &table, &positions)?;
                t.add(y, z)
            });
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cast_is_exact_both_ways() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(66);
    let n = [13usize, 77];
    for from in DTYPES {
        for to in DTYPES {
            // f32 values with bits below bf16's precision, so f32 -> bf16 really rounds.
            let x = round(from, randn(&mut rng, n[0] * n[1]));
            let seed = round(to, randn(&mut rng, n[0] * n[1]));
            let mut tape = Tape::new();
            let xv = tape.leaf(tensor(&x, &n, from, &dev), true);
            let y = tape.cast(xv, to).unwrap();
            assert_eq!(tape.value(y).dtype(), to);
            let want: Vec<f32> = round(to, x.clone());
            assert_eq!(tape.value(y).to_f32_vec().unwrap(), want, "cast {from} -> {to}");
            if from == DType::F32 && to == DType::BF16 {
                assert_ne!(want, x, "the test values must need rounding");
                let bits: Vec<bf16> = tape.value(y).to_vec::<bf16>().unwrap();
                assert_eq!(bits, x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), "round to nearest even");
            }
            let grads = tape.backward_with(y, tensor(&seed, &n, to, &dev), &mut Params::new(), None).unwrap();
            let g = grads.get(xv).unwrap();
            assert_eq!(g.dtype(), from, "cast's gradient has the input's dtype");
            assert_eq!(g.to_f32_vec().unwrap(), round(from, seed), "cast {from} -> {to}: gradient");
        }
    }
}

fn cuda_mut(t: &mut Tensor) -> &mut CudaStorage {
    match t.storage_mut() {
        Storage::Cuda(s) => s,
        Storage::Cpu(_) => panic!("expected a CUDA tensor"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gradient_accumulation_is_one_rounded_add() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(67);
    for n in [1001usize, 4, 3_000_001] {
        for acc_dtype in DTYPES {
            for g_dtype in DTYPES {
                let (a, g) = (values(&mut rng, n, acc_dtype), values(&mut rng, n, g_dtype));
                let mut acc = tensor(&a, &[n], acc_dtype, &dev);
                let gt = tensor(&g, &[n], g_dtype, &dev);
                let Storage::Cuda(gs) = gt.storage() else { unreachable!() };
                elementwise::add_assign(cuda_mut(&mut acc), gs, "test").unwrap();
                let want = round(acc_dtype, a.iter().zip(&g).map(|(x, y)| x + y).collect());
                assert_eq!(acc.dtype(), acc_dtype);
                assert_eq!(acc.to_f32_vec().unwrap(), want, "{acc_dtype} += {g_dtype}, n = {n}");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_dtype_gradients_accumulate_on_the_tape() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(68);
    let (n, k) = (29usize, 24usize);
    // v [k, k] is used as a weight (an f32 gradient) and as an activation (a gradient in its own
    // dtype). In the first graph the activation's gradient reaches v first (bf16 += f32 in bf16),
    // in the second the weight's (f32 += bf16); scale also receives an f32 gradient for a bf16
    // output, which it brings to bf16 first.
    let activation_first = |t: &mut Tape, v: &[Var]| {
        let p = t.linear(v[0], v[1])?;
        let q = t.scale(v[1], 0.5)?;
        t.linear(p, q)
    };
    let weight_first = |t: &mut Tape, v: &[Var]| {
        let q = t.scale(v[1], 0.5)?;
        let p = t.linear(v[0], v[1])?;
        t.linear(p, q)
    };
    for (name, build) in [("activation first", &activation_first as Build), ("weight first", &weight_first)] {
        for dtype in DTYPES {
            let inputs: Inputs =
                vec![(values(&mut rng, n * k, dtype), vec![n, k]), (values(&mut rng, k * k, dtype), vec![k, k])];
            let seed = values(&mut rng, n * k, dtype);
            let cpu = run(&Device::Cpu, DType::F32, &inputs, &seed, build);
            let gpu = run(&dev, dtype, &inputs, &seed, build);
            // Values rounded to bf16 twice on their way: see the module docs.
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            check(&format!("{name} {dtype}: output"), &gpu.out.0, &cpu.out.0, tol);
            for (i, ((g, _), (c, _))) in gpu.grads.iter().zip(&cpu.grads).enumerate() {
                check(&format!("{name} {dtype}: gradient of input {i}"), g, c, tol);
            }
        }
    }
}

/// RMSNorm -> gate/up projections -> SwiGLU -> down projection -> residual add, with the four
/// weights as trainable f32 parameters cast to the run's dtype on the tape (mixed precision).
fn chain(tape: &mut Tape, params: &Params, x: Var, dtype: DType) -> Result<Var> {
    let mut w = |name: &str| -> Result<Var> {
        let p = tape.param(params, name)?;
        tape.cast(p, dtype)
    };
    let (norm, gate, up, down) = (w("norm")?, w("gate")?, w("up")?, w("down")?);
    let h = tape.rms_norm(x, norm, 1e-5)?;
    let g = tape.linear(h, gate)?;
    let u = tape.linear(h, up)?;
    let a = tape.swiglu(g, u)?;
    let o = tape.linear(a, down)?;
    tape.add(x, o)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_chain_of_ops_gives_the_cpu_parameter_gradients() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(69);
    // (tokens, hidden, intermediate): multiples of 8 (the engine in bf16 on sm_90a), and ragged.
    for (n, d, f) in [(37, 48, 88), (45, 100, 70)] {
        for dtype in DTYPES {
            // Master weights exact in bf16, so the casts are exact and the comparison measures the
            // activations' roundings alone.
            let weights: Vec<(&str, Vec<usize>, Vec<f32>)> =
                [("norm", vec![d]), ("gate", vec![f, d]), ("up", vec![f, d]), ("down", vec![d, f])]
                    .into_iter()
                    .map(|(name, shape)| {
                        let fan_in = *shape.last().unwrap() as f32;
                        let scale = if shape.len() == 2 { 1.0 / fan_in.sqrt() } else { 1.0 };
                        let v = round(
                            DType::BF16,
                            randn(&mut rng, shape.iter().product()).into_iter().map(|x| x * scale).collect(),
                        );
                        (name, shape, v)
                    })
                    .collect();
            let params_on = |device: &Device| {
                let mut p = Params::new();
                for (name, shape, v) in &weights {
                    p.insert(*name, tensor(v, shape, DType::F32, device), true).unwrap();
                }
                p
            };
            let (mut cpu_params, mut gpu_params) = (params_on(&Device::Cpu), params_on(&dev));
            // Two micro-batches: the parameters' gradients accumulate on the device.
            for _ in 0..2 {
                let x = values(&mut rng, n * d, dtype);
                let seed = values(&mut rng, n * d, dtype);
                let mut outs = Vec::new();
                for (device, run_dtype, params) in
                    [(&Device::Cpu, DType::F32, &mut cpu_params), (&dev, dtype, &mut gpu_params)]
                {
                    let mut tape = Tape::new();
                    let xv = tape.leaf(tensor(&x, &[n, d], run_dtype, device), true);
                    let y = chain(&mut tape, params, xv, run_dtype).unwrap();
                    let out = tape.value(y).to_f32_vec().unwrap();
                    let grads = tape.backward_with(y, tensor(&seed, &[n, d], run_dtype, device), params, None).unwrap();
                    let dx = grads.get(xv).unwrap();
                    assert_eq!(dx.dtype(), run_dtype);
                    outs.push((out, dx.to_f32_vec().unwrap()));
                }
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                check(&format!("chain {n}x{d}x{f} {dtype}: output"), &outs[1].0, &outs[0].0, tol);
                check(&format!("chain {n}x{d}x{f} {dtype}: input gradient"), &outs[1].1, &outs[0].1, tol);
            }
            for (name, _, _) in &weights {
                let g = gpu_params.grad(name).unwrap().expect("a trainable parameter gets a gradient");
                assert_eq!(g.dtype(), DType::F32, "{name}: master gradients are f32");
                let c = cpu_params.grad(name).unwrap().unwrap().to_f32_vec().unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                check(&format!("chain {n}x{d}x{f} {dtype}: gradient of {name}"), &g.to_f32_vec().unwrap(), &c, tol);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backward_seeds_the_loss_on_its_device() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(70);
    for dtype in DTYPES {
        // l = x . w for x, w [1, 5]: dl/dx = w, dl/dw = x, exactly.
        let (x, w) = (values(&mut rng, 5, dtype), values(&mut rng, 5, dtype));
        let mut tape = Tape::new();
        let (xv, wv) =
            (tape.leaf(tensor(&x, &[1, 5], dtype, &dev), true), tape.leaf(tensor(&w, &[1, 5], dtype, &dev), true));
        let l = tape.linear(xv, wv).unwrap();
        let grads = tape.backward(l, &mut Params::new(), None).unwrap();
        let (dx, dw) = (grads.get(xv).unwrap(), grads.get(wv).unwrap());
        assert_eq!((dx.dtype(), dw.dtype()), (dtype, DType::F32));
        assert_eq!(dx.to_f32_vec().unwrap(), w);
        assert_eq!(dw.to_f32_vec().unwrap(), x);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_inputs_on_the_gpu_are_clear_errors() {
    let dev = gpu();
    let z = |shape: &[usize], dtype: DType, device: &Device| Tensor::zeros(shape.to_vec(), dtype, device).unwrap();
    let mut tape = Tape::new();
    let x16 = tape.constant(z(&[4, 8], DType::BF16, &dev));
    let w32 = tape.constant(z(&[6, 8], DType::F32, &dev));
    let e = tape.linear(x16, w32).unwrap_err().to_string();
    assert!(e.contains("x is bf16 but the weight is f32") && e.contains("Tape::cast"), "{e}");
    let n32 = tape.constant(z(&[8], DType::F32, &dev));
    let e = tape.rms_norm(x16, n32, 1e-5).unwrap_err().to_string();
    assert!(e.contains("Tape::cast"), "{e}");
    let x32 = tape.constant(z(&[4, 8], DType::F32, &dev));
    let e = tape.add(x16, x32).unwrap_err().to_string();
    assert!(e.contains("is f32 where bf16 is expected"), "{e}");
    let cpu = tape.constant(z(&[4, 8], DType::F32, &Device::Cpu));
    let e = tape.add(x32, cpu).unwrap_err().to_string();
    assert!(e.contains("different devices"), "{e}");
    let e = tape.embedding(&[1, 6], w32).unwrap_err().to_string();
    assert!(e.contains("token id 6 at position 1"), "{e}");
    let table = Arc::new(RopeTable::new(4, 3, 10000.0).unwrap());
    let e = tape.rope(x32, &table, &[0, 1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains("position 3"), "{e}");
}
