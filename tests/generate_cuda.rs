//! Greedy decoding of a CUDA model (ignored without a GPU; fails, not skips, when asked to run
//! without one). The decoder runs the tape's ops on the device and cached attention on the host
//! (q, k, v come down, the output goes up). Compared with the same model on the CPU:
//!
//! - f32 on CUDA: the logits after each ragged chunk within 1e-4 (the CPU's own bound for CUDA
//!   f32 forwards, tests/llama_cuda.rs), and the same greedy tokens;
//! - bf16 activations over bf16 base weights and f32 LoRA master copies (as training runs):
//!   logits within 3e-2 (a few bf16 roundings per layer, 3 layers), as tests/llama_cuda.rs.

mod common;

use common::tiny_llama::{random_ids, with_random_lora};
use loraga_core::autograd::Params;
use loraga_core::cuda::CudaDevice;
use loraga_core::model::Llama;
use loraga_core::model::generate::{Decoder, GreedyConfig, greedy};
use loraga_core::testing::rel_error;
use loraga_core::{DType, Device};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

/// The logits after each call of a fixed ragged schedule over three sequences.
fn scheduled_logits(m: &Llama, p: &Params, seqs: &[Vec<u32>]) -> Vec<f32> {
    let mut dec = Decoder::new(m, p, seqs.len(), 16).unwrap();
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
