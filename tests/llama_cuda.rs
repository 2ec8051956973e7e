//! The Llama parity cases of tests/llama_parity.rs on CUDA (ignored without a GPU):
//!
//! - f32 everywhere: the same 1e-4 bound as the CPU (every GEMM is f32 on the naive kernel).
//! - mixed precision as training runs it: frozen base weights in bf16, LoRA A/B as f32 master
//!   copies cast to bf16 on the tape, bf16 activations. Bounds from the roundings involved: each
//!   bf16 rounding is <= 2^-8 relative; logits come through 2 layers of about 10 roundings on
//!   the path, so 3e-2 for logits and gradients, 1e-2 for the loss (a mean over tokens, whose
//!   errors partly cancel). What was measured is printed.

mod common;

use common::llama_fixture;
use loraga_core::cuda::CudaDevice;
use loraga_core::{DType, Device};

fn gpu() -> Device {
    Device::Cuda(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
}

fn check(case: &str) {
    let c = llama_fixture::load(case);
    let mut f32s = c.params.to_device(&gpu(), |_| DType::F32).unwrap();
    let e = c.errors(&mut f32s);
    eprintln!("{case} f32 on CUDA: {e:?}");
    assert!(e.logits <= 1e-4 && e.loss <= 1e-4 && e.lora_grad <= 1e-4, "{case} f32: {e:?}");

    let mut mixed = c.params.to_device(&gpu(), |p| if p.trainable() { DType::F32 } else { DType::BF16 }).unwrap();
    let mut c = c;
    c.model.dtype = DType::BF16;
    let e = c.errors(&mut mixed);
    eprintln!("{case} bf16 on CUDA: {e:?}");
    assert!(e.logits <= 3e-2 && e.loss <= 1e-2 && e.lora_grad <= 3e-2, "{case} bf16: {e:?}");
    // Master copies stay f32 and receive f32 gradients.
    let g = mixed.grad(&c.lora_names[0]).unwrap().unwrap();
    assert_eq!(g.dtype(), DType::F32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn untied_gqa_lora_matches_transformers_on_cuda() {
    check("gqa_untied");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tied_gqa_rslora_matches_transformers_on_cuda() {
    check("gqa_tied");
}
