//! The CPU backend: the reference every kernel is checked against, and the fallback when there
//! is no GPU. Host buffers are plain vectors; GEMM goes to faer.

pub mod gemm;
pub mod skinny;

use half::bf16;

use crate::dtype::{DType, WithDType};

/// A typed host buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn zeros(dtype: DType, n: usize) -> Self {
        Self::full(dtype, n, 0.0)
    }

    pub fn full(dtype: DType, n: usize, value: f32) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![value; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f32(value); n]),
        }
    }

    /// The elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Stores f32 values in this buffer's dtype (rounding to nearest even for bf16).
    pub fn from_f32_vec(dtype: DType, v: Vec<f32>) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        }
    }
}

/// Conversion between a typed vector and the storage enum.
pub trait CpuElement: WithDType {
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn unwrap(s: &CpuStorage) -> Option<&[Self]>;
}

impl CpuElement for f32 {
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn unwrap(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CpuElement for bf16 {
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::BF16(v)
    }
    fn unwrap(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}
