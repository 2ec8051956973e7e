//! The dense products of the GPU randomized SVD ([`super::rsvd_cuda`]): the ten products with A
//! in its tall orientation ([`Products`]: our skinny kernels for fp32 where they take the
//! product, [`super::rsvd_cuda_skinny`], cuBLAS otherwise), f32/f64 GEMMs on cuBLAS in its
//! column-major convention, the triangular solve, the exact f64 Gram of an f32 panel, and the
//! widening of a bf16 input. Shared by the device path, the host-assisted fallback and the
//! gesvdr baseline.

use std::sync::Arc;

use cudarc::cublas::sys::{self as blas_sys, cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas_result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::rsvd_cuda::{CudaMatrixRef, GemmMath, OP};
use super::rsvd_cuda_lane::Workspace;
use super::rsvd_cuda_skinny::{SkinnyBuffers, SkinnyProduct, kernel_for, skinny_product};
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage};
use crate::error::{Error, Result};

/// The products with A that both paths make, in the tall orientation op(A) [p, c] of the module
/// docs, on column-major Y [p, q] and Z [c, q] buffers.
pub(super) struct Products<'a> {
    dev: &'a CudaDevice,
    stream: &'a Arc<CudaStream>,
    blas: &'a CudaBlas,
    math: GemmMath,
    /// Our kernels' scratch when one takes fp32 products of q columns on this device, else None:
    /// cuBLAS.
    skinny: Option<SkinnyBuffers>,
    tall: bool,
    p: usize,
    c: usize,
    n: usize,
    q: usize,
    a: u64,
    pub(super) y: u64,
    pub(super) z: u64,
}

impl<'a> Products<'a> {
    /// The products of `a` queued on `stream` (`blas` is bound to it), into the workspace's Y
    /// and Z, with its split buffers when our kernel runs them.
    pub(super) fn new(
        dev: &'a CudaDevice,
        stream: &'a Arc<CudaStream>,
        blas: &'a CudaBlas,
        math: GemmMath,
        a: CudaMatrixRef<'_>,
        q: usize,
        ws: &Workspace,
    ) -> Self {
        let (m, n) = (a.rows, a.cols);
        let tall = m >= n;
        let (p, c) = if tall { (m, n) } else { (n, m) };
        let skinny = (math == GemmMath::Fp32 && kernel_for(dev, q).is_some()).then(|| ws.skinny.buffers(dev));
        let (y, z) = (dptr(&ws.y, dev), dptr(&ws.z, dev));
        Products { dev, stream, blas, math, skinny, tall, p, c, n, q, a: dptr(a.slice(), dev), y, z }
    }

    pub(super) fn long_side(&self) -> usize {
        self.p
    }

    pub(super) fn short_side(&self) -> usize {
        self.c
    }

    /// Y [p, q] = op(A) W, with W column-major [c, q]. The row-major A [m, n] is the
    /// column-major M [n, m] (ld n); op(A) = Mᵀ when A is tall.
    fn range(&self, w: u64) -> Result<()> {
        let (p, c, q) = (self.p, self.c, self.q);
        if let Some(buffers) = self.skinny {
            // Tall: Y = A W (A row-major [p, c]); wide: Y = Aᵀ W (A row-major [c, p]).
            let product = SkinnyProduct { a: self.a, trans: !self.tall, m: p, k: c, v: w, q, out: self.y };
            if skinny_product(self.dev, self.stream, product, buffers)? {
                return Ok(());
            }
        }
        xgemm(self.blas, Precision::F32(self.math), self.tall, false, p, q, c, self.a, self.n, w, c, self.y, p)
    }

    /// Z [c, q] = op(A)ᵀ Q, Q = Y [p, q].
    fn corange(&self) -> Result<()> {
        let (p, c, q) = (self.p, self.c, self.q);
        if let Some(buffers) = self.skinny {
            let product = SkinnyProduct { a: self.a, trans: self.tall, m: c, k: p, v: self.y, q, out: self.z };
            if skinny_product(self.dev, self.stream, product, buffers)? {
                return Ok(());
            }
        }
        xgemm(self.blas, Precision::F32(self.math), !self.tall, false, c, q, p, self.a, self.n, self.y, p, self.z, c)
    }

