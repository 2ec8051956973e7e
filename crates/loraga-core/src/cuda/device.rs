//! One CUDA device: its context, the stream loraga works on, its kernels and its cuBLAS handle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, sys};
use cudarc::nvrtc::Ptx;

use super::arch::Arch;
use super::cache::KernelCache;
use super::kernels::{self, Origin};
use super::libs;
use crate::error::{Error, Result};

/// A handle to a CUDA device. Cheap to clone; all clones share one context and one stream.
///
/// loraga issues all work of a device on one stream, so cudarc's per-buffer event tracking
/// (which orders work across streams) is switched off: it would only add events to every launch.
#[derive(Clone)]
pub struct CudaDevice(Arc<Inner>);

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    sm_count: usize,
    shared_memory_optin: usize,
    name: String,
    cache: KernelCache,
    modules: Mutex<HashMap<&'static str, (Arc<CudaModule>, ModuleLoad)>>,
    functions: Mutex<HashMap<(&'static str, String), LoadedFunction>>,
    blas: OnceLock<CudaBlas>,
    blas_lt: OnceLock<CudaBlasLT>,
}

/// A resolved kernel and the dynamic shared memory it has been allowed so far.
type LoadedFunction = (CudaFunction, usize);

/// How a module was obtained, and how long it took (for reports and the cache measurements).
#[derive(Debug, Clone, Copy)]
pub struct ModuleLoad {
    pub origin: Origin,
    pub millis: f64,
}

impl CudaDevice {
    /// Opens device `ordinal` with the kernel cache the environment names. Fails with a message
    /// naming what is missing: the driver, a GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_cache(ordinal, KernelCache::from_env())
    }

    /// The same with an explicit kernel cache.
    pub fn with_cache(ordinal: usize, cache: KernelCache) -> Result<Self> {
        libs::ensure_driver()?;
        let count = CudaContext::device_count().map_err(|e| match e.0 {
            sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => Error::NoGpu("the driver reports no CUDA device".into()),
            _ => Error::NoGpu(format!("cuInit failed: {e}")),
        })?;
        if ordinal >= count as usize {
            return Err(Error::NoGpu(format!("asked for device {ordinal}, the driver reports {count}")));
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::cuda("cuCtxCreate"))?;
        // SAFETY: loraga uses a single stream per device (see the type's docs).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(Error::cuda("cuDeviceGetAttribute"))?;
        let name = ctx.name().map_err(Error::cuda("cuDeviceGetName"))?;
        let attribute = |a| ctx.attribute(a).map_err(Error::cuda("cuDeviceGetAttribute")).map(|v| v.max(0) as usize);
        let sm_count = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let shared_memory_optin =
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        keep_freed_memory_pooled(&ctx)?;
        let stream = ctx.default_stream();
        Ok(CudaDevice(Arc::new(Inner {
            ctx,
            stream,
            arch: Arch::for_device(major as u32, minor as u32),
            sm_count,
            shared_memory_optin,
            name,
            cache,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            blas_lt: OnceLock::new(),
        })))
    }

    pub fn ordinal(&self) -> usize {
        self.0.ctx.ordinal()
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The architecture kernels are compiled for on this device.
    pub fn arch(&self) -> Arch {
        self.0.arch
    }

    /// Streaming multiprocessors: the grid size of persistent kernels.
    pub fn sm_count(&self) -> usize {
        self.0.sm_count
    }

    /// Bytes of shared memory one block may opt into (dynamic and static together): what sizes
    /// the one-block kernels' limits on q.
    pub fn shared_memory_per_block_optin(&self) -> usize {
        self.0.shared_memory_optin
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.0.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.0.stream
    }

    pub fn kernel_cache(&self) -> &KernelCache {
        &self.0.cache
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.0.ctx.mem_get_info().map_err(Error::cuda("cuMemGetInfo"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.0.stream.synchronize().map_err(Error::cuda("cuStreamSynchronize"))
    }

    /// Kernel `name` from `kernels/<module>.cu`, compiled (or taken from the disk cache) and
    /// loaded on first use, then kept for the life of the device.
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        self.function_with_shared_memory(module, name, 0)
    }

    /// The same for a kernel launched with `bytes` of dynamic shared memory: the limit above the
    /// default 48 KB is raised once, when a launch first needs it, not on every launch.
    pub fn function_with_shared_memory(&self, module: &'static str, name: &str, bytes: usize) -> Result<CudaFunction> {
        let mut functions = self.0.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((f, allowed)) = functions.get_mut(&(module, name.to_string())) {
            if *allowed < bytes {
                set_shared_memory(f, bytes)?;
                *allowed = bytes;
            }
            return Ok(f.clone());
        }
        let (m, _) = self.module(module)?;
        let f = m.load_function(name).map_err(|_| Error::UnknownKernel { module: module.into(), name: name.into() })?;
        if bytes > 0 {
            set_shared_memory(&f, bytes)?;
        }
        functions.insert((module, name.to_string()), (f.clone(), bytes));
        Ok(f)
    }

    /// Loads (or returns the loaded) module and says how it was obtained.
    pub fn module(&self, module: &'static str) -> Result<(Arc<CudaModule>, ModuleLoad)> {
        let mut modules = self.0.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, load)) = modules.get(module) {
            return Ok((m.clone(), *load));
        }
        let start = Instant::now();
        let arch = self.0.arch;
        let (cubin, origin) = kernels::cubin(module, arch, &self.0.cache, false)?;
        let loaded = match self.0.ctx.load_module(Ptx::from_binary(cubin)) {
            Ok(m) => (m, origin),
            // A cached entry the driver refuses (e.g. written by an incompatible build) is
            // replaced by a fresh compile; a freshly compiled one that fails is a real error.
            Err(_) if origin == Origin::DiskCache => {
                let (cubin, origin) = kernels::cubin(module, arch, &self.0.cache, true)?;
                (self.0.ctx.load_module(Ptx::from_binary(cubin)).map_err(Error::cuda("cuModuleLoadData"))?, origin)
            }
            Err(e) => return Err(Error::Cuda { op: "cuModuleLoadData", source: e }),
        };
        let load = ModuleLoad { origin: loaded.1, millis: start.elapsed().as_secs_f64() * 1e3 };
        modules.insert(module, (loaded.0.clone(), load));
        Ok((loaded.0, load))
    }

    /// The device's cuBLAS handle, bound to its stream; created on first use.
    pub fn cublas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.0.blas.get() {
            return Ok(b);
        }
        libs::ensure_cublas()?;
        let blas = CudaBlas::new(self.0.stream.clone()).map_err(Error::cublas("cublasCreate"))?;
        Ok(self.0.blas.get_or_init(|| blas))
    }
}

