//! cuSOLVER's own randomized SVD, `cusolverDnXgesvdr`, as a baseline for [`super::CudaRsvd`]
//! (the bench runs both; a GPU test checks this wrapper's answers). Not used by LoRA-GA.
//!
//! gesvdr takes the rank k and the oversampling p separately and works with k + p columns; to
//! compare at torch's q (all columns), it is called with k = q − ⌊q/2⌋ and p = ⌊q/2⌋, which is
//! LoRA-GA's split (keep the top 2r of q = 4r), fp32 in and out, `niters` power iterations.
//!
//! Layout: gesvdr is handed the tall orientation T [p, c] (p ≥ c) of A in column-major order,
//! which every gesvd-style routine accepts: the row-major A [m, n] is the column-major Aᵀ, so a
//! wide A is T = Aᵀ as it lies, and a tall A is transposed into T = A by cublasSgeam. gesvdr
//! destroys its input anyway, so T is that scratch copy (inside any timing: one device copy or
//! transpose). T = U' Σ V'ᵀ gives A's U = U', V = V' for a tall A and U = V', V = U' for a wide
//! one; the column-major [n, k] storage of A's V is already the row-major [k, n] of Vᵀ that
//! [`TruncatedSvd`] wants. U' and V' get full square buffers (ld × ld), the size cuSOLVER's
//! documentation gives them.

use cudarc::cusolver::result as solver_result;
use cudarc::cusolver::sys::{self as sys, cudaDataType};
use cudarc::driver::CudaSlice;

use super::TruncatedSvd;
use super::cusolver::Solver;
use super::rsvd_cuda::CudaMatrixRef;
use super::rsvd_cuda_blas::dptr;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

const OP: &str = "cusolverDnXgesvdr";

/// A reusable gesvdr call: handle, parameters and buffers for the last shape seen.
pub struct CusolverGesvdr {
    dev: CudaDevice,
    solver: Solver,
    params: Params,
    bufs: Option<Buffers>,
}

struct Buffers {
    key: (usize, usize, usize, usize),
    a: CudaSlice<f32>,
    s: CudaSlice<f32>,
    u: CudaSlice<f32>,
    v: CudaSlice<f32>,
    work: CudaSlice<u8>,
    host_work: Vec<u8>,
    info: CudaSlice<i32>,
}

/// cusolverDnParams_t, destroyed on drop.
struct Params(sys::cusolverDnParams_t);

impl Drop for Params {
    fn drop(&mut self) {
        // SAFETY: created by dn_create_params and destroyed once; a failure here cannot be
        // reported from drop and leaks nothing but the parameter block.
        let _ = unsafe { solver_result::dn_destroy_params(self.0) };
    }
}

