//! The GEMM every op is built from, with shape checks shared by all backends:
//!
//!   C [M, N] = alpha * op(A) op(B) + beta * C,   op(X) = X or X^T,   all row-major.
//!
//! `trans_b` with B stored [N, K] is PyTorch's `x @ W.T`; `trans_a` with A stored [K, M] is the
//! weight gradient `dY^T X`.

use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    /// Bit-reproducible results: the Hopper engine then never splits K across SMs (its split-K
    /// adds the slices into C in whatever order they finish, so the last bits vary run to run).
    /// The other paths are deterministic either way.
    pub deterministic: bool,
}

impl Default for Gemm {
    fn default() -> Self {
        Gemm { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0, deterministic: false }
    }
}

/// The problem size: op(A) is [m, k], op(B) is [k, n].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl GemmDims {
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

impl Gemm {
    /// Checks the three shapes against each other and returns the problem size.
    pub fn dims(&self, a: &[usize], b: &[usize], c: &[usize]) -> Result<GemmDims> {
        let two = |what: &str, s: &[usize]| match *s {
            [r, c] => Ok((r, c)),
            _ => Err(Error::shape("gemm", format!("{what} must be a matrix, got shape {s:?}"))),
        };
        let (ar, ac) = two("A", a)?;
        let (br, bc) = two("B", b)?;
        let (cr, cc) = two("C", c)?;
        let (m, ka) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if ka != kb {
            return Err(Error::shape(
                "gemm",
                format!(
                    "inner dimensions differ: op(A) is [{m}, {ka}] (A {a:?}, trans_a={}), op(B) is [{kb}, {n}] (B {b:?}, trans_b={})",
                    self.trans_a, self.trans_b
                ),
            ));
        }
        if (cr, cc) != (m, n) {
            return Err(Error::shape("gemm", format!("C is {c:?} but op(A) op(B) is [{m}, {n}]")));
        }
        Ok(GemmDims { m, n, k: ka })
    }
}

/// `c = alpha * op(a) op(b) + beta * c` on whichever backend holds the tensors (the CUDA backend
/// uses `GemmPath::Auto`: the engine where it applies, else the naive kernel).
pub fn gemm(g: &Gemm, a: &Tensor, b: &Tensor, c: &mut Tensor) -> Result<()> {
    let d = g.dims(a.dims(), b.dims(), c.dims())?;
    match (a.storage(), b.storage(), c.storage_mut()) {
        (Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(c)) => crate::cpu::gemm::gemm(g, d, a, b, c),
        (Storage::Cuda(a), Storage::Cuda(b), Storage::Cuda(c)) => {
            crate::cuda::gemm::gemm(crate::cuda::GemmPath::Auto, g, d, a, b, c)
        }
        _ => Err(Error::DeviceMismatch { op: "gemm", lhs: a.device().to_string(), rhs: b.device().to_string() }),
    }
}

/// The same on the device by an explicit path (for tests and benchmarks that compare paths).
pub fn gemm_cuda(path: crate::cuda::GemmPath, g: &Gemm, a: &Tensor, b: &Tensor, c: &mut Tensor) -> Result<()> {
    let d = g.dims(a.dims(), b.dims(), c.dims())?;
    match (a.storage(), b.storage(), c.storage_mut()) {
        (Storage::Cuda(a), Storage::Cuda(b), Storage::Cuda(c)) => crate::cuda::gemm::gemm(path, g, d, a, b, c),
        _ => Err(Error::DeviceMismatch { op: "gemm_cuda", lhs: a.device().to_string(), rhs: "cuda".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_follow_the_transposes() {
        let g = Gemm::default();
        assert_eq!(g.dims(&[3, 4], &[4, 5], &[3, 5]).unwrap(), GemmDims { m: 3, n: 5, k: 4 });
        let nt = Gemm { trans_b: true, ..g };
        assert_eq!(nt.dims(&[3, 4], &[5, 4], &[3, 5]).unwrap(), GemmDims { m: 3, n: 5, k: 4 });
        let tn = Gemm { trans_a: true, ..g };
        assert_eq!(tn.dims(&[4, 3], &[4, 5], &[3, 5]).unwrap(), GemmDims { m: 3, n: 5, k: 4 });
    }

    #[test]
    fn mismatches_are_errors_that_name_the_shapes() {
        let g = Gemm::default();
        let e = g.dims(&[3, 4], &[5, 5], &[3, 5]).unwrap_err().to_string();
        assert!(e.contains("inner dimensions differ") && e.contains("[5, 5]"), "{e}");
        let e = g.dims(&[3, 4], &[4, 5], &[5, 3]).unwrap_err().to_string();
        assert!(e.contains("C is [5, 3]"), "{e}");
        let e = g.dims(&[3, 4, 1], &[4, 5], &[3, 5]).unwrap_err().to_string();
        assert!(e.contains("A must be a matrix"), "{e}");
    }
}
