//! A lane of the GPU randomized SVD's plan ([`super::rsvd_cuda::CudaRsvd`]): a stream with its
//! own cuBLAS and cuSOLVER handles and the device workspace one layer in flight uses, sized for
//! the largest layer seen.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream};

use super::cusolver::Solver;
use super::rsvd_cuda_orth::{partials_len, tickets_len};
use super::rsvd_cuda_skinny::SkinnyScratch;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

/// A stream with its own cuBLAS and cuSOLVER handles and workspace. Layer i of a batch runs on
/// lane i mod LANES, so one layer's small q × q launches overlap another's large products, and
/// the host copies a finished layer out while the other lane computes.
pub(super) struct Lane {
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    pub(super) solver: Solver,
    pub(super) ws: Workspace,
    /// The largest q whose CholeskyQR passes use the fused kernels ([`super::rsvd_cuda_orth::cholesky_qr_fused_max_q`]).
    pub(super) fused_max_q: usize,
    /// The largest q whose core uses the Jacobi kernel ([`super::rsvd_cuda_jacobi::jacobi_core_max_q`]).
    pub(super) jacobi_max_q: usize,
}

/// Device scratch of one lane, sized by [`Need`].
pub(super) struct Workspace {
    pub(super) y: CudaSlice<f32>,
    pub(super) z: CudaSlice<f32>,
    pub(super) wide: CudaSlice<f64>,
    pub(super) gram: CudaSlice<f64>,
    pub(super) r: CudaSlice<f32>,
    pub(super) r2: CudaSlice<f32>,
    pub(super) small_u: CudaSlice<f32>,
    pub(super) small_v: CudaSlice<f32>,
    pub(super) out_p: CudaSlice<f32>,
    pub(super) out_c: CudaSlice<f32>,
    pub(super) s: CudaSlice<f32>,
    /// f64 q × q: R of the last orth, R V, and the eigenvalues of RᵀR (q).
    pub(super) rt: CudaSlice<f64>,
    pub(super) rv: CudaSlice<f64>,
    pub(super) w: CudaSlice<f64>,
    /// U_R in f64 [q, k], kept for its orthogonality check.
    pub(super) core_u: CudaSlice<f64>,
    /// The fused CholeskyQR pass's R⁻¹ (f64 q × q), partial Grams and ticket counters
    /// ([`super::rsvd_cuda_orth`]), sized for min(q, fused_max_q).
    pub(super) rinv: CudaSlice<f64>,
    pub(super) partials: CudaSlice<f64>,
    pub(super) tickets: CudaSlice<u32>,
    /// The products' kernels' scratch ([`super::rsvd_cuda_skinny`]), for outputs and reductions up
    /// to the long side.
    pub(super) skinny: SkinnyScratch,
    /// cuSOLVER's workspace (the larger of potrf's and syevd's for every q reserved) and info.
    pub(super) work: CudaSlice<f64>,
    pub(super) info: CudaSlice<i32>,
}

/// Element counts of the workspace buffers.
#[derive(Clone, Copy, Default, PartialEq)]
pub(super) struct Need {
    pq: usize,
    cq: usize,
    qq: usize,
    qk: usize,
    pk: usize,
    ck: usize,
    q: usize,
    k: usize,
    /// The long side.
    p: usize,
}

impl Need {
    pub(super) fn of(m: usize, n: usize, q: usize, k: usize) -> Need {
        let (p, c) = (m.max(n), m.min(n));
        Need { pq: p * q, cq: c * q, qq: q * q, qk: q * k, pk: p * k, ck: c * k, q, k, p }
    }

    pub(super) fn max(self, o: Need) -> Need {
        Need {
            pq: self.pq.max(o.pq),
            cq: self.cq.max(o.cq),
            qq: self.qq.max(o.qq),
            qk: self.qk.max(o.qk),
            pk: self.pk.max(o.pk),
            ck: self.ck.max(o.ck),
            q: self.q.max(o.q),
            k: self.k.max(o.k),
            p: self.p.max(o.p),
        }
    }
}

/// A lane's workspace for `need` on `dev`, on its stream; the fused pass's buffers for q up to
/// `fused_max_q`.
pub(super) fn allocate(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    need: Need,
    fused_max_q: usize,
) -> Result<Workspace> {
    let fused_q = need.q.min(fused_max_q);
    let f32s = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(Error::cuda("cuMemAlloc"));
    let f64s = |n: usize| stream.alloc_zeros::<f64>(n.max(1)).map_err(Error::cuda("cuMemAlloc"));
    Ok(Workspace {
        y: f32s(need.pq)?,
        z: f32s(need.cq)?,
        wide: f64s(need.pq)?,
        gram: f64s(need.qq)?,
        r: f32s(need.qq)?,
        r2: f32s(need.qq)?,
        small_u: f32s(need.qk)?,
        small_v: f32s(need.qk)?,
        out_p: f32s(need.pk)?,
        out_c: f32s(need.ck)?,
        s: f32s(need.k)?,
        rt: f64s(need.qq)?,
        rv: f64s(need.qq)?,
        w: f64s(need.q)?,
        core_u: f64s(need.qk)?,
        rinv: f64s(fused_q * fused_q)?,
        partials: f64s(partials_len(fused_q))?,
        tickets: stream.alloc_zeros::<u32>(tickets_len(fused_q).max(1)).map_err(Error::cuda("cuMemAlloc"))?,
        skinny: SkinnyScratch::new(dev, stream, need.p, need.p, need.q)?,
        work: f64s(1)?, // sized by reserve, per q
        info: stream.alloc_zeros::<i32>(1).map_err(Error::cuda("cuMemAlloc"))?,
    })
}