    /// The range finder up to Z = op(A)ᵀ Q (Ω column-major [c, q] at `omega`, niter power
    /// iterations), calling `orth(x, rows, last)` after every product but that last one, whose
    /// orth the caller does.
    /// `last` marks the orth whose Q is the returned basis (U or V is made from it); the others
    /// only carry a subspace to the next product.
    pub(super) fn range_finder(
        &self,
        omega: u64,
        niter: usize,
        mut orth: impl FnMut(u64, usize, bool) -> Result<()>,
    ) -> Result<()> {
        let (y, z, p, c) = (self.y, self.z, self.p, self.c);
        self.range(omega)?;
        orth(y, p, niter == 0)?;
        for i in 0..niter {
            self.corange()?;
            orth(z, c, false)?;
            self.range(z)?;
            orth(y, p, i + 1 == niter)?;
        }
        self.corange()
    }

    /// From V_R and U_R (column-major [q, k] at `sv`, `su`): out_p = Q V_R ([p, k] col-major =
    /// row-major [k, p]) or its transpose ([k, p] col-major = row-major [p, k]); out_c likewise
    /// for Q₂ U_R. Tall A: U = Q V_R, V = Q₂ U_R. Wide A (factored as Aᵀ): U = Q₂ U_R, V = Q V_R.
    pub(super) fn factors(&self, k: usize, sv: u64, su: u64, out_p: u64, out_c: u64) -> Result<()> {
        let (blas, fp32, p, c, q, y, z) = (self.blas, GemmMath::Fp32, self.p, self.c, self.q, self.y, self.z);
        if self.tall {
            xgemm(blas, Precision::F32(fp32), true, true, k, p, q, sv, q, y, p, out_p, k)?;
            xgemm(blas, Precision::F32(fp32), false, false, c, k, q, z, c, su, q, out_c, c)
        } else {
            xgemm(blas, Precision::F32(fp32), false, false, p, k, q, y, p, sv, q, out_p, p)?;
            xgemm(blas, Precision::F32(fp32), true, true, k, c, q, su, q, z, c, out_c, k)
        }
    }
}

pub(super) fn dptr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    // The guard only records events when event tracking is on; CudaDevice switches it off.
    let (p, _guard) = s.device_ptr(dev.stream());
    p
}

pub(super) fn grid(dev: &CudaDevice, n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, dev.sm_count().max(1) * 8);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// What a column-major product is computed in: f32 data (full fp32 or TF32 products), or f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Precision {
    F32(GemmMath),
    F64,
}

/// Column-major C [m, n] = op(A) op(B) (beta = 0), cuBLAS's own convention, in `precision`.
#[allow(clippy::too_many_arguments)]
pub(super) fn xgemm(
    blas: &CudaBlas,
    precision: Precision,
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
) -> Result<()> {
    let dims = Dims { ta, tb, m, n, k, lda, ldb, ldc };
    match precision {
        Precision::F32(math) => {
            let compute = match math {
                GemmMath::Fp32 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
                GemmMath::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            };
            let (one, zero) = (1.0f32, 0.0f32);
            let scalars = ((&one as *const f32).cast(), (&zero as *const f32).cast());
            gemm(blas, dims, (a, b, c), cudaDataType::CUDA_R_32F, compute, scalars)
                .map_err(Error::cublas("cublasGemmEx(f32)"))
        }
        Precision::F64 => {
            let (one, zero) = (1.0f64, 0.0f64);
            let scalars = ((&one as *const f64).cast(), (&zero as *const f64).cast());
            gemm(blas, dims, (a, b, c), cudaDataType::CUDA_R_64F, cublasComputeType_t::CUBLAS_COMPUTE_64F, scalars)
                .map_err(Error::cublas("cublasGemmEx(f64)"))
        }
    }
}

/// Shape and transposes of one cublasGemmEx call.
struct Dims {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
}

