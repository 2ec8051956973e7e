//! The linear layer `y = x Wᵀ` on the device, as three GEMMs through [`crate::cuda::gemm`] with
//! [`GemmPath::Auto`] (for bf16 operands whose contiguous dimensions are multiples of 8 the Hopper
//! engine on sm_90a or the sm_80 engine on other sm_80+ GPUs, else the naive kernel; all accumulate
//! in f32, and f32 operands stay full fp32: no TF32):
//!
//!   forward:        y  [n, m] = x [n, k] Wᵀ            in x's dtype
//!   input gradient: dx [n, k] = dy [n, m] W [m, k]      in x's dtype
//!   weight gradient: dW [m, k] = dyᵀ x                  in f32 (reduced over the n tokens)
//!
//! x and W must have one dtype (f32 or bf16); mixed precision casts the f32 master weight to
//! bf16 on the tape first.

use super::elementwise::as_dtype;
use super::{expect, output, same_dtype_as_x};
use crate::cuda::gemm::{GemmPath, gemm};
use crate::cuda::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::Result;
use crate::gemm::{Gemm, GemmDims};

const OP: &str = "linear";

/// `x Wᵀ` for x [n, k] and W [m, k].
pub fn forward(x: &CudaStorage, w: &CudaStorage, n: usize, k: usize, m: usize) -> Result<CudaStorage> {
    same_dtype_as_x(OP, x, w)?;
    expect(OP, "x", x, &w.device, w.dtype(), n * k)?;
    expect(OP, "the weight", w, &x.device, x.dtype(), m * k)?;
    product(Gemm { trans_b: true, ..Gemm::default() }, GemmDims { m: n, n: m, k }, x, w, x.dtype())
}

/// `dy W` for dy [n, m] and W [m, k], in W's dtype (x's).
pub fn grad_x(dy: &CudaStorage, w: &CudaStorage, n: usize, k: usize, m: usize) -> Result<CudaStorage> {
    let dy = as_dtype(dy, w.dtype())?;
    expect(OP, "the output gradient", &dy, &w.device, w.dtype(), n * m)?;
    product(Gemm::default(), GemmDims { m: n, n: k, k: m }, &dy, w, w.dtype())
}

/// `dyᵀ x` for dy [n, m] and x [n, k], in f32.
pub fn grad_w(dy: &CudaStorage, x: &CudaStorage, n: usize, k: usize, m: usize) -> Result<CudaStorage> {
    let dy = as_dtype(dy, x.dtype())?;
    expect(OP, "the output gradient", &dy, &x.device, x.dtype(), n * m)?;
    product(Gemm { trans_a: true, ..Gemm::default() }, GemmDims { m, n: k, k: n }, &dy, x, DType::F32)
}

/// `op(a) op(b)` into a new [d.m, d.n] buffer of `dtype`. An empty inner dimension gives zeros
/// (the engine would leave such an output unwritten).
fn product(g: Gemm, d: GemmDims, a: &CudaStorage, b: &CudaStorage, dtype: DType) -> Result<CudaStorage> {
    let dev = &a.device;
    if d.k == 0 {
        return CudaStorage::zeros(dev, dtype, d.m * d.n);
    }
    let mut c = output(dev, dtype, d.m * d.n)?;
    gemm(GemmPath::Auto, &g, d, a, b, &mut c)?;
    Ok(c)
}
