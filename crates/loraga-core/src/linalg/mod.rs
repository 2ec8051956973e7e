//! Dense linear algebra: the randomized SVD that LoRA-GA runs on every target layer's gradient,
//! on the host ([`rsvd`]) and on the GPU ([`rsvd_cuda`], same config, Ω and result type; its
//! q × q factorisations through [`cusolver`]), cuSOLVER's own randomized SVD as the GPU baseline
//! ([`gesvdr_cuda`]), and the exact SVD the tests hold them against ([`svd`]).
//!
//! Inputs are row-major f32 matrices borrowed as [`MatrixRef`], the layout tensors use, so a CPU
//! [`crate::Tensor`] is read without a copy. Work happens in f64 (see [`rsvd`] for why); results
//! come back as f32 in a [`TruncatedSvd`].

pub mod cusolver;
pub mod gesvdr_cuda;
pub mod rsvd;
pub mod rsvd_cuda;
mod rsvd_cuda_blas;
mod rsvd_cuda_device;
mod rsvd_cuda_host;
mod rsvd_cuda_jacobi;
mod rsvd_cuda_lane;
mod rsvd_cuda_orth;
mod rsvd_cuda_skinny;
pub mod svd;

pub use gesvdr_cuda::CusolverGesvdr;
pub use rsvd::{
    RsvdConfig, gaussian_test_matrix, svd_lowrank, svd_lowrank_batch, svd_lowrank_tensor, svd_lowrank_with_omega,
};
pub use rsvd_cuda::{
    CudaMatrixRef, CudaRsvd, CudaTruncatedSvd, GemmMath, svd_lowrank_batch_cuda, svd_lowrank_cuda,
    svd_lowrank_cuda_device,
};
pub use rsvd_cuda_jacobi::{JacobiCore, jacobi_core_cuda, jacobi_core_max_q};
pub use rsvd_cuda_orth::{CholeskyQrPass, cholesky_qr_fused_max_q, cholesky_qr_pass_cuda};
pub use rsvd_cuda_skinny::{SkinnyProducts, SkinnyRun};
pub use svd::{TruncatedSvd, TruncatedSvdOf, svd_exact};

use faer::Mat;

use crate::error::{Error, Result};

/// A borrowed row-major f32 matrix: element (i, j) is `data[i * cols + j]`.
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatrixRef<'a> {
    /// `data` must hold exactly `rows * cols` elements.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if Some(data.len()) != rows.checked_mul(cols) {
            return Err(Error::shape(
                "MatrixRef::new",
                format!("{} elements do not fill [{rows}, {cols}]", data.len()),
            ));
        }
        Ok(MatrixRef { data, rows, cols })
    }

    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix widened to f64 (exact), or its transpose: faer works on column-major `Mat`s.
    pub(crate) fn to_f64(self, transpose: bool) -> Mat<f64> {
        let (r, c, d) = (self.rows, self.cols, self.data);
        if transpose {
            Mat::from_fn(c, r, |i, j| d[j * c + i] as f64)
        } else {
            Mat::from_fn(r, c, |i, j| d[i * c + j] as f64)
        }
    }

    /// Rejects what no SVD should be asked to factor: an empty matrix, or NaN/Inf (a diverged
    /// gradient), reported with the first bad position so the layer can be found.
    pub(crate) fn check_factorable(&self, op: &'static str, name: &str) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(Error::shape(op, format!("layer `{name}` is empty: shape [{}, {}]", self.rows, self.cols)));
        }
        if let Some(idx) = self.data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                op,
                name: name.to_string(),
                row: idx / self.cols,
                col: idx % self.cols,
                value: self.data[idx],
            });
        }
        Ok(())
    }
}