/// cublasGemmEx with A, B, C all of type `ty`; `scalars` are host pointers to alpha = 1 and
/// beta = 0 of the compute type's scalar type.
fn gemm(
    blas: &CudaBlas,
    d: Dims,
    (a, b, c): (u64, u64, u64),
    ty: cudaDataType,
    compute: cublasComputeType_t,
    scalars: (*const std::ffi::c_void, *const std::ffi::c_void),
) -> std::result::Result<(), cudarc::cublas::result::CublasError> {
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    // SAFETY: the callers pass live device buffers whose sizes match the dimensions and leading
    // dimensions, and alpha/beta of the scalar type that `compute` requires.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            op(d.ta),
            op(d.tb),
            d.m as i32,
            d.n as i32,
            d.k as i32,
            scalars.0,
            a as *const _,
            ty,
            d.lda as i32,
            b as *const _,
            ty,
            d.ldb as i32,
            scalars.1,
            c as *mut _,
            ty,
            d.ldc as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}

/// X ← X R⁻¹ for column-major X [rows, q] and upper-triangular R [q, q].
pub(super) fn strsm_right_upper(blas: &CudaBlas, rows: usize, q: usize, r: u64, x: u64) -> Result<()> {
    let one = 1.0f32;
    // SAFETY: r holds q*q f32 (ld q), x rows*q f32 (ld rows), both live device buffers.
    unsafe {
        blas_sys::cublasStrsm_v2(
            *blas.handle(),
            blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
            blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
            cublasOperation_t::CUBLAS_OP_N,
            blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
            rows as i32,
            q as i32,
            &one,
            r as *const f32,
            q as i32,
            x as *mut f32,
            rows as i32,
        )
    }
    .result()
    .map_err(Error::cublas("cublasStrsm"))
}

/// A bf16 device matrix widened to f32 on the device (LoRA-GA's `grad.float()`).
pub(crate) fn widen_bf16(s: &CudaStorage) -> Result<CudaStorage> {
    let CudaSlices::BF16(src) = &s.slice else {
        return Err(Error::DType { op: OP, msg: format!("widen_bf16 got {}", s.dtype()) });
    };
    let dev = &s.device;
    let n = src.len();
    let mut out = dev.stream().alloc_zeros::<f32>(n).map_err(Error::cuda("cuMemAlloc"))?;
    if n > 0 {
        let f = dev.function("rsvd", "rsvd_bf16_to_f32")?;
        let len = n as i64;
        let mut launch = dev.stream().launch_builder(&f);
        launch.arg(src).arg(&mut out).arg(&len);
        // SAFETY: rsvd_bf16_to_f32(const bf16*, float*, i64) over n elements of each buffer.
        unsafe { launch.launch(grid(dev, n)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_bf16_to_f32)"))?;
    }
    Ok(CudaStorage { slice: CudaSlices::F32(out), device: dev.clone() })
}

/// G = XᵀX [q, q] in f64 for the column-major f32 X [rows, q]: X widened exactly into `wide`
/// (`kernels/rsvd.cu`), then DGEMM. The products of f32 values are exact in f64 and accumulate
/// in f64, so G carries f64 accuracy and Cholesky works up to cond(X) ≈ 1e7 (an f32 Gram fails
/// near 3e3).
#[allow(clippy::too_many_arguments)]
pub(super) fn gram_f64(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    x: u64,
    rows: usize,
    q: usize,
    wide: u64,
    gram: u64,
) -> Result<()> {
    let len = rows * q;
    let f = dev.function("rsvd", "rsvd_f32_to_f64")?;
    let len64 = len as i64;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&x).arg(&wide).arg(&len64);
    // SAFETY: rsvd_f32_to_f64(const float*, double*, i64): x holds rows*q f32 and the wide
    // workspace at least as many f64 (both sized by Need::pq or cq ≤ pq).
    unsafe { launch.launch(grid(dev, len)) }.map_err(Error::cuda("cuLaunchKernel(rsvd_f32_to_f64)"))?;
    xgemm(blas, Precision::F64, true, false, q, q, rows, wide, rows, wide, rows, gram, q)
}
