//! The kernel sources, embedded at build time from `kernels/` (see build.rs), and the one path
//! from a source file to a loadable cubin: look in the disk cache, else compile and store.

use super::arch::Arch;
use super::cache::KernelCache;
use super::nvrtc;
use crate::error::{Error, Result};

/// One `kernels/<module>.cu` file.
pub struct KernelSource {
    pub module: &'static str,
    pub file: &'static str,
    pub code: &'static str,
}

/// One `kernels/<name>.cuh` file, offered to every module's `#include "<name>"`.
pub struct KernelHeader {
    pub name: &'static str,
    pub code: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

pub fn source(module: &str) -> Result<&'static KernelSource> {
    SOURCES
        .iter()
        .find(|s| s.module == module)
        .ok_or_else(|| Error::UnknownKernel { module: module.into(), name: String::new() })
}

/// Where a cubin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    DiskCache,
    Compiled,
}

/// The cubin of `module` for `arch`: from the cache when an intact entry matches its key, else
/// compiled by NVRTC and stored. `fresh` skips the cache lookup (used after the driver refused a
/// cached entry). A cache that cannot be read or written only costs a compile.
pub fn cubin(module: &str, arch: Arch, cache: &KernelCache, fresh: bool) -> Result<(Vec<u8>, Origin)> {
    let src = source(module)?;
    let key = KernelCache::key(src, HEADERS, &nvrtc::options(arch), arch, nvrtc::version()?);
    if fresh {
        cache.evict(module, arch, &key);
    } else if let Some(bytes) = cache.load(module, arch, &key) {
        return Ok((bytes, Origin::DiskCache));
    }
    let bytes = nvrtc::compile(src, arch)?;
    cache.store(module, arch, &key, &bytes);
    Ok((bytes, Origin::Compiled))
}
