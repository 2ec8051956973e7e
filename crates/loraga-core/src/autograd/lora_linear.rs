//! The LoRA-adapted linear layer as one tape op, over the products of [`crate::lora_linear`]:
//!
//!   y  = x Wᵀ + s (x Aᵀ) Bᵀ       x [n, in], W [out, in], A [r, in], B [out, r], scale s
//!   dx = dy W + V' A,   dA = V'ᵀ x,   dB = dyᵀ U',   with U' = s x Aᵀ and V' = s dy B
//!   dW = dyᵀ x                    only when W needs a gradient (a frozen base weight never does)
//!
//! The forward keeps U' [n, r] for the backward (r values per token, the fused kernels' choice),
//! so the backward recomputes nothing.
//!
//! Paths ([`LoraPath`]): the requested path goes to [`crate::lora_linear`] as it is. `Fused`
//! there runs each product the GEMM engine cannot take (f32 operands, a rank that is not a
//! multiple of 8, a device without wgmma) on cuBLAS instead, so a restriction of the fast path is
//! never an error; [`crate::lora_linear::fuses`] says whether a layer's operands fuse. On the CPU
//! every path is the same f32 faer composition.
//!
//! Dtypes follow the tape's rules: x, W, A and B have one dtype (f32 masters are cast on the
//! tape first, [`Tape::param_as`]); y and dx have x's; dA, dB and dW are f32, as the weight
//! gradient of [`Tape::linear`].

use super::data::{cuda, cuda_tensor, dims2, f32s, on_cuda};
use super::tape::{Tape, Var};
use crate::cuda::ops::elementwise as ew;
use crate::cuda::ops::linear as cuda_linear;
use crate::dtype::DType;
use crate::error::Result;
use crate::gemm::{Gemm, gemm};
use crate::lora_linear::{self, Lora, LoraPath};
use crate::tensor::Tensor;

const OP: &str = "lora_linear";

/// `dy` in `dtype` (the backward's operands must share x's dtype; an f32 gradient can arrive
/// where x is bf16, see [`ew::as_dtype`]).
fn in_dtype(dy: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
    if dy.dtype() == dtype {
        return Ok(None);
    }
    Ok(Some(cuda_tensor(ew::cast(cuda(dy, OP)?, dtype)?, dy.dims())?))
}

/// dW = dyᵀ x in f32 (a trainable base weight under a LoRA adapter: full fine-tuning plus LoRA).
fn weight_grad(dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((n, k), m) = (dims2(x, OP, "x")?, w.dims()[0]);
    if on_cuda(OP, &[dy, x])? {
        return cuda_tensor(cuda_linear::grad_w(cuda(dy, OP)?, cuda(x, OP)?, n, k, m)?, &[m, k]);
    }
    let mut dw = Tensor::zeros([m, k], DType::F32, &crate::Device::Cpu)?;
    gemm(&Gemm { trans_a: true, ..Gemm::default() }, dy, x, &mut dw)?;
    Ok(dw)
}

