//! The one error type of loraga-core. Every variant names what is wrong and, where it helps,
//! what to do about it: a missing library says which file and where we looked.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no NVIDIA driver: libcuda.so could not be loaded (install the NVIDIA driver, or run on the CPU)")]
    NoDriver,

    #[error("no CUDA GPU: {0}")]
    NoGpu(String),

    #[error(
        "NVRTC not found: libnvrtc.so.13 is not on the loader path and not in {searched:?}; \
         set CUDA_HOME, or install the `nvidia-cuda-nvrtc==13.0.*` wheel and add its lib/ to LD_LIBRARY_PATH"
    )]
    NoNvrtc { searched: Vec<PathBuf> },

    #[error("cuBLAS not found: libcublas.so.13 or libcublasLt.so.13 is not on the loader path and not in {searched:?}")]
    NoCublas { searched: Vec<PathBuf> },

    #[error(
        "cuSOLVER not found: libcusolver.so.12 (with libcusparse.so.12, libnvJitLink.so.13 and cuBLAS beside it) \
         is not on the loader path and not in {searched:?}; install the `nvidia-cusolver` wheel for CUDA 13 or set CUDA_HOME"
    )]
    NoCusolver { searched: Vec<PathBuf> },

    #[error(
        "CUDA headers not found (cuda_bf16.h) in {searched:?}; set LORAGA_CUDA_INCLUDE or CUDA_HOME, \
         or install the `nvidia-cuda-runtime==13.0.*` wheel"
    )]
    NoCudaHeaders { searched: Vec<PathBuf> },

    #[error("kernel file kernels/{file} failed to compile for {arch}:\n{log}")]
    KernelCompile { file: String, arch: String, log: String },

    #[error("unknown kernel {name}: no kernels/{module}.cu defines it")]
    UnknownKernel { module: String, name: String },

    #[error("CUDA driver call {op} failed: {source}")]
    Cuda {
        op: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },

    #[error("cuBLAS call {op} failed: {source}")]
    Cublas {
        op: &'static str,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },

    #[error("cuSOLVER call {op} failed: {source}")]
    Cusolver {
        op: &'static str,
        #[source]
        source: cudarc::cusolver::result::CusolverError,
    },

    #[error("cuBLASLt call {op} failed: {source}")]
    CublasLt {
        op: &'static str,
        #[source]
        source: cudarc::cublaslt::result::CublasError,
    },

    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("{op}: unsupported dtype combination: {msg}")]
    DType { op: &'static str, msg: String },

    #[error("{op}: tensors are on different devices ({lhs} and {rhs})")]
    DeviceMismatch { op: &'static str, lhs: String, rhs: String },

    #[error("{op}: layer `{name}` has a non-finite value {value} at [{row}, {col}] (a diverged gradient?)")]
    NonFinite { op: &'static str, name: String, row: usize, col: usize, value: f32 },

    #[error("{op}: layer `{name}`: {msg}")]
    Layer { op: &'static str, name: String, msg: String },

    /// An op that has a CPU implementation but no CUDA one yet: an honest "not there", not a
    /// silent fallback (moving tensors between devices is the caller's decision).
    #[error("not yet implemented on CUDA: {0} (it runs on the CPU; move the tensors there)")]
    NotOnCuda(&'static str),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{0} needs a CUDA GPU, and none is usable: {1}")]
    GpuRequired(&'static str, Box<Error>),

    /// A checkpoint file that is malformed or that we cannot read: `msg` names the tensor or key.
    #[error("{file}: {msg}")]
    Format { file: PathBuf, msg: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn cuda(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Cuda { op, source }
    }

    pub(crate) fn cublas(op: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Error {
        move |source| Error::Cublas { op, source }
    }

    pub(crate) fn cusolver(op: &'static str) -> impl FnOnce(cudarc::cusolver::result::CusolverError) -> Error {
        move |source| Error::Cusolver { op, source }
    }

    pub(crate) fn cublaslt(op: &'static str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> Error {
        move |source| Error::CublasLt { op, source }
    }

    pub fn format(file: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::Format { file: file.into(), msg: msg.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn layer(op: &'static str, name: &str, msg: impl Into<String>) -> Error {
        Error::Layer { op, name: name.to_string(), msg: msg.into() }
    }

    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Error {
        Error::Shape { op, msg: msg.into() }
    }
}
