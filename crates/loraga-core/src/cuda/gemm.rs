//! GEMM on the device, by the paths loraga compares: the naive kernel (`kernels/gemm_naive.cu`),
//! cuBLAS, the Hopper engine (`kernels/gemm_sm90.cu`, see gemm_sm90.rs) and the engine for GPUs
//! without wgmma (`kernels/gemm_sm80.cu`, see gemm_sm80.rs); and the checks both engines share.
//!
//! Precision: bf16 operands multiply exactly and accumulate in fp32 on every path. f32 operands
//! run in full fp32 on the naive kernel and [`GemmPath::Cublas`], and on TF32 tensor cores (10
//! mantissa bits per operand, fp32 sums) on the engines, [`GemmPath::CublasTf32`] and
//! [`GemmPath::AutoTf32`]. [`GemmPath::Auto`] never changes the precision of f32 operands (torch's
//! `allow_tf32 = False` default; the f32 autograd tests hold linear to 1e-5), so TF32 is an
//! explicit choice of the caller, as [`crate::linalg`]'s `GemmMath::Tf32` is for the SVD.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::gemm_sm80;
use super::gemm_sm90;
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
    /// cuBLAS `cublasGemmEx` with CUBLAS_COMPUTE_32F_FAST_TF32: f32 operands on TF32 tensor
    /// cores, the baseline of the engines' f32 path. f32 operands only.
    CublasTf32,
    /// cuBLASLt `cublasLtMatmul` with its heuristic's first algorithm (what PyTorch's matmul
    /// uses): bf16 operands and output only. The stronger library baseline.
    CublasLt,
    /// The Hopper GEMM engine (wgmma, sm_90a): bf16 operands with each operand's contiguous
    /// dimension a multiple of 8, or f32 operands on TF32 (any shape: MN-major or unaligned f32
    /// operands are repacked K-major first), any transposes. Anything else is an error naming
    /// the reason.
    Engine,
    /// The engine for GPUs without wgmma (mma.sync + cp.async, sm_80 and later, Hopper
    /// included): bf16, or f32 on TF32, any transposes, each operand's contiguous dimension a
    /// multiple of 16 bytes (8 bf16, 4 f32). Anything else is an error naming the reason.
    Sm80,
    /// The fastest engine that applies (Hopper's, else sm_80's), else the naive kernel: correct
    /// everywhere. f32 operands keep full fp32 and so take the naive kernel. The default of the
    /// CUDA backend.
    Auto,
    /// As `Auto`, but f32 operands run on TF32 tensor cores through the engines.
    AutoTf32,
}

impl GemmPath {
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Naive => "naive",
            GemmPath::Cublas => "cublas",
            GemmPath::CublasTf32 => "cublas-tf32",
            GemmPath::CublasLt => "cublaslt",
            GemmPath::Engine => "engine",
            GemmPath::Sm80 => "sm80",
            GemmPath::Auto => "auto",
            GemmPath::AutoTf32 => "auto-tf32",
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
        GemmPath::Cublas => cublas(g, d, a, b, c, cublasComputeType_t::CUBLAS_COMPUTE_32F),
        GemmPath::CublasTf32 => {
            if a.dtype() != DType::F32 {
                return Err(Error::DType {
                    op: "gemm (cuBLAS TF32)",
                    msg: format!("takes f32 operands, got {}", a.dtype()),
                });
            }
            cublas(g, d, a, b, c, cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32)
        }
        GemmPath::CublasLt => cublaslt(g, d, a, b, c),
        _ => gemm_sources(path, g, &[KSource { a, b, k: d.k }], d.m, d.n, c),
    }
}

/// One operand pair of an engine's K loop: op(A) [m, k] and op(B) [k, n], stored as the GEMM's
/// transpose flags say (A [m, k] or [k, m]; B [k, n] or [n, k]).
pub struct KSource<'a> {
    pub a: &'a CudaStorage,
    pub b: &'a CudaStorage,
    pub k: usize,
}

