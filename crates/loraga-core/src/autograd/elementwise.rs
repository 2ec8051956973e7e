//! Elementwise differentiable ops on activations (any shape, the same for every operand): add,
//! mul, scale, SiLU, SwiGLU, and the dtype cast of mixed precision.
//!
//! On the CPU they take f32 tensors; on CUDA f32 or bf16, with the operands of one op in one
//! dtype, through `kernels/elementwise.cu` (`crate::cuda::ops::elementwise`). Outputs and
//! gradients have the operands' dtype.

use super::data::{cuda, cuda_tensor, f32s, on_cuda, tensor};
use super::tape::{Tape, Var};
use crate::cuda::ops::elementwise as ew;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

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

/// `f(a, b)` elementwise: on the device by `cuda_f`, on the CPU by `cpu_f` over f32 values.
fn zip_with(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    cuda_f: fn(&crate::cuda::CudaStorage, &crate::cuda::CudaStorage) -> Result<crate::cuda::CudaStorage>,
    cpu_f: fn(f32, f32) -> f32,
) -> Result<Tensor> {
    if on_cuda(op, &[a, b])? {
        return cuda_tensor(cuda_f(cuda(a, op)?, cuda(b, op)?)?, a.dims());
    }
    tensor(f32s(a, op)?.iter().zip(f32s(b, op)?).map(|(&x, &y)| cpu_f(x, y)).collect(), a.dims())
}

