//! Launchers of `kernels/decode.cu`: the device side of incremental decoding (the KV cache of
//! `crate::model::kv_cache` on a CUDA device, and greedy token choice).
//!
//! ```text
//!   store:     Kc[rows[t]] = k[t], Vc[rows[t]] = v[t]               (cache rows slot·capacity + pos)
//!   attention: o[t, h] = softmax_j(q[t, h] · Kc[first + j, g] / sqrt(d)) Vc[first + j, g], j <= pos
//!   argmax:    the index of each row's largest value (the first on ties)
//! ```
//!
//! The row indices of one decoding step are uploaded once ([`upload_rows`]) and serve every
//! layer's store and attention. Shapes, dtypes and devices are checked here; the rows' bounds
//! (each below slots·capacity, distinct) by the caller, which built them.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::ops::{THREADS, arg, arg_mut, expect, grid_stride, int, output};
use super::storage::CudaStorage;
use crate::error::{Error, Result};

const MODULE: &str = "decode";
const OP: &str = "decode attention";
/// The largest head_dim the attention kernel takes (its MAX_D).
pub const MAX_HEAD_DIM: usize = 256;

/// The cache layout: heads, and positions per slot.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

/// The cache rows (slot · capacity + position) of one step's tokens, on the device.
pub fn upload_rows(dev: &CudaDevice, rows: &[u32]) -> Result<CudaSlice<u32>> {
    dev.stream().clone_htod(rows).map_err(Error::cuda("cuMemcpyHtoD"))
}

/// Writes the new tokens' k and v [tokens, kv_heads·d] into the caches' rows `rows`.
pub fn store(
    k: &CudaStorage,
    v: &CudaStorage,
    kc: &mut CudaStorage,
    vc: &mut CudaStorage,
    rows: &CudaSlice<u32>,
    width: usize,
) -> Result<()> {
    let (dev, dt, tokens) = (kc.device.clone(), kc.dtype(), rows.len());
    let dev = &dev;
    expect(OP, "k", k, dev, dt, tokens * width)?;
    expect(OP, "v", v, dev, dt, tokens * width)?;
    expect(OP, "the value cache", vc, dev, dt, kc.len())?;
    if tokens * width == 0 {
        return Ok(());
    }
    let f = dev.function(MODULE, &format!("kv_store_{dt}"))?;
    let (tokens64, width32) = (tokens as i64, int(OP, "the key/value width", width)?);
    let mut launch = dev.stream().launch_builder(&f);
    arg(&mut launch, k);
    arg(&mut launch, v);
    arg_mut(&mut launch, kc);
    arg_mut(&mut launch, vc);
    launch.arg(rows).arg(&tokens64).arg(&width32);
    // SAFETY: kv_store_<t>(const T* k, const T* v, T* kc, T* vc, const unsigned* rows, i64 tokens,
    // int width): k and v hold tokens·width elements (checked), each row index is below the
    // caches' rows (checked by the caller), grid-stride loop.
    unsafe { launch.launch(grid_stride(dev, tokens * width)) }.map_err(Error::cuda("cuLaunchKernel(kv_store)"))?;
    Ok(())
}

/// The attention outputs [tokens, heads·d] (q's dtype) of the new tokens with queries q
/// [tokens, heads·d] against the caches (whose rows `rows` already hold the new keys/values).
pub fn attention(
    q: &CudaStorage,
    kc: &CudaStorage,
    vc: &CudaStorage,
    rows: &CudaSlice<u32>,
    s: DecodeShape,
) -> Result<CudaStorage> {
    let (dev, dt, tokens) = (&kc.device, kc.dtype(), rows.len());
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) || s.head_dim == 0 || s.capacity == 0 {
        return Err(Error::shape(OP, format!("{s:?}: heads must share key/value heads evenly, sizes non-zero")));
    }
    if s.head_dim > MAX_HEAD_DIM {
        return Err(Error::shape(OP, format!("head_dim {} is above the kernel's {MAX_HEAD_DIM}", s.head_dim)));
    }
    expect(OP, "q", q, dev, dt, tokens * s.n_heads * s.head_dim)?;
    expect(OP, "the value cache", vc, dev, dt, kc.len())?;
    if !kc.len().is_multiple_of(s.capacity * s.n_kv_heads * s.head_dim) {
        return Err(Error::shape(OP, format!("a cache of {} elements is not whole slots of {s:?}", kc.len())));
    }
    let mut o = output(dev, dt, tokens * s.n_heads * s.head_dim)?;
    if tokens == 0 || s.n_heads == 0 {
        return Ok(o);
    }
    let blocks = tokens.checked_mul(s.n_heads).filter(|&b| b <= i32::MAX as usize).ok_or_else(|| {
        Error::shape(OP, format!("{tokens} tokens x {} heads exceed the grid's 32-bit limit", s.n_heads))
    })?;
    let f = dev.function(MODULE, &format!("decode_attention_{dt}"))?;
    let (heads, kv, d, cap) = (
        int(OP, "n_heads", s.n_heads)?,
        int(OP, "n_kv_heads", s.n_kv_heads)?,
        int(OP, "head_dim", s.head_dim)?,
        int(OP, "the capacity", s.capacity)?,
    );
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let mut launch = dev.stream().launch_builder(&f);
    arg(&mut launch, q);
    arg(&mut launch, kc);
    arg(&mut launch, vc);
    arg_mut(&mut launch, &mut o);
    launch.arg(rows).arg(&heads).arg(&kv).arg(&d).arg(&cap).arg(&scale);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: decode_attention_<t>(const T* q, const T* kc, const T* vc, T* o, const unsigned*
    // rows, int heads, int kv_heads, int d, int capacity, float scale), one block per (token,
    // head): q and o hold tokens·heads·d elements, the caches whole slots of capacity rows of
    // kv_heads·d (checked), each row index below their rows (the caller), d <= MAX_D.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(decode_attention)"))?;
    Ok(o)
}

/// The index of the largest value of each row of x [rows, vocab] (the first on ties), computed
/// on the device: only the indices come down. A NaN or infinite value is an error, as in
/// `crate::model::generate::argmax_rows`.
pub fn argmax_rows(x: &CudaStorage, rows: usize, vocab: usize) -> Result<Vec<u32>> {
    let dev = &x.device;
    expect("argmax", "the logits", x, dev, x.dtype(), rows * vocab)?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    if vocab == 0 || rows > i32::MAX as usize {
        return Err(Error::shape("argmax", format!("logits [{rows}, {vocab}]")));
    }
    // SAFETY: every element is written by the kernel (one block per row) before it is read.
    let mut out = unsafe { dev.stream().alloc::<u32>(rows) }.map_err(Error::cuda("cuMemAllocAsync"))?;
    let f = dev.function(MODULE, &format!("argmax_rows_{}", x.dtype()))?;
    let vocab32 = int("argmax", "the vocabulary", vocab)?;
    let mut launch = dev.stream().launch_builder(&f);
    arg(&mut launch, x);
    launch.arg(&mut out).arg(&vocab32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argmax_rows_<t>(const T* x, unsigned* out, int vocab), one block per row: x holds
    // rows·vocab elements (checked), out rows.
    unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(argmax_rows)"))?;
    let ids = dev.stream().clone_dtoh(&out).map_err(Error::cuda("cuMemcpyDtoH"))?;
    match ids.iter().position(|&i| i == u32::MAX) {
        Some(r) => Err(Error::InvalidArgument(format!("argmax: row {r} of the logits holds a NaN or an infinity"))),
        None => Ok(ids),
    }
}
