//! GEMM on the device, by the paths loraga compares: the naive kernel (`kernels/gemm_naive.cu`),
//! cuBLAS, and the Hopper engine (`kernels/gemm_sm90.cu`, see gemm_sm90.rs).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::gemm_sm90::{self, KSource};
use super::storage::{CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, GemmDims};

/// Which implementation computes a device GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// `kernels/gemm_naive.cu`: the baseline every faster kernel is measured against.
    Naive,
    /// cuBLAS `cublasGemmEx` with fp32 compute (CUBLAS_COMPUTE_32F: full fp32 for f32 operands,
    /// no TF32), the library baseline.
    Cublas,
    /// cuBLASLt `cublasLtMatmul` with its heuristic's first algorithm (what PyTorch's matmul
    /// uses): bf16 operands and output only. The stronger library baseline.
    CublasLt,
    /// The Hopper GEMM engine: bf16 operands, any transposes, sm_90a, each operand's contiguous
    /// dimension a multiple of 8. Anything else is an error naming the reason.
    Engine,
    /// The engine where it applies, else the naive kernel: correct everywhere, fast where the
    /// engine covers the problem. The default of the CUDA backend.
    Auto,
}

impl GemmPath {
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Naive => "naive",
            GemmPath::Cublas => "cublas",
            GemmPath::CublasLt => "cublaslt",
            GemmPath::Engine => "engine",
            GemmPath::Auto => "auto",
        }
    }
}

/// `c = alpha * op(a) op(b) + beta * c` on the device. Shapes were checked by the caller
/// (`crate::gemm::gemm`); this checks dtypes and devices.
pub fn gemm(
    path: GemmPath,
    g: &Gemm,
    d: GemmDims,
    a: &CudaStorage,
    b: &CudaStorage,
    c: &mut CudaStorage,
) -> Result<()> {
    if a.device != c.device || b.device != c.device {
        return Err(Error::DeviceMismatch {
            op: "gemm",
            lhs: format!("{:?}", a.device),
            rhs: format!("{:?}", b.device),
        });
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DType { op: "gemm", msg: format!("A is {} but B is {}", a.dtype(), b.dtype()) });
    }
    if d.m == 0 || d.n == 0 {
        return Ok(());
    }
    for (what, v) in [("M", d.m), ("N", d.n), ("K", d.k)] {
        if v > i32::MAX as usize {
            return Err(Error::shape("gemm", format!("{what} = {v} exceeds the 32-bit dimension limit")));
        }
    }
    match path {
        GemmPath::Naive => naive(g, d, a, b, c),
        GemmPath::Cublas => cublas(g, d, a, b, c),
        GemmPath::CublasLt => cublaslt(g, d, a, b, c),
        GemmPath::Engine => match engine_refusal(g, d, a, b, c) {
            None => engine(g, d, a, b, c),
            Some(why) => Err(Error::InvalidArgument(why)),
        },
        GemmPath::Auto => match engine_refusal(g, d, a, b, c) {
            None => engine(g, d, a, b, c),
            Some(_) => naive(g, d, a, b, c),
        },
    }
}

fn engine_refusal(g: &Gemm, d: GemmDims, a: &CudaStorage, b: &CudaStorage, c: &CudaStorage) -> Option<String> {
    gemm_sm90::unsupported(g, &[KSource { a, b, k: d.k }], d.m, d.n, c)
}

fn engine(g: &Gemm, d: GemmDims, a: &CudaStorage, b: &CudaStorage, c: &mut CudaStorage) -> Result<()> {
    gemm_sm90::gemm(g, &[KSource { a, b, k: d.k }], d.m, d.n, c)
}

/// Row and column strides of op(A) [M, K] and op(B) [K, N] for row-major storage.
fn strides(g: &Gemm, d: GemmDims) -> (i64, i64, i64, i64) {
    let (m, n, k) = (d.m as i64, d.n as i64, d.k as i64);
    let (a_rs, a_cs) = if g.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if g.trans_b { (1, k) } else { (n, 1) };
    (a_rs, a_cs, b_rs, b_cs)
}

