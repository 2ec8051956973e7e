//! The linear layer and the embedding lookup. Activations are matrices [tokens, features],
//! row-major. (The elementwise ops are in `elementwise.rs`.)
//!
//! On the CPU both take f32. On CUDA (`crate::cuda::ops::{linear, embedding}`) activations are
//! f32 or bf16 and the output has the activation's (for the embedding: the table's) dtype; the
//! weight's and the table's gradients are f32, the input's has the input's dtype.

use super::data::{cuda, cuda_tensor, dims2, f32s, on_cuda, tensor};
use super::tape::{Tape, Var, WeightGrad};
use crate::cuda::ops::{embedding as cuda_embedding, linear as cuda_linear};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm};
use crate::tensor::Tensor;

/// `x W^T` for x [n, k] and W [m, k] (PyTorch's `F.linear` without bias).
fn linear_fwd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((n, k), (m, kw)) = (dims2(x, "linear", "x")?, dims2(w, "linear", "weight")?);
    if k != kw {
        return Err(Error::shape(
            "linear",
            format!("x is {:?} but the weight is {:?} ([out, in])", x.dims(), w.dims()),
        ));
    }
    if on_cuda("linear", &[x, w])? {
        return cuda_tensor(cuda_linear::forward(cuda(x, "linear")?, cuda(w, "linear")?, n, k, m)?, &[n, m]);
    }
    f32s(x, "linear")?;
    f32s(w, "linear")?;
    x.matmul_t(w)
}

/// (dx = dy W, dW = dy^T x), each only where needed.
fn linear_bwd(dy: &Tensor, x: &Tensor, w: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (n, k) = dims2(x, "linear", "x")?;
    let m = w.dims()[0];
    if on_cuda("linear", &[dy, x, w])? {
        let (g, xs, ws) = (cuda(dy, "linear")?, cuda(x, "linear")?, cuda(w, "linear")?);
        let dx = needs[0].then(|| cuda_tensor(cuda_linear::grad_x(g, ws, n, k, m)?, &[n, k])).transpose()?;
        let dw = needs[1].then(|| cuda_tensor(cuda_linear::grad_w(g, xs, n, k, m)?, &[m, k])).transpose()?;
        return Ok(vec![dx, dw]);
    }
    let dx = needs[0].then(|| cpu_gemm(Gemm::default(), dy, w, [n, k])).transpose()?;
    let dw = needs[1].then(|| cpu_gemm(Gemm { trans_a: true, ..Gemm::default() }, dy, x, [m, k])).transpose()?;
    Ok(vec![dx, dw])
}

/// `op(a) op(b)` into a fresh CPU tensor of `shape`.
fn cpu_gemm(g: Gemm, a: &Tensor, b: &Tensor, shape: [usize; 2]) -> Result<Tensor> {
    let mut out = Tensor::zeros(shape, a.dtype(), &Device::Cpu)?;
    gemm(&g, a, b, &mut out)?;
    Ok(out)
}

impl Tape {
    /// `x W^T`: x [n, in], W [out, in] → [n, out]. On CUDA x and W must have one dtype (cast an
    /// f32 master weight to bf16 with [`Tape::cast`] first).
    pub fn linear(&mut self, x: Var, w: Var) -> Result<Var> {
        let y = linear_fwd(self.value(x), self.value(w))?;
        // dx = dy W; dW = dy^T x (the weight gradient LoRA-GA accumulates), declared so that a
        // gradient sink on W takes it in place and the backward is not asked for it.
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| linear_bwd(dy, inp[0], inp[1], needs));
        Ok(self.push_weight_op("linear", y, &[x, w], back, Some(WeightGrad { weight: 1, x: 0 })))
    }

    /// Rows `ids` of `table` [vocab, dim] → [ids.len(), dim]. An id outside the table is an error.
    pub fn embedding(&mut self, ids: &[u32], table: Var) -> Result<Var> {
        let t = self.value(table);
        let (vocab, dim) = dims2(t, "embedding", "table")?;
        if let Some((pos, id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "embedding: token id {id} at position {pos} is outside the vocabulary of {vocab}"
            )));
        }
        if on_cuda("embedding", &[t])? {
            let ts = cuda(t, "embedding")?;
            // Uploaded once; the backward's scatter-add reads the same copy.
            let dev_ids = cuda_embedding::upload_ids(&ts.device, ids)?;
            let y = cuda_tensor(cuda_embedding::forward(ts, &dev_ids, dim)?, &[ids.len(), dim])?;
            let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
                on_cuda("embedding", &[dy, inp[0]])?;
                let g = cuda(dy, "embedding")?;
                Ok(vec![Some(cuda_tensor(cuda_embedding::backward(g, &dev_ids, vocab, dim)?, &[vocab, dim])?)])
            });
            return Ok(self.push_op("embedding", y, &[table], back));
        }
        let data = f32s(t, "embedding")?;
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            out.extend_from_slice(&data[id as usize * dim..(id as usize + 1) * dim]);
        }
        let y = tensor(out, &[ids.len(), dim])?;
        let ids = ids.to_vec();
        let back = Box::new(move |dy: &Tensor, _: &[&Tensor], _: &[bool]| {
            // Scatter-add: a token that appears twice gets both rows' gradients.
            let g = f32s(dy, "embedding")?;
            let mut dt = vec![0.0f32; vocab * dim];
            for (row, &id) in ids.iter().enumerate() {
                let dst = &mut dt[id as usize * dim..(id as usize + 1) * dim];
                dst.iter_mut().zip(&g[row * dim..(row + 1) * dim]).for_each(|(d, s)| *d += s);
            }
            Ok(vec![Some(tensor(dt, &[vocab, dim])?)])
        });
        Ok(self.push_op("embedding", y, &[table], back))
    }
}