/// The gradient `dy` of an op's output, as a device buffer in `dtype` (see
/// [`ew::as_dtype`]) when it is on CUDA, or as f32 host data.
enum Grad<'a> {
    Cuda(ew::AsDtype<'a>),
    Cpu(&'a [f32]),
}

fn grad<'a>(dy: &'a Tensor, like: &Tensor, op: &'static str) -> Result<Grad<'a>> {
    Ok(if on_cuda(op, &[dy, like])? {
        Grad::Cuda(ew::as_dtype(cuda(dy, op)?, like.dtype())?)
    } else {
        Grad::Cpu(f32s(dy, op)?)
    })
}

/// `dy * other` in other's dtype (mul's backward).
fn times(dy: &Tensor, other: &Tensor) -> Result<Tensor> {
    match grad(dy, other, "mul")? {
        Grad::Cuda(g) => cuda_tensor(ew::mul(&g, cuda(other, "mul")?)?, other.dims()),
        Grad::Cpu(g) => tensor(g.iter().zip(f32s(other, "mul")?).map(|(g, o)| g * o).collect(), other.dims()),
    }
}

/// `s * x`.
fn scaled(x: &Tensor, s: f32) -> Result<Tensor> {
    if on_cuda("scale", &[x])? {
        return cuda_tensor(ew::scale(cuda(x, "scale")?, s)?, x.dims());
    }
    tensor(f32s(x, "scale")?.iter().map(|v| v * s).collect(), x.dims())
}

/// `x` in `dtype`. The CPU holds f32 only, so there the one legal cast is f32 -> f32.
fn cast_to(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if on_cuda("cast", &[x])? {
        return cuda_tensor(ew::cast(cuda(x, "cast")?, dtype)?, x.dims());
    }
    if dtype != DType::F32 {
        return Err(Error::DType { op: "cast", msg: format!("the CPU autograd ops keep f32 only, asked for {dtype}") });
    }
    tensor(f32s(x, "cast")?.to_vec(), x.dims())
}

impl Tape {
    /// `a + b`, same shapes.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        same_shape(av, bv, "add")?;
        let y = zip_with("add", av, bv, ew::add, |x, y| x + y)?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let copy = |like: &Tensor| cast_to(dy, like.dtype());
            Ok(vec![needs[0].then(|| copy(inp[0])).transpose()?, needs[1].then(|| copy(inp[1])).transpose()?])
        });
        Ok(self.push_op("add", y, &[a, b], back))
    }

    /// `a * b` elementwise, same shapes.
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        same_shape(av, bv, "mul")?;
        let y = zip_with("mul", av, bv, ew::mul, |x, y| x * y)?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            Ok(vec![needs[0].then(|| times(dy, inp[1])).transpose()?, needs[1].then(|| times(dy, inp[0])).transpose()?])
        });
        Ok(self.push_op("mul", y, &[a, b], back))
    }

    /// `s * a` for a constant `s` (LoRA's scaling).
    pub fn scale(&mut self, a: Var, s: f32) -> Result<Var> {
        let y = scaled(self.value(a), s)?;
        let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
            let g = match grad(dy, inp[0], "scale")? {
                Grad::Cuda(g) => cuda_tensor(ew::scale(&g, s)?, dy.dims())?,
                Grad::Cpu(g) => tensor(g.iter().map(|g| g * s).collect(), dy.dims())?,
            };
            Ok(vec![Some(g)])
        });
        Ok(self.push_op("scale", y, &[a], back))
    }

    /// `x sigmoid(x)` elementwise.
    pub fn silu(&mut self, x: Var) -> Result<Var> {
        let xv = self.value(x);
        let y = if on_cuda("silu", &[xv])? {
            cuda_tensor(ew::silu_fwd(cuda(xv, "silu")?)?, xv.dims())?
        } else {
            tensor(f32s(xv, "silu")?.iter().map(|&v| silu(v)).collect(), xv.dims())?
        };
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
            let x = inp[0];
            let dx = match grad(dy, x, "silu")? {
                Grad::Cuda(g) => cuda_tensor(ew::silu_bwd(&g, cuda(x, "silu")?)?, x.dims())?,
                Grad::Cpu(g) => {
                    tensor(g.iter().zip(f32s(x, "silu")?).map(|(g, &x)| g * silu_grad(x)).collect(), x.dims())?
                }
            };
            Ok(vec![Some(dx)])
        });
        Ok(self.push_op("silu", y, &[x], back))
    }

    /// `silu(gate) * up`: Llama's MLP activation, fused so that only the inputs are saved.
    pub fn swiglu(&mut self, gate: Var, up: Var) -> Result<Var> {
        let (gv, uv) = (self.value(gate), self.value(up));
        same_shape(gv, uv, "swiglu")?;
        let y = zip_with("swiglu", gv, uv, ew::swiglu_fwd, |g, u| silu(g) * u)?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let (g, u) = (inp[0], inp[1]);
            let (dgate, dup) = match grad(dy, g, "swiglu")? {
                // One kernel writes both; an unneeded one is dropped (in Llama both are needed).
                Grad::Cuda(d) => {
                    let (dg, du) = ew::swiglu_bwd(&d, cuda(g, "swiglu")?, cuda(u, "swiglu")?)?;
                    (cuda_tensor(dg, g.dims())?, cuda_tensor(du, u.dims())?)
                }
                Grad::Cpu(d) => {
                    let (gs, us) = (f32s(g, "swiglu")?, f32s(u, "swiglu")?);
                    let dg = d.iter().zip(gs).zip(us).map(|((d, &g), u)| d * u * silu_grad(g)).collect();
                    let du = d.iter().zip(gs).map(|(d, &g)| d * silu(g)).collect();
                    (tensor(dg, g.dims())?, tensor(du, u.dims())?)
                }
            };
            Ok(vec![needs[0].then_some(dgate), needs[1].then_some(dup)])
        });
        Ok(self.push_op("swiglu", y, &[gate, up], back))
    }

    /// `x` converted to `dtype` (f32 <-> bf16 on CUDA, rounding to nearest even into bf16; a copy
    /// when x has it already). Mixed precision keeps trainable parameters in f32 and casts them
    /// to bf16 on the tape before use, as PyTorch's autocast does; the backward casts the
    /// gradient back to x's dtype. The CPU keeps f32 only, so there only f32 -> f32 is legal.
    pub fn cast(&mut self, x: Var, dtype: DType) -> Result<Var> {
        let y = cast_to(self.value(x), dtype)?;
        let back = Box::new(|dy: &Tensor, inp: &[&Tensor], _: &[bool]| Ok(vec![Some(cast_to(dy, inp[0].dtype())?)]));
        Ok(self.push_op("cast", y, &[x], back))
    }
}
