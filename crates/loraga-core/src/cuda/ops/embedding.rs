//! Launchers of `kernels/embedding.cu`: row lookup and its scatter-add backward.
//!
//! ```text
//!   forward:  out [rows, dim] = table[ids]         in the table's dtype
//!   backward: dtable [vocab, dim] += dy[r] at ids[r]   in f32
//! ```
//!
//! The ids are host data checked by the caller (each below the vocabulary); they are uploaded once
//! by [`upload_ids`] and the same device copy serves the forward and the backward.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{THREADS, arg, arg_mut, int, output};
use crate::cuda::device::CudaDevice;
use crate::cuda::storage::{CudaSlices, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MODULE: &str = "embedding";
const OP: &str = "embedding";

/// The token ids on the device.
pub fn upload_ids(dev: &CudaDevice, ids: &[u32]) -> Result<CudaSlice<u32>> {
    dev.stream().clone_htod(ids).map_err(Error::cuda("cuMemcpyHtoD"))
}

/// One block per row (blocks stride over the rest), its threads over the columns.
fn grid(dev: &CudaDevice, rows: usize) -> LaunchConfig {
    let blocks = rows.clamp(1, dev.sm_count().max(1) * 32);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Rows `ids` of `table` [vocab, dim]; every id must be below vocab.
pub fn forward(table: &CudaStorage, ids: &CudaSlice<u32>, dim: usize) -> Result<CudaStorage> {
    let (dev, rows) = (&table.device, ids.len());
    let mut out = output(dev, table.dtype(), rows * dim)?;
    if rows * dim > 0 {
        let f = dev.function(MODULE, &format!("embedding_fwd_{}", table.dtype()))?;
        let (rows64, dim32) = (rows as i64, int(OP, "the embedding dimension", dim)?);
        let mut launch = dev.stream().launch_builder(&f);
        arg(&mut launch, table);
        launch.arg(ids);
        arg_mut(&mut launch, &mut out);
        launch.arg(&rows64).arg(&dim32);
        // SAFETY: embedding_fwd_<t>(const T* table, const unsigned* ids, T* out, i64 rows, int
        // dim); the ids (rows of them) index rows of the table (checked by the caller), out holds
        // rows * dim elements.
        unsafe { launch.launch(grid(dev, rows)) }.map_err(Error::cuda("cuLaunchKernel(embedding_fwd)"))?;
    }
    Ok(out)
}

/// The table's gradient [vocab, dim] in f32: row v is the sum of the rows of dy whose id is v.
pub fn backward(dy: &CudaStorage, ids: &CudaSlice<u32>, vocab: usize, dim: usize) -> Result<CudaStorage> {
    let (dev, rows) = (&dy.device, ids.len());
    if dy.len() != rows * dim {
        return Err(Error::shape(OP, format!("the output gradient holds {} elements, not [{rows}, {dim}]", dy.len())));
    }
    // Zeroed: the kernel only adds into the rows of tokens that occur.
    let mut dtable = CudaStorage::zeros(dev, DType::F32, vocab * dim)?;
    if rows * dim > 0 {
        let f = dev.function(MODULE, &format!("embedding_bwd_{}", dy.dtype()))?;
        let (rows64, dim32) = (rows as i64, int(OP, "the embedding dimension", dim)?);
        let CudaSlices::F32(dt) = &mut dtable.slice else { unreachable!("allocated as f32 above") };
        let mut launch = dev.stream().launch_builder(&f);
        arg(&mut launch, dy);
        launch.arg(ids);
        launch.arg(dt);
        launch.arg(&rows64).arg(&dim32);
        // SAFETY: embedding_bwd_<t>(const T* dy, const unsigned* ids, float* dtable, i64 rows, int
        // dim); dy holds rows * dim elements, every id is below vocab, dtable holds vocab * dim.
        unsafe { launch.launch(grid(dev, rows)) }.map_err(Error::cuda("cuLaunchKernel(embedding_bwd)"))?;
    }
    Ok(dtable)
}
