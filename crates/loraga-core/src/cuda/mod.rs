//! The CUDA backend: device handling, kernel loading, device buffers and the ops' launchers.
//! Nothing here needs CUDA at build time; libraries are found and opened at run time.

pub mod arch;
pub mod attention;
pub mod cache;
pub mod cross_entropy;
pub mod decode;
pub mod device;
pub mod gemm;
pub mod gemm_sm80;
pub mod gemm_sm90;
pub mod kernels;
pub mod libs;
pub mod lora_dy;
pub mod nvrtc;
pub mod ops;
pub mod storage;
pub mod timing;
pub(crate) mod tma;
pub mod typed;

pub use arch::Arch;
pub use device::CudaDevice;
pub use gemm::GemmPath;
pub use storage::{CudaSlices, CudaStorage};
