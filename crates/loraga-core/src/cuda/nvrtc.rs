//! Run-time compilation of one kernel file to a cubin with NVRTC.
//!
//! We compile straight to machine code for the exact architecture (not PTX), so loading a cached
//! module needs no JIT, and `sm_90a` code can use wgmma. The `#include`d `kernels/*.cuh` files are
//! handed to NVRTC from memory; only CUDA's own headers come from disk.

use std::ffi::{CStr, CString, c_char};

use cudarc::nvrtc::sys;

use super::arch::Arch;
use super::kernels::{HEADERS, KernelSource};
use super::libs;
use crate::error::{Error, Result};

/// NVRTC's (major, minor) version, part of every cache key.
pub fn version() -> Result<(i32, i32)> {
    libs::ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    check("nvrtcVersion", unsafe { sys::nvrtcVersion(&mut major, &mut minor) })?;
    Ok((major, minor))
}

/// The options every kernel is compiled with, apart from the include folder, which depends on the
/// machine and so stays out of the cache key.
pub fn options(arch: Arch) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--generate-line-info".into()]
}

/// Compiles one kernel file for `arch` and returns the cubin.
pub fn compile(src: &KernelSource, arch: Arch) -> Result<Vec<u8>> {
    compile_with_log(src, arch, &[]).map(|(cubin, _)| cubin)
}

/// The same with extra NVRTC options (e.g. `--ptxas-options=-v` for the register and spill
/// report), returning the compile log beside the cubin.
pub fn compile_with_log(src: &KernelSource, arch: Arch, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    libs::ensure_nvrtc()?;
    let include = libs::cuda_include_dir()?;
    let code = cstring(src.code);
    let file = cstring(src.file);
    let header_code: Vec<CString> = HEADERS.iter().map(|h| cstring(h.code)).collect();
    let header_names: Vec<CString> = HEADERS.iter().map(|h| cstring(h.name)).collect();
    let header_code_ptrs: Vec<*const c_char> = header_code.iter().map(|c| c.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();

    let mut opts = options(arch);
    opts.push(format!("--include-path={}", include.display()));
    opts.extend(extra.iter().map(|o| o.to_string()));
    let opts: Vec<CString> = opts.iter().map(|o| cstring(o)).collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer outlives the call; the counts match the arrays.
    check("nvrtcCreateProgram", unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            code.as_ptr(),
            file.as_ptr(),
            HEADERS.len() as i32,
            header_code_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
    })?;
    let program = Program(prog);

    // SAFETY: `program` is live, the option array is valid for the call.
    let status = unsafe { sys::nvrtcCompileProgram(program.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        let log = program.log().unwrap_or_else(|e| format!("(no log: {e})"));
        return Err(Error::KernelCompile { file: src.file.into(), arch: arch.to_string(), log });
    }
    Ok((program.cubin()?, program.log()?))
}

/// Owns an nvrtcProgram and destroys it on every path out.
struct Program(sys::nvrtcProgram);

impl Program {
    fn log(&self) -> Result<String> {
        let mut size = 0usize;
        // SAFETY: live program, valid out-pointer.
        check("nvrtcGetProgramLogSize", unsafe { sys::nvrtcGetProgramLogSize(self.0, &mut size) })?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: the buffer holds `size` bytes as NVRTC asked.
        check("nvrtcGetProgramLog", unsafe { sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast()) })?;
        Ok(String::from_utf8_lossy(&buf).trim_end_matches('\0').trim_end().to_string())
    }

    fn cubin(&self) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: live, compiled program; valid out-pointer.
        check("nvrtcGetCUBINSize", unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) })?;
        let mut buf = vec![0u8; size];
        // SAFETY: the buffer holds `size` bytes as NVRTC asked.
        check("nvrtcGetCUBIN", unsafe { sys::nvrtcGetCUBIN(self.0, buf.as_mut_ptr().cast()) })?;
        Ok(buf)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once.
        unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn check(call: &'static str, r: sys::nvrtcResult) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: NVRTC returns a static string for every result code.
    let msg = unsafe { CStr::from_ptr(sys::nvrtcGetErrorString(r)) }.to_string_lossy().into_owned();
    Err(Error::KernelCompile { file: String::new(), arch: String::new(), log: format!("{call} failed: {msg}") })
}

fn cstring(s: &str) -> CString {
    // Kernel sources and options never hold NUL bytes; build.rs embeds text files.
    CString::new(s).expect("kernel text without NUL bytes")
}