/// `c = alpha * sum_i op(a_i) op(b_i) + beta * c` over one or two K sources by an engine path:
/// `Engine` (Hopper), `Sm80`, or `Auto`/`AutoTf32` (the first engine that takes the problem,
/// else, for a single source, the naive kernel).
pub fn gemm_sources(
    path: GemmPath,
    g: &Gemm,
    sources: &[KSource],
    m: usize,
    n: usize,
    c: &mut CudaStorage,
) -> Result<()> {
    match path {
        GemmPath::Engine => gemm_sm90::gemm(g, sources, m, n, c),
        GemmPath::Sm80 => gemm_sm80::gemm(g, sources, m, n, c),
        GemmPath::Auto | GemmPath::AutoTf32 => {
            let f32_operands = sources.first().is_some_and(|s| s.a.dtype() == DType::F32);
            let keep_fp32 = f32_operands && path == GemmPath::Auto;
            if !keep_fp32 {
                if gemm_sm90::unsupported(g, sources, m, n, c).is_none() {
                    return gemm_sm90::gemm(g, sources, m, n, c);
                }
                if gemm_sm80::unsupported(g, sources, m, n, c).is_none() {
                    return gemm_sm80::gemm(g, sources, m, n, c);
                }
            }
            match sources {
                [s] => naive(g, GemmDims { m, n, k: s.k }, s.a, s.b, c),
                // The naive kernel takes one source; an error rather than a silent second path.
                _ if keep_fp32 => Err(Error::InvalidArgument(
                    "two K sources of f32 operands under GemmPath::Auto: no engine keeps full fp32 (use AutoTf32, or one GEMM per source)".into(),
                )),
                _ => Err(Error::InvalidArgument(format!(
                    "two K sources that no engine takes: {}",
                    gemm_sm80::unsupported(g, sources, m, n, c).unwrap_or_default()
                ))),
            }
        }
        _ => Err(Error::InvalidArgument(format!(
            "gemm_sources: the {} path takes one K source; use Engine, Sm80, Auto or AutoTf32",
            path.name()
        ))),
    }
}

/// Why no engine can take these sources whatever the architecture (devices, dtypes, sizes), or
/// None. `engine` names the caller in the message.
pub(crate) fn check_sources(engine: &str, sources: &[KSource], m: usize, n: usize, c: &CudaStorage) -> Option<String> {
    if sources.is_empty() || sources.len() > 2 {
        return Some(format!("the {engine} takes 1 or 2 K sources, got {}", sources.len()));
    }
    let dtype = sources[0].a.dtype();
    for (i, s) in sources.iter().enumerate() {
        if s.a.device != c.device || s.b.device != c.device {
            return Some(format!("K source {i}: operands and C are on different devices"));
        }
        if s.a.dtype() != dtype || s.b.dtype() != dtype {
            return Some(format!(
                "K source {i}: the {engine} takes operands of one dtype (bf16, or f32 as TF32), got {} and {} (source 0: {dtype})",
                s.a.dtype(),
                s.b.dtype()
            ));
        }
        if s.a.len() != m * s.k || s.b.len() != n * s.k {
            return Some(format!(
                "K source {i}: buffers of {} and {} elements do not hold A [{m}, {}] and B [{n}, {}]",
                s.a.len(),
                s.b.len(),
                s.k,
                s.k
            ));
        }
        if s.k > i32::MAX as usize {
            return Some(format!("K source {i}: K = {} exceeds 32-bit dimensions", s.k));
        }
    }
    if c.len() != m * n {
        return Some(format!("C holds {} elements, not [{m}, {n}]", c.len()));
    }
    if m > i32::MAX as usize || n > i32::MAX as usize {
        return Some(format!("[{m}, {n}] exceeds 32-bit dimensions"));
    }
    None
}

/// The start of every engine launch: the engine's refusal as an error, else whether there is
/// nothing to compute (an empty C).
pub(crate) fn nothing_to_do(refusal: Option<String>, m: usize, n: usize) -> Result<bool> {
    match refusal {
        Some(why) => Err(Error::InvalidArgument(why)),
        None => Ok(m == 0 || n == 0),
    }
}

/// The layout part of an engine kernel's name: `nt` for A [M, K] and B [N, K], and so on.
pub(crate) fn layout_name(trans_a: bool, trans_b: bool) -> &'static str {
    match (trans_a, trans_b) {
        (false, false) => "nn",
        (false, true) => "nt",
        (true, false) => "tn",
        (true, true) => "tt",
    }
}

/// The first operand dimension that is contiguous in memory (K of a K-major operand, M or N of an
/// MN-major one) and not a multiple of `elems`, as an error message; None if all are.
pub(crate) fn misaligned(g: &Gemm, i: usize, s: &KSource, m: usize, n: usize, elems: usize) -> Option<String> {
    let contiguous = [("K", s.k, !g.trans_a || g.trans_b), ("M", m, g.trans_a), ("N", n, !g.trans_b)];
    let (what, v, _) = contiguous.into_iter().find(|&(_, v, applies)| applies && !v.is_multiple_of(elems))?;
    Some(format!(
        "K source {i}: {what} = {v} is not a multiple of {elems} (with trans_a = {}, trans_b = {} it is an operand's contiguous dimension, and the engine moves 16-byte rows)",
        g.trans_a, g.trans_b
    ))
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

fn cublas(
    g: &Gemm,
    d: GemmDims,
    a: &CudaStorage,
    b: &CudaStorage,
    c: &mut CudaStorage,
    compute: cublasComputeType_t,
) -> Result<()> {
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
    // beta are host f32s, matching CUBLAS_COMPUTE_32F(_FAST_TF32) in the default host pointer mode.
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
            compute,
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