impl CusolverGesvdr {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let solver = Solver::new(dev.stream())?;
        let params = Params(solver_result::dn_create_params().map_err(Error::cusolver("cusolverDnCreateParams"))?);
        Ok(CusolverGesvdr { dev: dev.clone(), solver, params, bufs: None })
    }

    /// The rank-(q − ⌊q/2⌋) randomized SVD of `a` with oversampling ⌊q/2⌋ and `niters` power
    /// iterations (see the module docs), downloaded.
    pub fn run(&mut self, name: &str, a: CudaMatrixRef<'_>, q: usize, niters: usize) -> Result<TruncatedSvd> {
        let (m, n) = (a.rows, a.cols);
        if q < 2 || q > m.min(n) {
            return Err(Error::layer(OP, name, format!("q = {q} must be in 2..={} for shape [{m}, {n}]", m.min(n))));
        }
        let (p, k) = (q / 2, q - q / 2);
        let tall = m >= n;
        let (mm, nn) = (m.max(n), m.min(n)); // T is [mm, nn], ld mm
        self.prepare((mm, nn, q, niters))?;
        let stream = self.dev.stream().clone();
        let b = self.bufs.as_mut().expect("prepared");
        if tall {
            transpose(self.dev.cublas()?, n, m, dptr(a.slice(), &self.dev), dptr(&b.a, &self.dev))?;
        } else {
            stream.memcpy_dtod(&a.slice().slice(..m * n), &mut b.a).map_err(Error::cuda("cuMemcpyDtoD"))?;
        }
        let f32t = cudaDataType::CUDA_R_32F;
        let (ap, sp, up, vp) =
            (dptr(&b.a, &self.dev), dptr(&b.s, &self.dev), dptr(&b.u, &self.dev), dptr(&b.v, &self.dev));
        let (work, info) = (dptr(&b.work, &self.dev), dptr(&b.info, &self.dev));
        // SAFETY: buffers sized by prepare for this (m', n', k, niters): A m'*n', S min(m', n'),
        // U m'*m' (ld m'), V n'*n' (ld n'), the device and host workspaces as queried; all on
        // the handle's stream.
        unsafe {
            sys::cusolverDnXgesvdr(
                self.solver.handle().cu(),
                self.params.0,
                b'S' as i8,
                b'S' as i8,
                mm as i64,
                nn as i64,
                k as i64,
                p as i64,
                niters as i64,
                f32t,
                ap as *mut _,
                mm as i64,
                f32t,
                sp as *mut _,
                f32t,
                up as *mut _,
                mm as i64,
                f32t,
                vp as *mut _,
                nn as i64,
                f32t,
                work as *mut _,
                b.work.len(),
                b.host_work.as_mut_ptr().cast(),
                b.host_work.len(),
                info as *mut _,
            )
        }
        .result()
        .map_err(Error::cusolver("cusolverDnXgesvdr"))?;
        let down =
            |s: &CudaSlice<f32>, len: usize| stream.clone_dtoh(&s.slice(..len)).map_err(Error::cuda("cuMemcpyDtoH"));
        let info = stream.clone_dtoh(&b.info).map_err(Error::cuda("cuMemcpyDtoH"))?[0];
        if info != 0 {
            return Err(Error::layer(OP, name, format!("gesvdr returned info = {info}")));
        }
        let s = down(&b.s, k)?;
        // U'[:, :k] (ld mm) and V'[:, :k] (ld nn), column-major.
        let (u_t, v_t) = (down(&b.u, mm * k)?, down(&b.v, nn * k)?);
        let (u_cols, vt) = if tall { (u_t, v_t) } else { (v_t, u_t) };
        let u = (0..m).flat_map(|i| (0..k).map(move |j| (i, j))).map(|(i, j)| u_cols[i + j * m]).collect();
        TruncatedSvd::from_parts(u, s, vt, m, n)
    }

    /// Buffers and workspace for gesvdr of an m' × n' matrix (m' ≥ n') with q columns in all.
    fn prepare(&mut self, key: (usize, usize, usize, usize)) -> Result<()> {
        if self.bufs.as_ref().is_some_and(|b| b.key == key) {
            return Ok(());
        }
        let (mm, nn, q, niters) = key;
        let (p, k) = (q / 2, q - q / 2);
        self.bufs = None; // free the old buffers first
        let stream = self.dev.stream();
        let f32s = |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(Error::cuda("cuMemAlloc"));
        let (a, s, u, v) = (f32s(mm * nn)?, f32s(mm.min(nn))?, f32s(mm * mm)?, f32s(nn * nn)?);
        let f32t = cudaDataType::CUDA_R_32F;
        let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
        let ptr = |x: &CudaSlice<f32>| dptr(x, &self.dev) as *const std::ffi::c_void;
        // SAFETY: a size query over live buffers of the sizes documented for these arguments.
        unsafe {
            sys::cusolverDnXgesvdr_bufferSize(
                self.solver.handle().cu(),
                self.params.0,
                b'S' as i8,
                b'S' as i8,
                mm as i64,
                nn as i64,
                k as i64,
                p as i64,
                niters as i64,
                f32t,
                ptr(&a),
                mm as i64,
                f32t,
                ptr(&s),
                f32t,
                ptr(&u),
                mm as i64,
                f32t,
                ptr(&v),
                nn as i64,
                f32t,
                &mut dev_bytes,
                &mut host_bytes,
            )
        }
        .result()
        .map_err(Error::cusolver("cusolverDnXgesvdr_bufferSize"))?;
        let work = stream.alloc_zeros::<u8>(dev_bytes.max(1)).map_err(Error::cuda("cuMemAlloc"))?;
        let info = stream.alloc_zeros::<i32>(1).map_err(Error::cuda("cuMemAlloc"))?;
        self.bufs = Some(Buffers { key, a, s, u, v, work, host_work: vec![0; host_bytes.max(1)], info });
        Ok(())
    }
}

/// Column-major C [cols, rows] = Bᵀ for the column-major B [rows, cols] (ld rows), via
/// cublasSgeam (C = 1·Bᵀ + 0·C).
fn transpose(blas: &cudarc::cublas::CudaBlas, rows: usize, cols: usize, b: u64, c: u64) -> Result<()> {
    use cudarc::cublas::sys::{cublasOperation_t, cublasSgeam};
    let (one, zero) = (1.0f32, 0.0f32);
    // SAFETY: b holds rows*cols f32 (ld rows), c as many (ld cols); beta = 0 so the second
    // operand (c itself, ld cols) is not read for its values.
    unsafe {
        cublasSgeam(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            cols as i32,
            rows as i32,
            &one,
            b as *const f32,
            rows as i32,
            &zero,
            c as *const f32,
            cols as i32,
            c as *mut f32,
            cols as i32,
        )
    }
    .result()
    .map_err(Error::cublas("cublasSgeam(transpose)"))
}
