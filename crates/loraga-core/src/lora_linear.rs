//! The LoRA linear layer's three products, by three interchangeable paths.
//!
//! PyTorch layouts: X [M, K], frozen W [N, K], A [r, K], B [N, r], scale s (alpha / r or
//! alpha / sqrt(r)). With U' = s X Aᵀ [M, r] and V' = s dY B [M, r]:
//!
//!   forward   Y  = X Wᵀ + U' Bᵀ              = [X | U'] [W | B]ᵀ
//!   backward  dX = dY W + V' A               = [dY | V'] [W ; A]
//!             dA = s (dY B)ᵀ X               = V'ᵀ X
//!             dB = s dYᵀ U                   = dYᵀ U'
//!
//! Paths ([`LoraPath`]): `Fused` runs each `[.. | ..]` product as one GEMM-engine call over two K
//! sources, after one skinny GEMM for U' (or V'); `Cublas` composes cuBLAS calls the way PEFT and
//! unsloth do (base GEMM, two adapter GEMMs, the adapter added through beta = 1); `Naive` is the
//! same composition on the naive kernel. On the CPU every path is the faer composition.
//! Activations (Y, U', dX) are stored in the input dtype; the adapter gradients dA, dB in f32.

use crate::cuda::GemmPath;
use crate::cuda::gemm_sm90::{self, KSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm, gemm_cuda};
use crate::storage::Storage;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    Naive,
    Cublas,
    Fused,
}

impl LoraPath {
    pub fn name(self) -> &'static str {
        match self {
            LoraPath::Naive => "naive",
            LoraPath::Cublas => "cublas",
            LoraPath::Fused => "fused",
        }
    }
}

/// One LoRA-adapted linear layer's weights.
pub struct Lora<'a> {
    pub w: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f32,
}

/// What the forward keeps for the backward.
pub struct Forward {
    pub y: Tensor,
    /// U' = s X Aᵀ [M, r], in the input dtype.
    pub u: Tensor,
}

pub struct Grads {
    pub dx: Tensor,
    /// [r, K], f32.
    pub da: Tensor,
    /// [N, r], f32.
    pub db: Tensor,
}

/// (M, K, N, r) after checking every shape and dtype against each other.
fn dims(l: &Lora, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (m, k) = x.shape().dims2("lora", "X")?;
    let (n, kw) = l.w.shape().dims2("lora", "W")?;
    let (r, ka) = l.a.shape().dims2("lora", "A")?;
    let (nb, rb) = l.b.shape().dims2("lora", "B")?;
    let bad = |msg: String| Err(Error::shape("lora", msg));
    if kw != k || ka != k {
        return bad(format!("X is [{m}, {k}] but W is [{n}, {kw}] and A is [{r}, {ka}]"));
    }
    if nb != n || rb != r {
        return bad(format!("B is [{nb}, {rb}], expected [{n}, {r}] for W [{n}, {k}] and A [{r}, {k}]"));
    }
    if r == 0 || r > k.min(n) {
        return bad(format!("rank r = {r} must be in 1..=min(K, N) = {}", k.min(n)));
    }
    for (what, t) in [("W", l.w), ("A", l.a), ("B", l.b)] {
        if t.dtype() != x.dtype() {
            return Err(Error::DType { op: "lora", msg: format!("X is {} but {what} is {}", x.dtype(), t.dtype()) });
        }
    }
    Ok((m, k, n, r))
}

/// One product by the chosen path (CPU tensors always take the CPU backend).
fn product(path: LoraPath, g: Gemm, a: &Tensor, b: &Tensor, c: &mut Tensor) -> Result<()> {
    match (c.device().is_cuda(), path) {
        (false, _) => gemm(&g, a, b, c),
        (true, LoraPath::Naive) => gemm_cuda(GemmPath::Naive, &g, a, b, c),
        (true, LoraPath::Cublas) => gemm_cuda(GemmPath::Cublas, &g, a, b, c),
        (true, LoraPath::Fused) => gemm_cuda(GemmPath::Engine, &g, a, b, c),
    }
}

