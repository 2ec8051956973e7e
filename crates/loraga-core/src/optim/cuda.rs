//! Host side of `kernels/adamw.cu` and `kernels/grad_norm.cu`: multi-tensor tables and launches.
//!
//! Every launch covers a list of tensors (kernels/multi_tensor.cuh): each non-empty tensor gets
//! one table entry and `ceil(n / CHUNK)` blocks, so an optimizer step over hundreds of LoRA
//! matrices is one launch. The table is written field by field in the layout the kernel's struct
//! has (little-endian, as the device reads it; the kernels `static_assert` the sizes) and
//! uploaded per call: 64 bytes per parameter for AdamW, 32 for the norm. The upload is a
//! stream-ordered copy from pageable memory (staged by the driver, no wait on the device), and
//! the buffer is freed stream-ordered after the launch, so nothing here syncs except the download
//! of the sums of squares.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::adamw::{Moments, TensorScalars};
use crate::cuda::{CudaDevice, CudaSlices, CudaStorage};
use crate::error::{Error, Result};

/// Elements per block: 16 per thread, enough to hide the table lookup.
const CHUNK: usize = 4096;
/// The kernels' THREADS: their loops stride by it and their block sums assume it.
const THREADS: u32 = 256;

/// One AdamW operand set: the f32 parameter and moments (updated) and its gradient (read).
pub(crate) struct AdamwOperands<'a> {
    pub param: &'a mut CudaStorage,
    pub grad: &'a CudaStorage,
    pub exp_avg: &'a mut CudaStorage,
    pub exp_avg_sq: &'a mut CudaStorage,
    pub scalars: TensorScalars,
}

/// The first block of each non-empty tensor and the total: tensor t owns blocks
/// `[first[t], first[t + 1])` of the grid.
fn block_layout(lens: &[usize]) -> (Vec<i64>, usize) {
    let mut first = Vec::with_capacity(lens.len());
    let mut total = 0usize;
    for &n in lens {
        first.push(total as i64);
        total += n.div_ceil(CHUNK);
    }
    (first, total)
}

fn grid(blocks: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::InvalidArgument(format!("{blocks} blocks exceed the CUDA grid limit")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

fn table_len(entries: usize) -> Result<i32> {
    i32::try_from(entries).map_err(|_| Error::InvalidArgument(format!("{entries} tensors in one launch")))
}

fn upload(dev: &CudaDevice, bytes: &[u8]) -> Result<CudaSlice<u8>> {
    dev.stream().clone_htod(bytes).map_err(Error::cuda("cuMemcpyHtoD"))
}

/// Device address of a buffer that the kernel only reads, and whether it holds bf16.
fn read_ptr(s: &CudaStorage) -> (u64, bool) {
    // The guards only record events when event tracking is on; CudaDevice switches it off.
    let stream = s.device.stream();
    match &s.slice {
        CudaSlices::F32(d) => (d.device_ptr(stream).0, false),
        CudaSlices::BF16(d) => (d.device_ptr(stream).0, true),
    }
}

/// Device address of a buffer that the kernel writes, and whether it holds bf16.
fn write_ptr(s: &mut CudaStorage) -> (u64, bool) {
    let stream = s.device.stream().clone();
    match &mut s.slice {
        CudaSlices::F32(d) => (d.device_ptr_mut(&stream).0, false),
        CudaSlices::BF16(d) => (d.device_ptr_mut(&stream).0, true),
    }
}

/// `GradEntry { void* data; i64 n; i64 first_block; int bf16; int pad; }`: 32 bytes.
fn grad_entry(out: &mut Vec<u8>, ptr: u64, n: usize, first_block: i64, bf16: bool) {
    out.extend(ptr.to_le_bytes());
    out.extend((n as i64).to_le_bytes());
    out.extend(first_block.to_le_bytes());
    out.extend((bf16 as i32).to_le_bytes());
    out.extend(0i32.to_le_bytes());
}

/// Σ g² of each gradient, in f64 and in order (0 for an empty one). One sync: the download.
pub(crate) fn sum_squares(dev: &CudaDevice, grads: &[&CudaStorage]) -> Result<Vec<f64>> {
    let live: Vec<usize> = (0..grads.len()).filter(|&i| !grads[i].is_empty()).collect();
    let mut sums = vec![0.0; grads.len()];
    if live.is_empty() {
        return Ok(sums);
    }
    let lens: Vec<usize> = live.iter().map(|&i| grads[i].len()).collect();
    let (first, blocks) = block_layout(&lens);
    let mut table = Vec::with_capacity(32 * live.len());
    for (k, &i) in live.iter().enumerate() {
        let (ptr, bf16) = read_ptr(grads[i]);
        grad_entry(&mut table, ptr, lens[k], first[k], bf16);
    }
    let table = upload(dev, &table)?;
    let num = table_len(live.len())?;
    let stream = dev.stream();
    let mut partial = stream.alloc_zeros::<f64>(blocks).map_err(Error::cuda("cuMemAlloc"))?;
    let mut per_tensor = stream.alloc_zeros::<f64>(live.len()).map_err(Error::cuda("cuMemAlloc"))?;
    let (chunk, total) = (CHUNK as i64, blocks as i64);

    let f = dev.function("grad_norm", "grad_sumsq_partial")?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&table).arg(&num).arg(&chunk).arg(&mut partial);
    // SAFETY: matches grad_sumsq_partial(const GradEntry*, int, i64, double*): the table holds
    // `num` entries whose buffers are borrowed for this call (and freed stream-ordered after it),
    // `partial` one double per block of the grid.
    unsafe { launch.launch(grid(blocks)?) }.map_err(Error::cuda("cuLaunchKernel(grad_sumsq_partial)"))?;

    let f = dev.function("grad_norm", "grad_sumsq_finish")?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&table).arg(&num).arg(&total).arg(&partial).arg(&mut per_tensor);
    // SAFETY: matches grad_sumsq_finish(const GradEntry*, int, i64, const double*, double*):
    // one block per table entry, `per_tensor` one double per entry.
    unsafe { launch.launch(grid(live.len())?) }.map_err(Error::cuda("cuLaunchKernel(grad_sumsq_finish)"))?;

    let per_tensor = stream.clone_dtoh(&per_tensor).map_err(Error::cuda("cuMemcpyDtoH"))?;
    for (&i, s) in live.iter().zip(per_tensor) {
        sums[i] = s;
    }
    Ok(sums)
}