impl CudaDevice {
    /// The device's cuBLASLt handle (with its 32 MB workspace), bound to its stream.
    pub fn cublaslt(&self) -> Result<&CudaBlasLT> {
        if let Some(b) = self.0.blas_lt.get() {
            return Ok(b);
        }
        libs::ensure_cublaslt()?;
        let lt = CudaBlasLT::new(self.0.stream.clone()).map_err(Error::cublaslt("cublasLtCreate"))?;
        Ok(self.0.blas_lt.get_or_init(|| lt))
    }
}

fn set_shared_memory(f: &CudaFunction, bytes: usize) -> Result<()> {
    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    f.set_attribute(attr, bytes as i32).map_err(Error::cuda("cuFuncSetAttribute"))
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({}, {})", self.ordinal(), self.0.name, self.0.arch)
    }
}

impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Keeps memory freed to the device's default pool there, up to half the device's memory,
/// instead of returning it to the driver at every synchronization (the pool's default release
/// threshold, 0): scratch that an op allocates per call (stream-ordered: the LoRA layer's partial
/// sums, the PEFT path's temporaries) then costs no new mapping each time, as with PyTorch's
/// caching allocator. Past half, freed memory goes back, so allocations outside the pool (the
/// libraries' workspaces) still find room.
fn keep_freed_memory_pooled(ctx: &CudaContext) -> Result<()> {
    let (mut pool, mut total): (sys::CUmemoryPool, usize) = (std::ptr::null_mut(), 0);
    // SAFETY: valid out-pointers; the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(Error::cuda("cuDeviceGetDefaultMemPool"))?;
    // SAFETY: as above.
    unsafe { sys::cuDeviceTotalMem_v2(&mut total, ctx.cu_device()) }
        .result()
        .map_err(Error::cuda("cuDeviceTotalMem"))?;
    let mut threshold = total as u64 / 2;
    // SAFETY: the release threshold attribute takes a pointer to a u64, which `threshold` is.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(Error::cuda("cuMemPoolSetAttribute"))
}