const NT: Gemm = Gemm { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
const NN: Gemm = Gemm { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
const TN: Gemm = Gemm { trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 };

pub fn forward(path: LoraPath, l: &Lora, x: &Tensor) -> Result<Forward> {
    let (m, _k, n, r) = dims(l, x)?;
    let mut out = Forward {
        y: Tensor::zeros([m, n], x.dtype(), &x.device())?,
        u: Tensor::zeros([m, r], x.dtype(), &x.device())?,
    };
    forward_into(path, l, x, &mut out)?;
    Ok(out)
}

/// The forward into preallocated outputs (the training loop's form: no allocation per step).
pub fn forward_into(path: LoraPath, l: &Lora, x: &Tensor, out: &mut Forward) -> Result<()> {
    let (m, _k, n, r) = dims(l, x)?;
    expect_shape("Y", &out.y, [m, n], x.dtype())?;
    expect_shape("U", &out.u, [m, r], x.dtype())?;
    product(path, Gemm { alpha: l.scale, ..NT }, x, l.a, &mut out.u)?;
    if path == LoraPath::Fused && x.device().is_cuda() {
        two_sources(NT, [(x, l.w), (&out.u, l.b)], &mut out.y)
    } else {
        product(path, NT, x, l.w, &mut out.y)?;
        product(path, Gemm { beta: 1.0, ..NT }, &out.u, l.b, &mut out.y)
    }
}

/// The backward from dY [M, N]; `u` is [`Forward::u`].
pub fn backward(path: LoraPath, l: &Lora, x: &Tensor, u: &Tensor, dy: &Tensor) -> Result<Grads> {
    let (m, k, n, r) = dims(l, x)?;
    let dev = x.device();
    let mut grads = Grads {
        dx: Tensor::zeros([m, k], x.dtype(), &dev)?,
        da: Tensor::zeros([r, k], DType::F32, &dev)?,
        db: Tensor::zeros([n, r], DType::F32, &dev)?,
    };
    let mut v = Tensor::zeros([m, r], x.dtype(), &dev)?;
    backward_into(path, l, x, u, dy, &mut v, &mut grads)?;
    Ok(grads)
}

/// The backward into preallocated gradients; `v` [M, r] is scratch for V' = s dY B. dA and dB
/// are overwritten.
pub fn backward_into(
    path: LoraPath,
    l: &Lora,
    x: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    v: &mut Tensor,
    grads: &mut Grads,
) -> Result<()> {
    let (m, k, n, r) = dims(l, x)?;
    expect_shape("dY", dy, [m, n], x.dtype())?;
    expect_shape("U", u, [m, r], x.dtype())?;
    expect_shape("V scratch", v, [m, r], x.dtype())?;
    expect_shape("dX", &grads.dx, [m, k], x.dtype())?;
    expect_shape("dA", &grads.da, [r, k], DType::F32)?;
    expect_shape("dB", &grads.db, [n, r], DType::F32)?;
    product(path, Gemm { alpha: l.scale, ..NN }, dy, l.b, v)?;
    if path == LoraPath::Fused && x.device().is_cuda() {
        two_sources(NN, [(dy, l.w), (v, l.a)], &mut grads.dx)?;
    } else {
        product(path, NN, dy, l.w, &mut grads.dx)?;
        product(path, Gemm { beta: 1.0, ..NN }, v, l.a, &mut grads.dx)?;
    }
    product(path, TN, v, x, &mut grads.da)?;
    product(path, TN, dy, u, &mut grads.db)
}

fn expect_shape<const N: usize>(what: &str, t: &Tensor, dims: [usize; N], dtype: DType) -> Result<()> {
    if t.dims() != dims || t.dtype() != dtype {
        return Err(Error::shape("lora", format!("{what} is {} {}, expected {dims:?} {dtype}", t.shape(), t.dtype())));
    }
    Ok(())
}

/// `g += alpha * dYᵀ X` into an f32 gradient [N, K] in place: LoRA-GA's estimation step.
pub fn accumulate_weight_grad(path: LoraPath, g: &mut Tensor, dy: &Tensor, x: &Tensor, alpha: f32) -> Result<()> {
    if g.dtype() != DType::F32 {
        return Err(Error::DType {
            op: "accumulate_weight_grad",
            msg: format!("the gradient buffer must be f32, got {}", g.dtype()),
        });
    }
    product(path, Gemm { alpha, beta: 1.0, ..TN }, dy, x, g)
}

fn on_device(t: &Tensor) -> Result<&crate::cuda::CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) => Ok(s),
        Storage::Cpu(_) => Err(Error::DeviceMismatch { op: "lora", lhs: "cuda".into(), rhs: "cpu".into() }),
    }
}

/// `c = [a1 | a2] [b1 | b2]` as one engine GEMM over both K sources.
fn two_sources(g: Gemm, pairs: [(&Tensor, &Tensor); 2], c: &mut Tensor) -> Result<()> {
    let (m, n) = c.shape().dims2("lora", "output")?;
    let k_of = |a: &Tensor| a.dims()[1];
    let sources = [
        KSource { a: on_device(pairs[0].0)?, b: on_device(pairs[0].1)?, k: k_of(pairs[0].0) },
        KSource { a: on_device(pairs[1].0)?, b: on_device(pairs[1].1)?, k: k_of(pairs[1].0) },
    ];
    let Storage::Cuda(out) = c.storage_mut() else {
        return Err(Error::DeviceMismatch { op: "lora", lhs: "cuda".into(), rhs: "cpu".into() });
    };
    gemm_sm90::gemm(&g, &sources, m, n, out)
}
