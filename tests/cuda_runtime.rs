//! The CUDA layer's behaviour: clear errors without a GPU, the NVRTC compile path (needs only
//! libnvrtc and the CUDA headers), and the on-disk kernel cache on a real device.

use loraga_core::cuda::cache::KernelCache;
use loraga_core::cuda::kernels::{self, KernelSource, Origin};
use loraga_core::cuda::{Arch, CudaDevice, nvrtc};
use loraga_core::{Device, Error};

#[test]
fn cuda_entry_points_fail_cleanly_or_work() {
    match Device::cuda(0) {
        // No GPU here: the error says what is missing.
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("no NVIDIA driver") || msg.contains("no CUDA GPU"), "{msg}");
        }
        // A GPU: asking for a device that does not exist is an error naming the count.
        Ok(_) => {
            let e = CudaDevice::new(4096).expect_err("device 4096 cannot exist").to_string();
            assert!(e.contains("asked for device 4096"), "{e}");
        }
    }
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    for arch in ["sm_80", "sm_90a"] {
        let arch = Arch::parse(arch).unwrap();
        for src in kernels::SOURCES {
            let cubin = nvrtc::compile(src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "kernels/{} for {arch} is not a cubin", src.file);
        }
    }
}

#[test]
fn a_compile_error_names_the_file_and_carries_the_log() {
    let broken = KernelSource {
        module: "broken",
        file: "broken.cu",
        code: "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = not_declared_anywhere; }\n",
    };
    match nvrtc::compile(&broken, Arch::parse("sm_80").unwrap()) {
        Err(Error::KernelCompile { file, arch, log }) => {
            assert_eq!(file, "broken.cu");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("not_declared_anywhere"), "{log}");
        }
        other => panic!("expected a compile error, got {:?}", other.map(|c| c.len())),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn second_load_comes_from_the_disk_cache_and_corruption_recompiles() {
    let dir = std::env::temp_dir().join(format!("loraga-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = || KernelCache::new(Some(dir.clone()));

    let first = CudaDevice::with_cache(0, cache()).unwrap();
    let (_, load) = first.module("gemm_naive").unwrap();
    assert_eq!(load.origin, Origin::Compiled);

    // A new device handle has no loaded modules; it must find the cubin on disk.
    let second = CudaDevice::with_cache(0, cache()).unwrap();
    let (_, warm) = second.module("gemm_naive").unwrap();
    assert_eq!(warm.origin, Origin::DiskCache);
    println!("gemm_naive module: cold {:.1} ms, warm {:.1} ms", load.millis, warm.millis);
    assert!(warm.millis < load.millis, "warm {:.1} ms vs cold {:.1} ms", warm.millis, load.millis);

    // Corrupt every entry: the next load must recompile, not fail or load garbage.
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        std::fs::write(&p, bytes).unwrap();
    }
    let third = CudaDevice::with_cache(0, cache()).unwrap();
    let (_, again) = third.module("gemm_naive").unwrap();
    assert_eq!(again.origin, Origin::Compiled);
    third.function("gemm_naive", "gemm_naive_f32_f32").unwrap();
    let e = third.function("gemm_naive", "no_such_kernel").unwrap_err().to_string();
    assert!(e.contains("no_such_kernel"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
