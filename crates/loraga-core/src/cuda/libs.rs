//! Finding the CUDA pieces at run time: the driver, NVRTC, cuBLAS, cuSOLVER and the CUDA headers.
//!
//! cudarc opens its libraries by name and panics when none is found, so every entry point here
//! checks first and returns an error that says what is missing and where we looked. When a
//! library is not on the loader path but sits in a CUDA installation we can find (CUDA_HOME,
//! /usr/local/cuda, or the pip `nvidia-*` wheels), we open it by full path first; the loader then
//! resolves cudarc's later open by soname to the copy already loaded.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Folders that may hold a CUDA installation (each with `lib`/`lib64` and `include` inside).
pub fn cuda_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for var in ["LORAGA_CUDA_HOME", "CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = std::env::var_os(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    // Each library folder on the loader path, so that `lib/../include` is found for wheels.
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for p in std::env::split_paths(&paths) {
            if let Some(parent) = p.parent() {
                roots.push(parent.to_path_buf());
            }
        }
    }
    // pip wheels install into <site-packages>/nvidia/cu13.
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(h).join(".local/lib"));
    }
    prefixes.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for pkgs in ["site-packages", "dist-packages"] {
                    roots.push(e.path().join(pkgs).join("nvidia/cu13"));
                }
            }
        }
    }
    roots.retain(|r| r.is_dir());
    roots.dedup();
    roots
}

fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for root in cuda_roots() {
        for sub in ["lib64", "lib", "targets/x86_64-linux/lib"] {
            let d = root.join(sub);
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    dirs
}

/// Opens `file` from the first folder of `dirs` that has it, and keeps it loaded for the life of
/// the process. Returns whether one was opened.
fn preload(file: &str, dirs: &[PathBuf]) -> bool {
    static KEPT: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());
    for d in dirs {
        let path = d.join(file);
        if path.is_file() {
            // SAFETY: loading a CUDA library runs only its own initialisers.
            if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
                KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(lib);
                return true;
            }
        }
    }
    false
}

/// The driver library must come from the system: it is tied to the kernel module.
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { cudarc::driver::sys::is_culib_present() } { Ok(()) } else { Err(Error::NoDriver) }
}

/// Makes sure cudarc will be able to open a library by name: it is on the loader path already,
/// or `files` (dependencies first) are opened by full path from a CUDA installation we can find.
/// On failure, the folders searched.
fn ensure(present: fn() -> bool, files: &[&str]) -> std::result::Result<(), Vec<PathBuf>> {
    if present() {
        return Ok(());
    }
    let dirs = lib_dirs();
    for f in files {
        preload(f, &dirs);
    }
    if present() { Ok(()) } else { Err(dirs) }
}

// SAFETY (each `is_culib_present` below): it only tries to open the library.

pub fn ensure_nvrtc() -> Result<()> {
    ensure(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }, &["libnvrtc.so.13"])
        .map_err(|searched| Error::NoNvrtc { searched })
}

pub fn ensure_cublas() -> Result<()> {
    // libcublas needs libcublasLt beside it.
    ensure(|| unsafe { cudarc::cublas::sys::is_culib_present() }, &["libcublasLt.so.13", "libcublas.so.13"])
        .map_err(|searched| Error::NoCublas { searched })
}

pub fn ensure_cublaslt() -> Result<()> {
    ensure(|| unsafe { cudarc::cublaslt::sys::is_culib_present() }, &["libcublasLt.so.13"])
        .map_err(|searched| Error::NoCublas { searched })
}

/// cuSOLVER (the GPU randomized SVD's Cholesky and eigensolver, and the gesvdr baseline). CUDA
/// 13's libcusolver.so.12 links cuBLAS, cuSPARSE and nvJitLink, which the pip wheels keep in the
/// same `nvidia/cu13/lib` folder; they are opened first so that its own open resolves them.
pub fn ensure_cusolver() -> Result<()> {
    ensure(
        || unsafe { cudarc::cusolver::sys::is_culib_present() },
        &["libcublasLt.so.13", "libcublas.so.13", "libnvJitLink.so.13", "libcusparse.so.12", "libcusolver.so.12"],
    )
    .map_err(|searched| Error::NoCusolver { searched })
}

/// The folder holding `cuda_bf16.h`, which NVRTC needs to compile our kernels.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("LORAGA_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(v));
    }
    for root in cuda_roots() {
        candidates.push(root.join("include"));
        candidates.push(root.join("targets/x86_64-linux/include"));
    }
    candidates.dedup();
    match candidates.iter().find(|d| has_bf16_header(d)) {
        Some(d) => Ok(d.clone()),
        None => Err(Error::NoCudaHeaders { searched: candidates }),
    }
}

fn has_bf16_header(dir: &Path) -> bool {
    dir.join("cuda_bf16.h").is_file()
}
