//! Launchers of `kernels/rms_norm.cu`: RMSNorm of each row of x [rows, d] with weight w \[d\],
//!
//!   r_i = 1 / sqrt(mean_j x_ij^2 + eps),   y_ij = w_j x_ij r_i,
//!
//! its input gradient (in x's dtype) and its weight gradient (f32, reduced over the rows in two
//! deterministic stages: per-chunk partial sums, then their sum in chunk order). The forward
//! returns r (f32, one per row) for the backward to reuse.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::elementwise::as_dtype;
use super::{THREADS, arg, arg_mut, expect, int, output, same_dtype_as_x, uninit};
use crate::cuda::storage::{CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MODULE: &str = "rms_norm";
const OP: &str = "rms_norm";
/// Rows per block of the forward and dx kernels: one warp each (WARPS in the kernel).
const ROWS_PER_BLOCK: usize = THREADS as usize / 32;
/// Stage 1 of dw sums chunks of at least this many rows, and makes at most MAX_CHUNKS chunks
/// (so the partial sums stay small and grid.y far below its 65535 limit).
const MIN_CHUNK_ROWS: usize = 64;
const MAX_CHUNKS: usize = 1024;

fn one_warp_per_row(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Checks the operands of every kernel here: x [rows, d] and w [d] of one dtype on one device.
fn check(x: &CudaStorage, w: &CudaStorage, rows: usize, d: usize) -> Result<i32> {
    same_dtype_as_x(OP, x, w)?;
    expect(OP, "x", x, &w.device, w.dtype(), rows * d)?;
    expect(OP, "the weight", w, &x.device, x.dtype(), d)?;
    // The forward's grid has ceil(rows / 8) blocks in grid.x (limit 2^31 - 1).
    if rows.div_ceil(ROWS_PER_BLOCK) > i32::MAX as usize {
        return Err(Error::shape(OP, format!("{rows} rows exceed the kernels' grid limit")));
    }
    int(OP, "the row length", d)
}

/// `(y, r)`: y [rows, d] in x's dtype and r \[rows\] f32.
pub fn forward(
    x: &CudaStorage,
    w: &CudaStorage,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let d32 = check(x, w, rows, d)?;
    let dev = &x.device;
    let mut y = output(dev, x.dtype(), rows * d)?;
    let mut r = uninit::<f32>(dev, rows)?;
    if rows * d > 0 {
        let f = dev.function(MODULE, &format!("rms_norm_fwd_{}", x.dtype()))?;
        let rows64 = rows as i64;
        let mut launch = dev.stream().launch_builder(&f);
        arg(&mut launch, x);
        arg(&mut launch, w);
        arg_mut(&mut launch, &mut y);
        launch.arg(&mut r).arg(&rows64).arg(&d32).arg(&eps);
        // SAFETY: rms_norm_fwd_<t>(const T* x, const T* w, T* y, float* r, i64 rows, int d, float
        // eps); x and y hold rows * d elements, w d, r rows (checked above).
        unsafe { launch.launch(one_warp_per_row(rows)) }.map_err(Error::cuda("cuLaunchKernel(rms_norm_fwd)"))?;
    }
    Ok((y, r))
}

/// The gradients `(dx, dw)` where `needs` = [dx, dw] asks for them: dx [rows, d] in x's dtype,
/// dw \[d\] in f32. `r` is the forward's.
pub fn backward(
    dy: &CudaStorage,
    x: &CudaStorage,
    w: &CudaStorage,
    r: &CudaSlice<f32>,
    rows: usize,
    d: usize,
    needs: &[bool],
) -> Result<(Option<CudaStorage>, Option<CudaStorage>)> {
    let d32 = check(x, w, rows, d)?;
    let dy = as_dtype(dy, x.dtype())?;
    expect(OP, "the output gradient", &dy, &x.device, x.dtype(), rows * d)?;
    if r.len() != rows {
        return Err(Error::shape(OP, format!("the saved 1/rms holds {} rows, x has {rows}", r.len())));
    }
    let dx = needs[0].then(|| grad_x(&dy, x, w, r, rows, d32)).transpose()?;
    let dw = needs[1].then(|| grad_w(&dy, x, r, rows, d32)).transpose()?;
    Ok((dx, dw))
}

/// dx [rows, d] in x's dtype (operands checked by `backward`).
fn grad_x(
    dy: &CudaStorage,
    x: &CudaStorage,
    w: &CudaStorage,
    r: &CudaSlice<f32>,
    rows: usize,
    d32: i32,
) -> Result<CudaStorage> {
    let (dev, d) = (&x.device, d32 as usize);
    let mut dx = output(dev, x.dtype(), rows * d)?;
    if rows * d > 0 {
        let f = dev.function(MODULE, &format!("rms_norm_bwd_dx_{}", x.dtype()))?;
        let rows64 = rows as i64;
        let mut launch = dev.stream().launch_builder(&f);
        arg(&mut launch, dy);
        arg(&mut launch, x);
        arg(&mut launch, w);
        launch.arg(r);
        arg_mut(&mut launch, &mut dx);
        launch.arg(&rows64).arg(&d32);
        // SAFETY: rms_norm_bwd_dx_<t>(const T* dy, const T* x, const T* w, const float* r, T* dx,
        // i64 rows, int d); dy, x, dx hold rows * d elements, w d, r rows (checked by `backward`).
        unsafe { launch.launch(one_warp_per_row(rows)) }.map_err(Error::cuda("cuLaunchKernel(rms_norm_bwd_dx)"))?;
    }
    Ok(dx)
}

/// dw [d] in f32: `sum_i dy_ij x_ij r_i` (operands checked by `backward`).
fn grad_w(dy: &CudaStorage, x: &CudaStorage, r: &CudaSlice<f32>, rows: usize, d32: i32) -> Result<CudaStorage> {
    let (dev, d) = (&x.device, d32 as usize);
    if rows == 0 || d == 0 {
        return CudaStorage::zeros(dev, DType::F32, d);
    }
    let chunk_rows = rows.div_ceil(MAX_CHUNKS).max(MIN_CHUNK_ROWS);
    let chunks = rows.div_ceil(chunk_rows);
    let mut part = uninit::<f32>(dev, chunks * d)?;
    let column_blocks = d.div_ceil(THREADS as usize) as u32;
    {
        let f = dev.function(MODULE, &format!("rms_norm_bwd_dw_part_{}", x.dtype()))?;
        let (rows64, chunk32) = (rows as i64, int(OP, "rows per chunk", chunk_rows)?);
        let mut launch = dev.stream().launch_builder(&f);
        arg(&mut launch, dy);
        arg(&mut launch, x);
        launch.arg(r).arg(&mut part).arg(&rows64).arg(&d32).arg(&chunk32);
        let cfg = LaunchConfig {
            grid_dim: (column_blocks, chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: rms_norm_bwd_dw_part_<t>(const T* dy, const T* x, const float* r, float* part,
        // i64 rows, int d, int rows_per_chunk); dy and x hold rows * d elements, r rows, part
        // chunks * d; grid.y = chunks = ceil(rows / rows_per_chunk) <= MAX_CHUNKS.
        unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rms_norm_bwd_dw_part)"))?;
    }
    let mut dw = output(dev, DType::F32, d)?;
    {
        let f = dev.function(MODULE, "rms_norm_dw_sum")?;
        let chunks32 = chunks as i32;
        let CudaSlices::F32(out) = &mut dw.slice else { unreachable!("allocated as f32 above") };
        let mut launch = dev.stream().launch_builder(&f);
        launch.arg(&part).arg(out).arg(&chunks32).arg(&d32);
        let cfg = LaunchConfig { grid_dim: (column_blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: rms_norm_dw_sum(const float* part, float* dw, int chunks, int d); part holds
        // chunks * d elements, dw d.
        unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(rms_norm_dw_sum)"))?;
    }
    Ok(dw)
}
