//! Rotary position embeddings in Hugging Face Llama's half-split layout: dimension i of a head
//! pairs with i + head_dim/2 (`rotate_half`), not llama.cpp's adjacent pairs; GGUF q/k weights
//! are un-permuted on load (`crate::io::unpermute_qk`) so that this layout applies to them too.
//!
//!   out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
//!
//! with angle(pos, i) = pos * theta^(-2i / head_dim) for i < head_dim/2, repeated for both halves.
//!
//! On the CPU x is f32; on CUDA (`kernels/rope.cu`) f32 or bf16, and the output and gradient have
//! x's dtype. The table is computed on the host and uploaded once per device that uses it; the
//! positions of a forward are uploaded once too ([`Positions`]) and shared by every layer.

use std::sync::{Arc, Mutex};

use super::data::{cuda, cuda_tensor, dims2, f32s, on_cuda, tensor};
use super::tape::{Tape, Var};
use cudarc::driver::CudaSlice;

use crate::cuda::CudaDevice;
use crate::cuda::ops::rope::{self as cuda_rope, RopeTables};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The position of each row of one forward, on the host and, for a CUDA forward, on its device:
/// built once per forward, so that every layer's RoPE (and its backward) reads one upload.
pub struct Positions {
    host: Vec<u32>,
    device: Option<(CudaDevice, Arc<CudaSlice<u32>>)>,
}

impl Positions {
    /// `positions` for ops whose tensors live on `device` (uploaded there when it is CUDA).
    pub fn new(positions: Vec<u32>, device: &Device) -> Result<Positions> {
        let device = match device {
            Device::Cpu => None,
            Device::Cuda(d) => Some((d.clone(), Arc::new(cuda_rope::upload_positions(d, &positions)?))),
        };
        Ok(Positions { host: positions, device })
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.host
    }

    /// The device copy, for an op on `dev`.
    fn on(&self, dev: &CudaDevice) -> Result<Arc<CudaSlice<u32>>> {
        match &self.device {
            Some((d, p)) if d == dev => Ok(p.clone()),
            Some((d, _)) => Err(Error::DeviceMismatch {
                op: "rope",
                lhs: format!("x on {dev:?}"),
                rhs: format!("positions on {d:?}"),
            }),
            None => Err(Error::DeviceMismatch {
                op: "rope",
                lhs: format!("x on {dev:?}"),
                rhs: "positions on the CPU".into(),
            }),
        }
    }
}

/// cos and sin of every angle for positions 0..max_positions, [max_positions, head_dim].
pub struct RopeTable {
    pub head_dim: usize,
    pub max_positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The tables on each CUDA device that has used them, uploaded at its first use.
    on_devices: Mutex<Vec<Arc<RopeTables>>>,
}

impl RopeTable {
    /// The default (unscaled) RoPE of Hugging Face Llama. The inverse frequencies and the
    /// products pos * inv_freq are rounded to f32 as transformers does.
    pub fn new(head_dim: usize, max_positions: usize, theta: f32) -> Result<RopeTable> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::InvalidArgument(format!("rope: head_dim must be even and positive, got {head_dim}")));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        let (mut cos, mut sin) = (vec![0.0; max_positions * head_dim], vec![0.0; max_positions * head_dim]);
        for p in 0..max_positions {
            for i in 0..head_dim {
                let angle = (p as f32 * inv_freq[i % half]) as f64;
                cos[p * head_dim + i] = angle.cos() as f32;
                sin[p * head_dim + i] = angle.sin() as f32;
            }
        }
        Ok(RopeTable { head_dim, max_positions, cos, sin, on_devices: Mutex::new(Vec::new()) })
    }

    /// The tables on `dev`, uploaded on the first call for that device.
    fn on_device(&self, dev: &CudaDevice) -> Result<Arc<RopeTables>> {
        let mut tables = self.on_devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tables.iter().find(|t| t.device() == dev) {
            return Ok(t.clone());
        }
        let t = Arc::new(RopeTables::upload(dev, self.head_dim, &self.cos, &self.sin)?);
        tables.push(t.clone());
        Ok(t)
    }
}

/// Rotates each head of each row by its position; `sign` -1 applies the inverse rotation (the
/// backward pass: the rotation is orthogonal, so its gradient is the rotation by -angle).
fn rotate(x: &[f32], t: &RopeTable, positions: &[u32], width: usize, sign: f32) -> Vec<f32> {
    let (d, half) = (t.head_dim, t.head_dim / 2);
    let mut out = vec![0.0f32; x.len()];
    for (r, &p) in positions.iter().enumerate() {
        let (cos, sin) = (&t.cos[p as usize * d..(p as usize + 1) * d], &t.sin[p as usize * d..(p as usize + 1) * d]);
        for h in 0..width / d {
            let base = r * width + h * d;
            for i in 0..half {
                let (x1, x2) = (x[base + i], x[base + i + half]);
                out[base + i] = x1 * cos[i] - sign * x2 * sin[i];
                out[base + i + half] = x2 * cos[i + half] + sign * x1 * sin[i + half];
            }
        }
    }
    out
}

impl Tape {
    /// RoPE on x [rows, n_heads * head_dim]; row r is at position `positions[r]`.
    pub fn rope(&mut self, x: Var, table: &Arc<RopeTable>, positions: &[u32]) -> Result<Var> {
        let positions = Positions::new(positions.to_vec(), &self.value(x).device())?;
        self.rope_at(x, table, &positions)
    }

    /// The same with positions prepared once for the whole forward ([`Positions`]).
    pub fn rope_at(&mut self, x: Var, table: &Arc<RopeTable>, prepared: &Positions) -> Result<Var> {
        let positions = prepared.as_slice();
        let xv = self.value(x);
        let (rows, width) = dims2(xv, "rope", "x")?;
        if !width.is_multiple_of(table.head_dim) || positions.len() != rows {
            return Err(Error::shape(
                "rope",
                format!(
                    "x is {:?}: width must be a multiple of head_dim {} and there must be one position per row (got {})",
                    xv.dims(),
                    table.head_dim,
                    positions.len()
                ),
            ));
        }
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= table.max_positions) {
            return Err(Error::InvalidArgument(format!(
                "rope: position {p} is past the table's {} positions",
                table.max_positions
            )));
        }
        if on_cuda("rope", &[xv])? {
            let xs = cuda(xv, "rope")?;
            let tables = table.on_device(&xs.device)?;
            // The backward rotates with the same device copy.
            let pos = prepared.on(&xs.device)?;
            let y = cuda_tensor(cuda_rope::rotate(xs, &tables, &pos, rows, width, 1.0)?, &[rows, width])?;
            let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
                on_cuda("rope", &[dy, inp[0]])?;
                let g = crate::cuda::ops::elementwise::as_dtype(cuda(dy, "rope")?, inp[0].dtype())?;
                Ok(vec![Some(cuda_tensor(cuda_rope::rotate(&g, &tables, &pos, rows, width, -1.0)?, &[rows, width])?)])
            });
            return Ok(self.push_op("rope", y, &[x], back));
        }
        let y = tensor(rotate(f32s(xv, "rope")?, table, positions, width, 1.0), &[rows, width])?;
        let (table, positions) = (table.clone(), positions.to_vec());
        let back = Box::new(move |dy: &Tensor, _: &[&Tensor], _: &[bool]| {
            Ok(vec![Some(tensor(rotate(f32s(dy, "rope")?, &table, &positions, width, -1.0), &[rows, width])?)])
        });
        Ok(self.push_op("rope", y, &[x], back))
    }
}
