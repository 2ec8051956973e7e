//! Greedy decoding of a CUDA model (ignored without a GPU; fails, not skips, when asked to run
//! without one). The decoder runs the tape's ops on the device and keeps the KV cache there, with
//! attention against it by `kernels/decode.cu` (the test checks that the cache is on the device).
//! Compared with the same model on the CPU (host cache, f32 attention written out):
//!
//! - f32 on CUDA: the logits after each ragged chunk within 1e-4 (the CPU's own bound for CUDA
//!   f32 forwards, tests/llama_cuda.rs), and the same greedy tokens;
//! - bf16 activations over bf16 base weights and f32 LoRA master copies (as training runs):
//!   logits within 3e-2 (a few bf16 roundings per layer, 3 layers), as tests/llama_cuda.rs;
//! - a prompt longer than the decode kernel's 256-key chunk (its online softmax across chunks);
//! - the device argmax against the CPU's, ties and non-finite logits included.

mod common;

use common::tiny_llama::{random_ids, with_random_lora};
use loraga_core::autograd::Params;
use loraga_core::cuda::CudaDevice;
use loraga_core::model::Llama;
use loraga_core::model::generate::{Decoder, GreedyConfig, argmax_rows, greedy};
use loraga_core::testing::{randn, rel_error};
use loraga_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

/// The logits after each call of a fixed ragged schedule over three sequences.
fn scheduled_logits(m: &Llama, p: &Params, seqs: &[Vec<u32>]) -> Vec<f32> {
    let mut dec = Decoder::new(m, p, seqs.len(), 16).unwrap();
    assert_eq!(dec.cache().device(), p.get("model.norm.weight").unwrap().device(), "the cache lives with the model");
    let chunks: [&[(usize, std::ops::Range<usize>)]; 4] =
        [&[(0, 0..5), (1, 0..1), (2, 0..3)], &[(0, 5..6), (2, 3..7)], &[(1, 1..4)], &[(0, 6..9), (1, 4..5), (2, 7..8)]];
    let mut out = Vec::new();
    for call in chunks {
        let inputs: Vec<(usize, &[u32])> = call.iter().map(|(s, r)| (*s, &seqs[*s][r.clone()])).collect();
        let logits = dec.extend(&inputs).unwrap();
        assert_eq!(logits.device(), p.get("model.norm.weight").unwrap().device());
        out.extend(logits.to_f32_vec().unwrap());
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_decoding_matches_the_cpu() {
    let mut rng = StdRng::seed_from_u64(21);
    let (mut m, p) = with_random_lora(true, &mut rng);
    let seqs: Vec<Vec<u32>> = [9, 5, 8].iter().map(|&n| random_ids(&mut rng, n, m.config.vocab_size)).collect();
    let want: Vec<f64> = scheduled_logits(&m, &p, &seqs).iter().map(|&x| x as f64).collect();

    let f32s = p.to_device(&gpu(), |_| DType::F32).unwrap();
    let e = rel_error(&scheduled_logits(&m, &f32s, &seqs), &want);
    eprintln!("f32 on CUDA: logits rel error {e:.2e}");
    assert!(e <= 1e-4, "f32 on CUDA: {e:.2e}");
    let cfg = GreedyConfig { max_new_tokens: 8, stop_tokens: vec![] };
    let prompts = &seqs[..2];
    assert_eq!(greedy(&m, &f32s, prompts, &cfg).unwrap(), greedy(&m, &p, prompts, &cfg).unwrap());

    let mixed = p.to_device(&gpu(), |q| if q.trainable() { DType::F32 } else { DType::BF16 }).unwrap();
    m.dtype = DType::BF16;
    let e = rel_error(&scheduled_logits(&m, &mixed, &seqs), &want);
    eprintln!("bf16 on CUDA: logits rel error {e:.2e}");
    assert!(e <= 3e-2, "bf16 on CUDA: {e:.2e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn long_prompts_decode_across_key_chunks() {
    let mut rng = StdRng::seed_from_u64(22);
    let (mut m, p) = with_random_lora(false, &mut rng);
    m.config.max_position_embeddings = 700;
    // 300 and 530 keys: two and three 256-key chunks of the decode kernel.
    let prompts: Vec<Vec<u32>> = [300, 530].iter().map(|&n| random_ids(&mut rng, n, m.config.vocab_size)).collect();
    let logits = |p: &Params| {
        let mut dec = Decoder::new(&m, p, 2, 540).unwrap();
        let inputs: Vec<(usize, &[u32])> = prompts.iter().enumerate().map(|(i, t)| (i, t.as_slice())).collect();
        let mut out = dec.extend(&inputs).unwrap().to_f32_vec().unwrap();
        out.extend(dec.extend(&[(0, &[3u32][..]), (1, &[7u32][..])]).unwrap().to_f32_vec().unwrap());
        out
    };
    let want: Vec<f64> = logits(&p).iter().map(|&x| x as f64).collect();
    let f32s = p.to_device(&gpu(), |_| DType::F32).unwrap();
    let e = rel_error(&logits(&f32s), &want);
    eprintln!("long prompts, f32 on CUDA: logits rel error {e:.2e}");
    assert!(e <= 1e-4, "long prompts, f32 on CUDA: {e:.2e}");
    let cfg = GreedyConfig { max_new_tokens: 5, stop_tokens: vec![] };
    assert_eq!(greedy(&m, &f32s, &prompts, &cfg).unwrap(), greedy(&m, &p, &prompts, &cfg).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_argmax_matches_the_cpu() {
    let mut rng = StdRng::seed_from_u64(23);
    let (rows, vocab) = (5, 1000);
    let mut v = randn(&mut rng, rows * vocab);
    // Ties: row 1's maximum twice (the first wins), row 3's at the last column.
    v[vocab + 10] = 9.0;
    v[vocab + 700] = 9.0;
    v[3 * vocab + vocab - 1] = 9.5;
    for dtype in [DType::F32, DType::BF16] {
        let cpu = Tensor::from_vec(v.clone(), [rows, vocab], &Device::Cpu).unwrap().to(&Device::Cpu, dtype).unwrap();
        let want = argmax_rows(&cpu.to(&Device::Cpu, DType::F32).unwrap()).unwrap();
        assert_eq!((want[1], want[3]), (10, vocab as u32 - 1));
        assert_eq!(argmax_rows(&cpu.to(&gpu(), dtype).unwrap()).unwrap(), want, "{dtype}");
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let mut w = v.clone();
        w[2 * vocab + 17] = bad;
        let t = Tensor::from_vec(w, [rows, vocab], &gpu()).unwrap();
        let e = argmax_rows(&t).unwrap_err().to_string();
        assert!(e.contains("row 2"), "{e}");
    }
}