/// g ← g · coef for every gradient (f32 product, rounded back to the gradient's dtype).
pub(crate) fn scale(dev: &CudaDevice, grads: &mut [&mut CudaStorage], coef: f32) -> Result<()> {
    let lens: Vec<usize> = grads.iter().filter(|g| !g.is_empty()).map(|g| g.len()).collect();
    if lens.is_empty() {
        return Ok(());
    }
    let (first, blocks) = block_layout(&lens);
    let mut table = Vec::with_capacity(32 * lens.len());
    for (k, g) in grads.iter_mut().filter(|g| !g.is_empty()).enumerate() {
        let (ptr, bf16) = write_ptr(g);
        grad_entry(&mut table, ptr, lens[k], first[k], bf16);
    }
    let table = upload(dev, &table)?;
    let (num, chunk) = (table_len(lens.len())?, CHUNK as i64);
    let f = dev.function("grad_norm", "grad_scale")?;
    let mut launch = dev.stream().launch_builder(&f);
    launch.arg(&table).arg(&num).arg(&chunk).arg(&coef);
    // SAFETY: matches grad_scale(const GradEntry*, int, i64, float); the table's buffers are
    // borrowed mutably for this call and freed, if ever, stream-ordered after it.
    unsafe { launch.launch(grid(blocks)?) }.map_err(Error::cuda("cuLaunchKernel(grad_scale)"))?;
    Ok(())
}

/// One fused AdamW launch over every operand set (all on `dev`, shapes already checked equal).
pub(crate) fn adamw_step(dev: &CudaDevice, ops: &mut [AdamwOperands<'_>], k: &Moments) -> Result<()> {
    let live: Vec<&mut AdamwOperands<'_>> = ops.iter_mut().filter(|o| !o.param.is_empty()).collect();
    if live.is_empty() {
        return Ok(());
    }
    let lens: Vec<usize> = live.iter().map(|o| o.param.len()).collect();
    let (first, blocks) = block_layout(&lens);
    let mut table = Vec::with_capacity(64 * live.len());
    for (k, o) in live.into_iter().enumerate() {
        // AdamwEntry { float* param; const void* grad; float* exp_avg; float* exp_avg_sq;
        //              i64 n; i64 first_block; float decay, neg_step_size, bc2_sqrt; int grad_bf16; }
        let (grad, grad_bf16) = read_ptr(o.grad);
        let [param, exp_avg, exp_avg_sq] = [&mut *o.param, &mut *o.exp_avg, &mut *o.exp_avg_sq].map(write_ptr);
        if [param, exp_avg, exp_avg_sq].iter().any(|&(_, bf16)| bf16) {
            return Err(Error::DType { op: "AdamW", msg: "parameters and moments must be f32 on the GPU".into() });
        }
        for ptr in [param.0, grad, exp_avg.0, exp_avg_sq.0] {
            table.extend(ptr.to_le_bytes());
        }
        table.extend((lens[k] as i64).to_le_bytes());
        table.extend(first[k].to_le_bytes());
        let s = &o.scalars;
        for x in [s.decay, s.neg_step_size, s.bc2_sqrt] {
            table.extend(x.to_le_bytes());
        }
        table.extend((grad_bf16 as i32).to_le_bytes());
    }
    let table = upload(dev, &table)?;
    let (num, chunk) = (table_len(lens.len())?, CHUNK as i64);
    let f = dev.function("adamw", "adamw_step")?;
    let mut launch = dev.stream().launch_builder(&f);
    launch.arg(&table).arg(&num).arg(&chunk).arg(&k.w1).arg(&k.beta2).arg(&k.w2).arg(&k.eps);
    // SAFETY: matches adamw_step(const AdamwEntry*, int, i64, float, float, float, float); every
    // entry's param, exp_avg and exp_avg_sq are f32 buffers of n elements borrowed mutably for
    // this call, its grad one of n elements (f32 or bf16 as flagged) borrowed shared.
    unsafe { launch.launch(grid(blocks)?) }.map_err(Error::cuda("cuLaunchKernel(adamw_step)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_tensor_once() {
        let (first, total) = block_layout(&[1, CHUNK, CHUNK + 1, 3 * CHUNK - 1]);
        assert_eq!(first, vec![0, 1, 2, 4]);
        assert_eq!(total, 7);
    }
}