fn naive(g: &Gemm, d: GemmDims, a: &CudaStorage, b: &CudaStorage, c: &mut CudaStorage) -> Result<()> {
    let name = format!("gemm_naive_{}_{}", a.dtype(), c.dtype());
    if a.dtype() == DType::F32 && c.dtype() == DType::BF16 {
        return Err(Error::DType { op: "gemm", msg: "f32 operands with a bf16 output".into() });
    }
    let dev = c.device.clone();
    let f = dev.function("gemm_naive", &name)?;
    let (a_rs, a_cs, b_rs, b_cs) = strides(g, d);
    let (m, n, k, ldc) = (d.m as i32, d.n as i32, d.k as i32, d.n as i64);
    let cfg = LaunchConfig {
        grid_dim: (d.n.div_ceil(64) as u32, d.m.div_ceil(64) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&f);
    match (&a.slice, &b.slice) {
        (CudaSlices::F32(x), CudaSlices::F32(y)) => launch.arg(x).arg(y),
        (CudaSlices::BF16(x), CudaSlices::BF16(y)) => launch.arg(x).arg(y),
        _ => unreachable!("dtypes checked above"),
    };
    match &mut c.slice {
        CudaSlices::F32(z) => launch.arg(z),
        CudaSlices::BF16(z) => launch.arg(z),
    };
    launch.arg(&m).arg(&n).arg(&k).arg(&a_rs).arg(&a_cs).arg(&b_rs).arg(&b_cs).arg(&ldc).arg(&g.alpha).arg(&g.beta);
    // SAFETY: argument types and order match gemm_naive_<in>_<out> in kernels/gemm_naive.cu, and
    // the buffers hold M*K, K*N and M*N elements (checked by crate::gemm::gemm).
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(gemm_naive)"))?;
    Ok(())
}

fn cuda_type(dt: DType) -> cudaDataType {
    match dt {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
    }
}

fn cublas(g: &Gemm, d: GemmDims, a: &CudaStorage, b: &CudaStorage, c: &mut CudaStorage) -> Result<()> {
    let dev = c.device.clone();
    let blas = dev.cublas()?;
    let stream = dev.stream();
    // cuBLAS is column-major: a row-major C [M, N] is a column-major C^T [N, M], and
    // C^T = op(B)^T op(A)^T, so B goes first and the transposes carry over unchanged.
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let lda = if g.trans_a { d.m } else { d.k } as i32;
    let ldb = if g.trans_b { d.k } else { d.n } as i32;
    let (ct, at) = (cuda_type(c.dtype()), cuda_type(a.dtype()));
    let (pa, _ga) = match &a.slice {
        CudaSlices::F32(x) => x.device_ptr(stream),
        CudaSlices::BF16(x) => x.device_ptr(stream),
    };
    let (pb, _gb) = match &b.slice {
        CudaSlices::F32(x) => x.device_ptr(stream),
        CudaSlices::BF16(x) => x.device_ptr(stream),
    };
    let (pc, _gc) = match &mut c.slice {
        CudaSlices::F32(x) => x.device_ptr_mut(stream),
        CudaSlices::BF16(x) => x.device_ptr_mut(stream),
    };
    // SAFETY: the pointers are live device buffers of the sizes the dimensions imply; alpha and
    // beta are host f32s, matching CUBLAS_COMPUTE_32F in the default host pointer mode.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(g.trans_b),
            op(g.trans_a),
            d.n as i32,
            d.m as i32,
            d.k as i32,
            (&g.alpha as *const f32).cast(),
            pb as *const _,
            at,
            ldb,
            pa as *const _,
            at,
            lda,
            (&g.beta as *const f32).cast(),
            pc as *mut _,
            ct,
            d.n as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(Error::cublas("cublasGemmEx"))
}

fn cublaslt(g: &Gemm, d: GemmDims, a: &CudaStorage, b: &CudaStorage, c: &mut CudaStorage) -> Result<()> {
    use cudarc::cublaslt::{Matmul, MatmulConfig};
    let (CudaSlices::BF16(x), CudaSlices::BF16(y), CudaSlices::BF16(z)) = (&a.slice, &b.slice, &mut c.slice) else {
        return Err(Error::DType {
            op: "gemm (cuBLASLt)",
            msg: "the cuBLASLt path takes bf16 operands and output".into(),
        });
    };
    let dev = c.device.clone();
    let lt = dev.cublaslt()?;
    // Column-major view as in `cublas`: C^T = op(B)^T op(A)^T, B first.
    let cfg = MatmulConfig {
        transa: g.trans_b,
        transb: g.trans_a,
        transc: false,
        m: d.n as u64,
        n: d.m as u64,
        k: d.k as u64,
        alpha: g.alpha,
        lda: if g.trans_b { d.k } else { d.n } as i64,
        ldb: if g.trans_a { d.m } else { d.k } as i64,
        beta: g.beta,
        ldc: d.n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: the buffers hold the sizes the dimensions imply (checked by crate::gemm::gemm).
    unsafe { lt.matmul(cfg, y, x, z, None, None) }.map_err(Error::cublaslt("cublasLtMatmul"))
}
