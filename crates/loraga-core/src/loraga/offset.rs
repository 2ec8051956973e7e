//! The base weight offset every modifying initialisation ends with:
//!
//!   W_frz = round(W0 − s·B·A)
//!
//! from the stored A [r, n] and B [m, r], rounded once to W0's dtype, so that
//! W_frz + s·B·A = W0 up to that rounding. On the host the sum runs in f64 (rayon over rows); on
//! a CUDA device it is one GEMM, W_frz = −s·B·A + 1·W_frz over a copy of W0, accumulated in f32
//! with the result rounded once to W0's dtype (PEFT computes it in f32 too).

use half::bf16;
use rayon::prelude::*;

use crate::autograd::add_assign;
use crate::cpu::CpuStorage;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "LoRA init";

/// W − s·B·A on W's device (A and B are moved there first if they are elsewhere).
pub(crate) fn offset_weight(name: &str, w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    let (m, n) = w.shape().dims2(OP, name)?;
    let (r, na) = a.shape().dims2(OP, name)?;
    if na != n || b.dims() != [m, r] {
        return Err(Error::layer(
            OP,
            name,
            format!("A {:?} and B {:?} do not fit a weight [{m}, {n}]", a.dims(), b.dims()),
        ));
    }
    if w.device().is_cuda() {
        return offset_on_device(name, w, a, b, s);
    }
    let (w0, a, b) = (host_f32(w, name)?, host_f32(a, name)?, host_f32(b, name)?);
    let value = |i: usize, j: usize| {
        let ba: f64 = (0..r).map(|k| b[i * r + k] as f64 * a[k * n + j] as f64).sum();
        w0[i * n + j] as f64 - s * ba
    };
    let cpu = match w.dtype() {
        DType::F32 => {
            let mut out = vec![0.0f32; m * n];
            out.par_chunks_mut(n)
                .enumerate()
                .for_each(|(i, row)| row.iter_mut().enumerate().for_each(|(j, o)| *o = value(i, j) as f32));
            CpuStorage::F32(out)
        }
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; m * n];
            out.par_chunks_mut(n)
                .enumerate()
                .for_each(|(i, row)| row.iter_mut().enumerate().for_each(|(j, o)| *o = bf16::from_f64(value(i, j))));
            CpuStorage::BF16(out)
        }
    };
    Tensor::from_cpu(cpu, [m, n].into(), &Device::Cpu)
}

fn offset_on_device(name: &str, w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    let dev = w.device();
    let (moved_a, moved_b);
    let a = if a.device() == dev {
        a
    } else {
        moved_a = a.to_device(&dev)?;
        &moved_a
    };
    let b = if b.device() == dev {
        b
    } else {
        moved_b = b.to_device(&dev)?;
        &moved_b
    };
    // A copy of W0 on the device: 0 + W0 is exact.
    let mut out = Tensor::zeros(w.dims(), w.dtype(), &dev)?;
    add_assign(&mut out, w, name)?;
    gemm(&Gemm { alpha: -(s as f32), beta: 1.0, ..Gemm::default() }, b, a, &mut out)?;
    Ok(out)
}

/// A host tensor's values as f32; what runs only on the host says so for a GPU tensor.
pub(crate) fn host_f32(t: &Tensor, name: &str) -> Result<Vec<f32>> {
    match t.storage() {
        Storage::Cpu(c) => Ok(c.to_f32_vec()),
        Storage::Cuda(_) => Err(Error::layer(
            OP,
            name,
            "is on a CUDA device; this step (an exact SVD, PiSSA's exact SVD) runs on the host only so far",
        )),
    }
}
