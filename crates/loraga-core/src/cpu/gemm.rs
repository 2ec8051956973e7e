//! GEMM on the CPU through faer: the fallback path (f32 arithmetic, like the kernels' fp32
//! accumulation) and the f64 reference the tests compare every device GEMM with.

use faer::{Accum, MatMut, MatRef, Par};

use super::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, GemmDims};

/// `c = alpha * op(a) op(b) + beta * c` with f32 arithmetic; bf16 inputs are widened exactly and
/// a bf16 output is rounded once at the end.
pub fn gemm(g: &Gemm, d: GemmDims, a: &CpuStorage, b: &CpuStorage, c: &mut CpuStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DType { op: "gemm", msg: format!("A is {} but B is {}", a.dtype(), b.dtype()) });
    }
    if a.dtype() == DType::F32 && c.dtype() == DType::BF16 {
        return Err(Error::DType { op: "gemm", msg: "f32 operands with a bf16 output".into() });
    }
    // All f32: straight on the buffers (copying the weights on every call would cost as much as
    // the product itself in a decode step), and a few rows times a weight by `skinny`.
    if let (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) = (a, b, &mut *c) {
        if g.trans_b && !g.trans_a && d.m <= super::skinny::MAX_ROWS {
            super::skinny::gemm_nt(d.m, d.n, d.k, g.alpha, g.beta, a, b, c);
        } else {
            gemm_slices(g, d, a, b, c);
        }
        return Ok(());
    }
    let (a32, b32) = (a.to_f32_vec(), b.to_f32_vec());
    let mut c32 = if g.beta == 0.0 { vec![0.0f32; d.m * d.n] } else { c.to_f32_vec() };
    gemm_slices(g, d, &a32, &b32, &mut c32);
    *c = CpuStorage::from_f32_vec(c.dtype(), c32);
    Ok(())
}

/// The same GEMM on f64 slices: the reference for tests (f64 accumulation).
pub fn gemm_f64(g: &Gemm, d: GemmDims, a: &[f64], b: &[f64], c: &mut [f64]) {
    gemm_slices(g, d, a, b, c)
}

fn gemm_slices<T>(g: &Gemm, d: GemmDims, a: &[T], b: &[T], c: &mut [T])
where
    T: faer::traits::ComplexField + Copy + From<f32> + std::ops::Mul<Output = T>,
{
    let (m, n, k) = (d.m, d.n, d.k);
    let a = if g.trans_a {
        MatRef::from_row_major_slice(a, k, m).transpose()
    } else {
        MatRef::from_row_major_slice(a, m, k)
    };
    let b = if g.trans_b {
        MatRef::from_row_major_slice(b, n, k).transpose()
    } else {
        MatRef::from_row_major_slice(b, k, n)
    };
    let beta = T::from(g.beta);
    let accum = if g.beta == 0.0 {
        Accum::Replace
    } else {
        c.iter_mut().for_each(|x| *x = *x * beta);
        Accum::Add
    };
    let c = MatMut::from_row_major_slice_mut(c, m, n);
    faer::linalg::matmul::matmul(c, accum, a, b, T::from(g.alpha), Par::rayon(0));
}
