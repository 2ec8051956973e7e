//! Launcher of `kernels/rope.cu`: rotary position embeddings in the half-split layout of
//! `crate::autograd::rope`, forward (sign +1) and backward (sign -1, the inverse rotation).
//!
//! The cos/sin tables [max_positions, head_dim] are uploaded once per table and device
//! ([`RopeTables`], cached by `RopeTable`); the positions once per forward
//! (`crate::autograd::rope::Positions`), shared by every layer and its backward.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{arg, arg_mut, expect, grid_stride, int, output};
use crate::cuda::device::CudaDevice;
use crate::cuda::storage::CudaStorage;
use crate::error::{Error, Result};

const OP: &str = "rope";

/// A RoPE table's cos and sin on one device.
pub struct RopeTables {
    device: CudaDevice,
    pub head_dim: usize,
    pub max_positions: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl RopeTables {
    /// Uploads host tables of `max_positions * head_dim` values each.
    pub fn upload(dev: &CudaDevice, head_dim: usize, cos: &[f32], sin: &[f32]) -> Result<RopeTables> {
        if head_dim == 0 || cos.len() != sin.len() || !cos.len().is_multiple_of(head_dim) {
            return Err(Error::shape(
                OP,
                format!("tables of {} and {} values for head_dim {head_dim}", cos.len(), sin.len()),
            ));
        }
        let stream = dev.stream();
        Ok(RopeTables {
            device: dev.clone(),
            head_dim,
            max_positions: cos.len() / head_dim,
            cos: stream.clone_htod(cos).map_err(Error::cuda("cuMemcpyHtoD"))?,
            sin: stream.clone_htod(sin).map_err(Error::cuda("cuMemcpyHtoD"))?,
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }
}

/// The positions of one call on the device (each must be below the table's max_positions:
/// checked by the caller on the host).
pub fn upload_positions(dev: &CudaDevice, positions: &[u32]) -> Result<CudaSlice<u32>> {
    dev.stream().clone_htod(positions).map_err(Error::cuda("cuMemcpyHtoD"))
}

/// Rotates each head of each row of x [rows, width] by its position: `sign` +1 forward, -1
/// backward. The result has x's dtype.
pub fn rotate(
    x: &CudaStorage,
    t: &RopeTables,
    positions: &CudaSlice<u32>,
    rows: usize,
    width: usize,
    sign: f32,
) -> Result<CudaStorage> {
    let dev = &x.device;
    expect(OP, "x", x, &t.device, x.dtype(), rows * width)?;
    if positions.len() != rows || !width.is_multiple_of(t.head_dim) || !t.head_dim.is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            format!(
                "x [{rows}, {width}] with {} positions and head_dim {} (width must be whole heads of even size, one position per row)",
                positions.len(),
                t.head_dim
            ),
        ));
    }
    let (width32, head32) = (int(OP, "the row width", width)?, int(OP, "head_dim", t.head_dim)?);
    let mut y = output(dev, x.dtype(), rows * width)?;
    if rows * width > 0 {
        let f = dev.function("rope", &format!("rope_{}", x.dtype()))?;
        let rows64 = rows as i64;
        let mut launch = dev.stream().launch_builder(&f);
        arg(&mut launch, x);
        arg_mut(&mut launch, &mut y);
        launch.arg(&t.cos).arg(&t.sin).arg(positions).arg(&rows64).arg(&width32).arg(&head32).arg(&sign);
        // SAFETY: rope_<t>(const T* x, T* y, const float* cos, const float* sin, const unsigned*
        // pos, i64 rows, int width, int head_dim, float sign); x and y hold rows * width
        // elements, pos rows (each below max_positions, checked by the caller), the tables
        // max_positions * head_dim.
        unsafe { launch.launch(grid_stride(dev, rows * width / 2)) }.map_err(Error::cuda("cuLaunchKernel(rope)"))?;
    }
    Ok(y)
}
