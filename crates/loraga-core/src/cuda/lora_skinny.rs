//! Host side of `kernels/lora_skinny.cu`: LoRA's skinny down products on tensor cores,
//!
//!   P [M, r] = s * Z [M, C] S [C, r],   S = Aᵀ (A [r, C]: U' = s X Aᵀ) or B (B [C, r]: V' = s dY B),
//!
//! bf16 in and out, fp32 accumulation, any M, C and r >= 1, sm_80 or newer (mma.sync).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::ops::{arg, arg_mut};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};

// Must match kernels/lora_skinny.cu.
const BM: usize = 64;
const RN: usize = 64;
const THREADS: u32 = 256;
/// Two operands x 4 stages x [64][64 + 8] bf16.
const SMEM_BYTES: usize = 2 * 4 * 64 * (64 + 8) * 2;

/// How the small operand is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Small {
    /// LoRA's A [r, C], used transposed.
    A,
    /// LoRA's B [C, r].
    B,
}

/// Why the kernel cannot take these buffers, or None if it can.
pub fn unsupported(z: &CudaStorage, s: &CudaStorage, p: &CudaStorage) -> Option<String> {
    let arch = p.device.arch();
    if arch.major < 8 {
        return Some(format!("the skinny LoRA kernel needs sm_80 or newer (mma.sync bf16); this device is {arch}"));
    }
    if [z, s, p].iter().any(|t| t.dtype() != DType::BF16) {
        return Some("the skinny LoRA kernel takes bf16 operands and output".into());
    }
    if z.device != p.device || s.device != p.device {
        return Some("the skinny LoRA kernel's operands are on different devices".into());
    }
    None
}

/// `p = scale * z s` with z [m, c], the small operand `s` stored as `small` says, p [m, r].
pub fn down(
    z: &CudaStorage,
    s: &CudaStorage,
    small: Small,
    (m, c, r): (usize, usize, usize),
    scale: f32,
    p: &mut CudaStorage,
) -> Result<()> {
    if let Some(why) = unsupported(z, s, p) {
        return Err(Error::InvalidArgument(why));
    }
    let bad = |what: &str, len: usize, want: usize| {
        Err(Error::shape(
            "lora_down",
            format!("{what} holds {len} elements, expected {want} for M = {m}, C = {c}, r = {r}"),
        ))
    };
    if z.len() != m * c {
        return bad("Z", z.len(), m * c);
    }
    if s.len() != c * r {
        return bad(if small == Small::A { "A" } else { "B" }, s.len(), c * r);
    }
    if p.len() != m * r {
        return bad("P", p.len(), m * r);
    }
    if m == 0 || r == 0 {
        return Ok(());
    }
    let int = |what: &str, v: usize| {
        i32::try_from(v).map_err(|_| Error::shape("lora_down", format!("{what} = {v} exceeds 32 bits")))
    };
    let (mi, ci, ri) = (int("M", m)?, int("C", c)?, int("r", r)?);
    if m.div_ceil(BM) > 65535 || r.div_ceil(RN) > 65535 {
        return Err(Error::shape(
            "lora_down",
            format!("M = {m} exceeds the kernel's grid (65535 blocks of {BM} rows)"),
        ));
    }
    // 16-byte rows of Z let its tiles arrive by cp.async; otherwise they are gathered.
    let vec = i32::from(c.is_multiple_of(8));
    let name = match small {
        Small::A => "lora_down_t_bf16",
        Small::B => "lora_down_n_bf16",
    };
    let dev = p.device.clone();
    let f = dev.function_with_shared_memory("lora_skinny", name, SMEM_BYTES)?;
    let cfg = LaunchConfig {
        // Column blocks of one row block run side by side and share Z's rows in L2.
        grid_dim: (r.div_ceil(RN) as u32, m.div_ceil(BM) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: SMEM_BYTES as u32,
    };
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&f);
    arg(&mut launch, z);
    arg(&mut launch, s);
    arg_mut(&mut launch, p);
    launch.arg(&mi).arg(&ci).arg(&ri).arg(&scale).arg(&vec);
    // SAFETY: the arguments match lora_down_{t,n}_bf16 in kernels/lora_skinny.cu (bf16 Z [M, C],
    // S [C * r], P [M, r], checked above), and the kernel guards every access by M, C and r.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(lora_down)"))?;
    Ok(())
}