impl Tape {
    /// `x Wᵀ + scale (x Aᵀ) Bᵀ` by `path` (see the module docs for where each path applies).
    pub fn lora_linear(&mut self, x: Var, w: Var, a: Var, b: Var, scale: f32, path: LoraPath) -> Result<Var> {
        let (xv, wv, av, bv) = (self.value(x), self.value(w), self.value(a), self.value(b));
        if !on_cuda(OP, &[xv, wv, av, bv])? {
            for t in [xv, wv, av, bv] {
                f32s(t, OP)?;
            }
        }
        let fwd = lora_linear::forward(path, &Lora { w: wv, a: av, b: bv, scale }, xv)?;
        let u = fwd.u;
        let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let (x, w, a, b) = (inp[0], inp[1], inp[2], inp[3]);
            let converted = in_dtype(dy, x.dtype())?;
            let dy = converted.as_ref().unwrap_or(dy);
            let mut grads: Vec<Option<Tensor>> = vec![None, None, None, None];
            if needs[0] || needs[2] || needs[3] {
                let g = lora_linear::backward(path, &Lora { w, a, b, scale }, x, &u, dy)?;
                grads[0] = needs[0].then_some(g.dx);
                grads[2] = needs[2].then_some(g.da);
                grads[3] = needs[3].then_some(g.db);
            }
            if needs[1] {
                grads[1] = Some(weight_grad(dy, x, w)?);
            }
            Ok(grads)
        });
        Ok(self.push_op(OP, fwd.y, &[x, w, a, b], back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Params;
    use crate::autograd::gradcheck::check;
    use crate::device::Device;
    use crate::testing::randn;
    use rand::SeedableRng;

    #[test]
    fn gradcheck_lora_linear_every_input() {
        for path in [LoraPath::Fused, LoraPath::Cublas, LoraPath::Naive] {
            check("lora_linear", &[&[5, 6], &[7, 6], &[3, 6], &[7, 3]], move |t, v| {
                t.lora_linear(v[0], v[1], v[2], v[3], 0.7, path)
            });
        }
    }

    fn t(rng: &mut impl rand::Rng, dims: [usize; 2]) -> Tensor {
        Tensor::from_vec(randn(rng, dims[0] * dims[1]), dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_composed_ops_and_leaves_a_frozen_weight_alone() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut p = Params::new();
        p.insert("w", t(&mut rng, [7, 6]), false).unwrap();
        p.insert("a", t(&mut rng, [3, 6]), true).unwrap();
        p.insert("b", t(&mut rng, [7, 3]), true).unwrap();
        let x = t(&mut rng, [5, 6]);
        let run = |fused: bool, p: &mut Params| {
            let mut tape = Tape::new();
            let xv = tape.leaf(x.to(&Device::Cpu, DType::F32).unwrap(), true);
            let (w, a, b) = (tape.param(p, "w").unwrap(), tape.param(p, "a").unwrap(), tape.param(p, "b").unwrap());
            let y = if fused {
                tape.lora_linear(xv, w, a, b, 1.5, LoraPath::Fused).unwrap()
            } else {
                let base = tape.linear(xv, w).unwrap();
                let xa = tape.linear(xv, a).unwrap();
                let xab = tape.linear(xa, b).unwrap();
                let s = tape.scale(xab, 1.5).unwrap();
                tape.add(base, s).unwrap()
            };
            let yv = tape.value(y).to_vec::<f32>().unwrap();
            let seed =
                Tensor::from_vec(yv.iter().map(|v| v.sin()).collect::<Vec<f32>>(), [5, 7], &Device::Cpu).unwrap();
            let leaves = tape.backward_with(y, seed, p, None).unwrap();
            let dx = leaves.get(xv).unwrap().to_vec::<f32>().unwrap();
            let g = |n: &str| p.grad(n).unwrap().map(|g| g.to_vec::<f32>().unwrap());
            (yv, dx, g("a").unwrap(), g("b").unwrap(), g("w"))
        };
        let mut q = Params::new();
        for n in ["w", "a", "b"] {
            let prm = p.param(n).unwrap();
            q.insert(n, prm.value().to(&Device::Cpu, DType::F32).unwrap(), prm.trainable()).unwrap();
        }
        let (fused, composed) = (run(true, &mut p), run(false, &mut q));
        let close =
            |a: &[f32], b: &[f32]| crate::testing::rel_error(a, &b.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(close(&fused.0, &composed.0) < 1e-6, "y");
        assert!(close(&fused.1, &composed.1) < 1e-6, "dx");
        assert!(close(&fused.2, &composed.2) < 1e-6, "dA");
        assert!(close(&fused.3, &composed.3) < 1e-6, "dB");
        assert!(fused.4.is_none(), "a frozen base weight gets no gradient");
    }

    #[test]
    fn the_cpu_takes_the_requested_path_and_refuses_bf16() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let (x, w, a, b) = (t(&mut rng, [2, 8]), t(&mut rng, [8, 8]), t(&mut rng, [8, 8]), t(&mut rng, [8, 8]));
        assert!(!lora_linear::fuses(&Lora { w: &w, a: &a, b: &b, scale: 1.0 }, &x).unwrap(), "the CPU never fuses");
        let mut tape = Tape::new();
        let xv = tape.constant(Tensor::zeros([2, 8], DType::BF16, &Device::Cpu).unwrap());
        let (w, a, b) = (tape.constant(w), tape.constant(a), tape.constant(b));
        let e = tape.lora_linear(xv, w, a, b, 1.0, LoraPath::Fused).unwrap_err().to_string();
        assert!(e.contains("f32 tensors, got bf16"), "{e}");
    }
}
