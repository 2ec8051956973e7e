//! On-disk cache of compiled kernel modules.
//!
//! A cubin is stored under a key that hashes everything that shapes it: the kernel file, every
//! shared header, the compile options, the target architecture and the NVRTC version. The file
//! ends with the SHA-256 of the cubin, so a truncated or corrupt entry reads as a miss. Writers
//! write a uniquely named temporary file and rename it into place, so concurrent processes never
//! see half a file; two that compile the same module at once both write the same bytes.
//!
//! The folder is `$LORAGA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/loraga/kernels`, else
//! `~/.cache/loraga/kernels`; `LORAGA_KERNEL_CACHE=off` disables the cache.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::arch::Arch;
use super::kernels::{KernelHeader, KernelSource};

/// Bumped when the entry format changes, so old entries become misses.
const FORMAT: &str = "loraga-cubin-v1";
const DIGEST_LEN: usize = 32;

#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        KernelCache { dir }
    }

    /// The cache in the folder the environment names (see the module docs).
    pub fn from_env() -> Self {
        let dir = match std::env::var_os("LORAGA_KERNEL_CACHE") {
            Some(v) if v == "off" => None,
            Some(v) => Some(PathBuf::from(v)),
            None => std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("loraga/kernels")),
        };
        KernelCache { dir }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn key(
        src: &KernelSource,
        headers: &[KernelHeader],
        options: &[String],
        arch: Arch,
        nvrtc: (i32, i32),
    ) -> String {
        let mut h = Sha256::new();
        // Every field is length-prefixed so that no two different inputs hash the same stream.
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(FORMAT.as_bytes());
        field(src.file.as_bytes());
        field(src.code.as_bytes());
        for hd in headers {
            field(hd.name.as_bytes());
            field(hd.code.as_bytes());
        }
        for o in options {
            field(o.as_bytes());
        }
        field(arch.to_string().as_bytes());
        field(format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
        hex(&h.finalize())
    }

    fn path(&self, module: &str, arch: Arch, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{module}-{arch}-{}.cubin", &key[..32])))
    }

    /// The cached cubin, if there is an intact entry for this key.
    pub fn load(&self, module: &str, arch: Arch, key: &str) -> Option<Vec<u8>> {
        let mut bytes = std::fs::read(self.path(module, arch, key)?).ok()?;
        if bytes.len() <= DIGEST_LEN {
            return None;
        }
        let body_len = bytes.len() - DIGEST_LEN;
        if Sha256::digest(&bytes[..body_len]).as_slice() != &bytes[body_len..] {
            return None;
        }
        bytes.truncate(body_len);
        Some(bytes)
    }

    /// Stores a cubin. Failures (read-only folder, full disk) are ignored on purpose: the cache
    /// only saves time, and the caller already holds the compiled module.
    pub fn store(&self, module: &str, arch: Arch, key: &str, cubin: &[u8]) {
        let Some(path) = self.path(module, arch, key) else { return };
        let _ = crate::io::atomic::write_with(&path, |f| {
            f.write_all(cubin)?;
            f.write_all(&Sha256::digest(cubin))
        });
    }

    /// Removes an entry that the driver refused to load.
    pub fn evict(&self, module: &str, arch: Arch, key: &str) {
        if let Some(path) = self.path(module, arch, key) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: KernelSource = KernelSource { module: "m", file: "m.cu", code: "extern \"C\" __global__ void k() {}" };

    fn temp_cache(name: &str) -> KernelCache {
        let dir = std::env::temp_dir().join(format!("loraga-cache-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        KernelCache::new(Some(dir))
    }

    #[test]
    fn key_changes_with_every_input() {
        let opts = vec!["--std=c++17".to_string()];
        let sm90 = Arch::parse("sm_90a").unwrap();
        let base = KernelCache::key(&SRC, &[], &opts, sm90, (13, 0));
        let other_src = KernelSource { code: "extern \"C\" __global__ void k2() {}", ..SRC };
        let header = [KernelHeader { name: "h.cuh", code: "#pragma once" }];
        assert_ne!(base, KernelCache::key(&other_src, &[], &opts, sm90, (13, 0)));
        assert_ne!(base, KernelCache::key(&SRC, &header, &opts, sm90, (13, 0)));
        assert_ne!(base, KernelCache::key(&SRC, &[], &["-O2".to_string()], sm90, (13, 0)));
        assert_ne!(base, KernelCache::key(&SRC, &[], &opts, Arch::parse("sm_80").unwrap(), (13, 0)));
        assert_ne!(base, KernelCache::key(&SRC, &[], &opts, sm90, (13, 1)));
        assert_eq!(base, KernelCache::key(&SRC, &[], &opts, sm90, (13, 0)));
    }

    #[test]
    fn round_trip_and_corruption_is_a_miss() {
        let cache = temp_cache("rt");
        let arch = Arch::parse("sm_80").unwrap();
        let key = KernelCache::key(&SRC, &[], &[], arch, (13, 0));
        assert!(cache.load("m", arch, &key).is_none());
        let cubin: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        cache.store("m", arch, &key, &cubin);
        assert_eq!(cache.load("m", arch, &key).as_deref(), Some(cubin.as_slice()));

        // Truncate the entry: it must read as a miss, not as a shorter cubin.
        let path = cache.path("m", arch, &key).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(cache.load("m", arch, &key).is_none());
        // Flip one byte of the body.
        let mut flipped = bytes.clone();
        flipped[10] ^= 0xff;
        std::fs::write(&path, &flipped).unwrap();
        assert!(cache.load("m", arch, &key).is_none());

        cache.store("m", arch, &key, &cubin);
        cache.evict("m", arch, &key);
        assert!(cache.load("m", arch, &key).is_none());
        // No temporary files are left behind.
        let leftovers = std::fs::read_dir(cache.dir().unwrap()).unwrap().count();
        assert_eq!(leftovers, 0);
        let _ = std::fs::remove_dir_all(cache.dir().unwrap());
    }

    #[test]
    fn concurrent_writers_leave_one_intact_entry() {
        let cache = temp_cache("conc");
        let arch = Arch::parse("sm_90a").unwrap();
        let key = KernelCache::key(&SRC, &[], &[], arch, (13, 0));
        let cubin: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..5 {
                        cache.store("m", arch, &key, &cubin);
                        if let Some(b) = cache.load("m", arch, &key) {
                            assert_eq!(b, cubin);
                        }
                    }
                });
            }
        });
        assert_eq!(cache.load("m", arch, &key).unwrap(), cubin);
        let _ = std::fs::remove_dir_all(cache.dir().unwrap());
    }

    #[test]
    fn disabled_cache_stores_nothing() {
        let cache = KernelCache::new(None);
        let arch = Arch::parse("sm_80").unwrap();
        cache.store("m", arch, "0123456789abcdef0123456789abcdef", b"abc");
        assert!(cache.load("m", arch, "0123456789abcdef0123456789abcdef").is_none());
    }
}
