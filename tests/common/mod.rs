//! Shared by the integration tests: random GEMM problems and their f64 references; GGUF
//! writing, test spectra, tiny random Llamas and the real SmolLM2 in submodules.

#![allow(dead_code)]

pub mod gguf_writer;
pub mod llama_fixture;
pub mod loraga;
pub mod smollm2;
pub mod spectra;
pub mod tiny_llama;

use half::bf16;
use loraga_core::cpu::CpuStorage;
use loraga_core::gemm::{Gemm, GemmDims};
use loraga_core::testing::randn;
use loraga_core::{DType, Device, Shape, Tensor};
use rand::Rng;

/// A GEMM problem with fresh random operands stored in `dtype`, and the f64 reference of
/// `alpha op(A) op(B) + beta C0` computed from exactly the stored values.
pub struct Problem {
    pub g: Gemm,
    pub d: GemmDims,
    pub a: CpuStorage,
    pub b: CpuStorage,
    pub a_shape: Shape,
    pub b_shape: Shape,
    /// C's initial contents when beta != 0 (random), else None (C is poisoned with NaN).
    pub c0: Option<Vec<f32>>,
    pub reference: Vec<f64>,
}

pub fn problem(rng: &mut impl Rng, d: GemmDims, g: Gemm, in_dtype: DType) -> Problem {
    let a_shape: Shape = if g.trans_a { [d.k, d.m] } else { [d.m, d.k] }.into();
    let b_shape: Shape = if g.trans_b { [d.n, d.k] } else { [d.k, d.n] }.into();
    let a = CpuStorage::from_f32_vec(in_dtype, randn(rng, d.m * d.k));
    let b = CpuStorage::from_f32_vec(in_dtype, randn(rng, d.k * d.n));
    // C0 values are bf16-representable, so a bf16 and an f32 output start from the same numbers
    // and the reference holds for both.
    let c0 = (g.beta != 0.0).then(|| randn(rng, d.m * d.n).into_iter().map(bf16_round).collect::<Vec<f32>>());
    let wide = |s: &CpuStorage| s.to_f32_vec().into_iter().map(f64::from).collect::<Vec<f64>>();
    let mut reference: Vec<f64> = match &c0 {
        Some(c) => c.iter().map(|&x| x as f64).collect(),
        None => vec![0.0; d.m * d.n],
    };
    loraga_core::cpu::gemm::gemm_f64(&g, d, &wide(&a), &wide(&b), &mut reference);
    Problem { g, d, a, b, a_shape, b_shape, c0, reference }
}

impl Problem {
    pub fn operands(&self, device: &Device) -> (Tensor, Tensor) {
        let a = Tensor::from_cpu(self.a.clone(), self.a_shape.clone(), device).unwrap();
        let b = Tensor::from_cpu(self.b.clone(), self.b_shape.clone(), device).unwrap();
        (a, b)
    }

    /// |alpha| |op(A)| |op(B)| + |beta| |C0| elementwise: the scale that rounding the operands
    /// (TF32: 2^-11 of each product) perturbs the result by, whatever cancels in it.
    pub fn magnitude(&self) -> Vec<f64> {
        let abs = |s: &CpuStorage| s.to_f32_vec().into_iter().map(|x| (x as f64).abs()).collect::<Vec<f64>>();
        let mut out: Vec<f64> = match &self.c0 {
            Some(c) => c.iter().map(|&x| (x as f64).abs()).collect(),
            None => vec![0.0; self.d.m * self.d.n],
        };
        let g = Gemm { alpha: self.g.alpha.abs(), beta: self.g.beta.abs(), ..self.g };
        loraga_core::cpu::gemm::gemm_f64(&g, self.d, &abs(&self.a), &abs(&self.b), &mut out);
        out
    }

    /// The output tensor: C0 when beta != 0, else every element NaN so an unwritten one fails.
    pub fn output(&self, device: &Device, dtype: DType) -> Tensor {
        let shape = [self.d.m, self.d.n];
        match &self.c0 {
            Some(c0) => Tensor::from_cpu(CpuStorage::from_f32_vec(dtype, c0.clone()), shape.into(), device).unwrap(),
            None => Tensor::full(shape, dtype, f32::NAN, device).unwrap(),
        }
    }
}

/// Sizes chosen to straddle the naive kernel's 64x64x16 tiles: ones, primes, just-over and
/// just-under multiples, and skinny shapes like LoRA's rank dimension.
pub const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (63, 65, 17),
    (129, 70, 300),
    (257, 511, 129),
    (1000, 1, 513),
    (3, 1031, 65),
    (700, 16, 1024),
    (64, 64, 64),
];

pub fn dims((m, n, k): (usize, usize, usize)) -> GemmDims {
    GemmDims { m, n, k }
}

pub fn bf16_round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}
