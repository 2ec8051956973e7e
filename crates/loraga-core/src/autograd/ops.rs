//! The basic differentiable ops: linear layers, elementwise arithmetic, embedding lookup, SiLU
//! and SwiGLU. Activations are matrices [tokens, features], row-major.

use super::data::{dims2, f32s, tensor};
use super::tape::{Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm};
use crate::tensor::Tensor;

/// `x W^T` for x [n, k] and W [m, k] (PyTorch's `F.linear` without bias), through `crate::gemm`.
fn linear_fwd(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((_, k), (_, kw)) = (dims2(x, "linear", "x")?, dims2(w, "linear", "weight")?);
    if k != kw {
        return Err(Error::shape(
            "linear",
            format!("x is {:?} but the weight is {:?} ([out, in])", x.dims(), w.dims()),
        ));
    }
    f32s(x, "linear")?;
    f32s(w, "linear")?;
    x.matmul_t(w)
}

/// `op(a) op(b)` into a fresh f32 tensor of `shape`.
fn gemm_new(g: Gemm, a: &Tensor, b: &Tensor, shape: [usize; 2]) -> Result<Tensor> {
    let mut out = Tensor::zeros(shape, a.dtype(), &Device::Cpu)?;
    gemm(&g, a, b, &mut out)?;
    Ok(out)
}

fn same_shape(a: &Tensor, b: &Tensor, op: &'static str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::shape(op, format!("operands have shapes {:?} and {:?}", a.dims(), b.dims())));
    }
    Ok(())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// d silu(x) / dx = s (1 + x (1 - s)) with s = sigmoid(x).
fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

impl Tape {
    /// `x W^T`: x [n, in], W [out, in] → [n, out].
    pub fn linear(&mut self, x: Var, w: Var) -> Result<Var> {
        let y = linear_fwd(self.value(x), self.value(w))?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let (x, w) = (inp[0], inp[1]);
            let (n, k) = dims2(x, "linear", "x")?;
            let m = w.dims()[0];
            // dx = dy W; dW = dy^T x (the weight gradient LoRA-GA accumulates).
            let dx = if needs[0] { Some(gemm_new(Gemm::default(), dy, w, [n, k])?) } else { None };
            let dw =
                if needs[1] { Some(gemm_new(Gemm { trans_a: true, ..Gemm::default() }, dy, x, [m, k])?) } else { None };
            Ok(vec![dx, dw])
        });
        Ok(self.push_op("linear", y, &[x, w], back))
    }

    /// `a + b`, same shapes.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        same_shape(av, bv, "add")?;
        let out: Vec<f32> = f32s(av, "add")?.iter().zip(f32s(bv, "add")?).map(|(x, y)| x + y).collect();
        let y = tensor(out, av.dims())?;
        let back = Box::new(|dy: &Tensor, _: &[&Tensor], needs: &[bool]| {
            let copy = || tensor(f32s(dy, "add")?.to_vec(), dy.dims());
            Ok(vec![if needs[0] { Some(copy()?) } else { None }, if needs[1] { Some(copy()?) } else { None }])
        });
        Ok(self.push_op("add", y, &[a, b], back))
    }

    /// `a * b` elementwise, same shapes.
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        same_shape(av, bv, "mul")?;
        let out: Vec<f32> = f32s(av, "mul")?.iter().zip(f32s(bv, "mul")?).map(|(x, y)| x * y).collect();
        let y = tensor(out, av.dims())?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let g = f32s(dy, "mul")?;
            let times = |other: &Tensor| -> Result<Tensor> {
                tensor(g.iter().zip(f32s(other, "mul")?).map(|(g, o)| g * o).collect(), dy.dims())
            };
            Ok(vec![
                if needs[0] { Some(times(inp[1])?) } else { None },
                if needs[1] { Some(times(inp[0])?) } else { None },
            ])
        });
        Ok(self.push_op("mul", y, &[a, b], back))
    }

    /// `s * a` for a constant `s` (LoRA's scaling).
    pub fn scale(&mut self, a: Var, s: f32) -> Result<Var> {
        let av = self.value(a);
        let y = tensor(f32s(av, "scale")?.iter().map(|x| x * s).collect(), av.dims())?;
        let back = Box::new(move |dy: &Tensor, _: &[&Tensor], _: &[bool]| {
            Ok(vec![Some(tensor(f32s(dy, "scale")?.iter().map(|g| g * s).collect(), dy.dims())?)])
        });
        Ok(self.push_op("scale", y, &[a], back))
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

    /// `x sigmoid(x)` elementwise.
    pub fn silu(&mut self, x: Var) -> Result<Var> {
        let xv = self.value(x);
        let y = tensor(f32s(xv, "silu")?.iter().map(|&v| silu(v)).collect(), xv.dims())?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
            let (g, x) = (f32s(dy, "silu")?, f32s(inp[0], "silu")?);
            Ok(vec![Some(tensor(g.iter().zip(x).map(|(g, &x)| g * silu_grad(x)).collect(), dy.dims())?)])
        });
        Ok(self.push_op("silu", y, &[x], back))
    }

    /// `silu(gate) * up`: Llama's MLP activation, fused so that only the inputs are saved.
    pub fn swiglu(&mut self, gate: Var, up: Var) -> Result<Var> {
        let (gv, uv) = (self.value(gate), self.value(up));
        same_shape(gv, uv, "swiglu")?;
        let out = f32s(gv, "swiglu")?.iter().zip(f32s(uv, "swiglu")?).map(|(&g, &u)| silu(g) * u).collect();
        let y = tensor(out, gv.dims())?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let (d, g, u) = (f32s(dy, "swiglu")?, f32s(inp[0], "swiglu")?, f32s(inp[1], "swiglu")?);
            let dgate = needs[0].then(|| d.iter().zip(g).zip(u).map(|((d, &g), u)| d * u * silu_grad(g)).collect());
            let dup = needs[1].then(|| d.iter().zip(g).map(|(d, &g)| d * silu(g)).collect());
            Ok(vec![dgate.map(|v| tensor(v, dy.dims())).transpose()?, dup.map(|v| tensor(v, dy.dims())).transpose()?])
        });
        Ok(self.push_op("swiglu", y, &[gate, up], back))
    }
}
