//! GPU architectures as NVRTC names them.

use crate::error::{Error, Result};

/// A compile target. `accel` is the `a` suffix (`sm_90a`): the architecture-specific features
/// (wgmma, setmaxnreg) that only run on that exact chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
    pub accel: bool,
}

impl Arch {
    /// The target we compile for on a device of this compute capability: the exact one, with
    /// Hopper's `a` features switched on so its kernels can use wgmma and TMA.
    pub fn for_device(major: u32, minor: u32) -> Arch {
        Arch { major, minor, accel: (major, minor) == (9, 0) }
    }

    /// Parses `sm_80`, `sm_90a`, `90a` or `9.0`.
    pub fn parse(s: &str) -> Result<Arch> {
        let bad =
            || Error::InvalidArgument(format!("cannot parse GPU architecture {s:?}; expected e.g. sm_80 or sm_90a"));
        let t = s.trim().trim_start_matches("sm_").trim_start_matches("compute_");
        let (digits, accel) = match t.strip_suffix('a') {
            Some(d) => (d.replace('.', ""), true),
            None => (t.replace('.', ""), false),
        };
        if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let (maj, min) = digits.split_at(digits.len() - 1);
        Ok(Arch { major: maj.parse().map_err(|_| bad())?, minor: min.parse().map_err(|_| bad())?, accel })
    }

    /// Hopper's warpgroup MMA (and so the GEMM engine's main path) is available.
    pub fn has_wgmma(&self) -> bool {
        self.major == 9 && self.accel
    }

    /// Ampere's warp MMAs with bf16 and TF32 operands and cp.async (the sm_80 GEMM engine) are
    /// available: sm_80 and every later GPU.
    pub fn has_mma_sync(&self) -> bool {
        self.major >= 8
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}{}", self.major, self.minor, if self.accel { "a" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for s in ["sm_80", "sm_90a", "sm_86", "sm_100a", "sm_120"] {
            assert_eq!(Arch::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Arch::parse("9.0").unwrap(), Arch { major: 9, minor: 0, accel: false });
        assert!(Arch::parse("sm_x").is_err());
        assert!(Arch::parse("").is_err());
    }

    #[test]
    fn hopper_gets_the_accelerated_target() {
        assert_eq!(Arch::for_device(9, 0).to_string(), "sm_90a");
        assert_eq!(Arch::for_device(8, 0).to_string(), "sm_80");
        assert!(Arch::for_device(9, 0).has_wgmma());
        assert!(!Arch::for_device(8, 9).has_wgmma());
        assert!(Arch::for_device(8, 0).has_mma_sync() && Arch::for_device(9, 0).has_mma_sync());
        assert!(!Arch::for_device(7, 5).has_mma_sync());
    }
}
