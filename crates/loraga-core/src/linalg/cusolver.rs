//! The few cuSOLVER dense calls the GPU randomized SVD makes, each checked and on one stream: Cholesky (`potrf`) and the symmetric eigen-decomposition (`syevd`), both f64 on q × q
//! matrices, with their workspace queries. cuSOLVER is opened at run time (see
//! [`crate::cuda::libs::ensure_cusolver`]); a machine without it gets [`Error::NoCusolver`].
//!
//! Both calls report numerical failure through an `info` integer in device memory, which they
//! write asynchronously: the callers turn it into a per-layer flag on the device
//! (`kernels/rsvd_factor.cu`) instead of reading it back, so nothing here waits on the GPU.

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cusolver::DnHandle;
use cudarc::cusolver::sys::{self as sys, cublasFillMode_t, cusolverEigMode_t};

use cudarc::driver::CudaStream;

use crate::cuda::libs;
use crate::error::{Error, Result};

/// A cuSOLVER dense handle bound to a stream, deterministic results requested.
pub struct Solver {
    handle: DnHandle,
}

impl Solver {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Solver> {
        libs::ensure_cusolver()?;
        let handle = DnHandle::new(stream.clone()).map_err(Error::cusolver("cusolverDnCreate"))?;
        handle
            .set_deterministic_mode(sys::cusolverDeterministicMode_t::CUSOLVER_DETERMINISTIC_RESULTS)
            .map_err(Error::cusolver("cusolverDnSetDeterministicMode"))?;
        Ok(Solver { handle })
    }

    pub fn handle(&self) -> &DnHandle {
        &self.handle
    }

    /// f64 elements of workspace `potrf` needs for a q × q matrix (ld q) at `a`.
    pub fn potrf_work(&self, q: usize, a: u64) -> Result<usize> {
        let mut lwork: c_int = 0;
        // SAFETY: a query only; `a` is a device buffer of at least q*q f64 (it reads no data).
        unsafe {
            sys::cusolverDnDpotrf_bufferSize(
                self.handle.cu(),
                cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                q as c_int,
                a as *mut f64,
                q as c_int,
                &mut lwork,
            )
        }
        .result()
        .map_err(Error::cusolver("cusolverDnDpotrf_bufferSize"))?;
        Ok(lwork.max(1) as usize)
    }

    /// In place: the upper triangle of the q × q f64 matrix at `a` (ld q) becomes R with
    /// RᵀR = A; `*info` (device) becomes non-zero when A is not numerically positive definite.
    pub fn potrf(&self, q: usize, a: u64, work: u64, lwork: usize, info: u64) -> Result<()> {
        // SAFETY: the caller passes live device buffers: a of q*q f64, work of lwork f64 (from
        // potrf_work for this q), info of one int; all on this handle's stream.
        unsafe {
            sys::cusolverDnDpotrf(
                self.handle.cu(),
                cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                q as c_int,
                a as *mut f64,
                q as c_int,
                work as *mut f64,
                lwork as c_int,
                info as *mut c_int,
            )
        }
        .result()
        .map_err(Error::cusolver("cusolverDnDpotrf"))
    }

    /// f64 elements of workspace `syevd` needs for a q × q matrix.
    pub fn syevd_work(&self, q: usize, a: u64, w: u64) -> Result<usize> {
        let mut lwork: c_int = 0;
        // SAFETY: a query only; a and w are device buffers of q*q and q f64.
        unsafe {
            sys::cusolverDnDsyevd_bufferSize(
                self.handle.cu(),
                cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                q as c_int,
                a as *const f64,
                q as c_int,
                w as *const f64,
                &mut lwork,
            )
        }
        .result()
        .map_err(Error::cusolver("cusolverDnDsyevd_bufferSize"))?;
        Ok(lwork.max(1) as usize)
    }

    /// A = V diag(w) Vᵀ for the symmetric q × q f64 matrix at `a` (upper triangle read): the
    /// eigenvalues ascending into `w`, the orthonormal eigenvectors over `a`.
    pub fn syevd(&self, q: usize, a: u64, w: u64, work: u64, lwork: usize, info: u64) -> Result<()> {
        // SAFETY: as potrf, plus w of q f64.
        unsafe {
            sys::cusolverDnDsyevd(
                self.handle.cu(),
                cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                q as c_int,
                a as *mut f64,
                q as c_int,
                w as *mut f64,
                work as *mut f64,
                lwork as c_int,
                info as *mut c_int,
            )
        }
        .result()
        .map_err(Error::cusolver("cusolverDnDsyevd"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cusolver_is_an_error_that_says_what_and_where_not_a_panic() {
        // CI has no cuSOLVER: this is the error LoRA-GA's GPU path would return there. A GPU
        // machine has it, and then the check must simply pass.
        match libs::ensure_cusolver() {
            Ok(()) => {}
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, Error::NoCusolver { .. }), "{msg}");
                assert!(msg.contains("cuSOLVER not found") && msg.contains("libcusolver.so.12"), "{msg}");
            }
        }
    }
}
