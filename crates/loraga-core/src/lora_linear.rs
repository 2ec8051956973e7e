//! The LoRA linear layer's three products, by four interchangeable paths.
//!
//! PyTorch layouts: X [M, K], frozen W [N, K], A [r, K], B [N, r], scale s (alpha / r or
//! alpha / sqrt(r)). With U' = s X Aᵀ [M, r] and V' = s dY B [M, r]:
//!
//!   forward   Y  = X Wᵀ + U' Bᵀ              = [X | U'] [W | B]ᵀ
//!   backward  dX = dY W + V' A               = [dY | V'] [W ; A]
//!             dA = s (dY B)ᵀ X               = V'ᵀ X
//!             dB = s dYᵀ U                   = dYᵀ U'
//!
//! Paths ([`LoraPath`]):
//! - `Fused` runs each `[.. | ..]` product as one GEMM-engine call over two K sources, after one
//!   skinny product for U' (or V'). The backward's V' and dB, which both stream dY, run as one
//!   pass over dY (`cuda::lora_dy`, Hopper: bf16, r ≤ 32 and a multiple of 8, N a multiple of 8;
//!   1.3-1.5x faster than cuBLAS's two GEMMs, PERF.md). The other skinny products (U', dA, and
//!   V', dB elsewhere: one side r) run on cuBLAS, whose narrow-tile kernels stream X or dY once
//!   near memory bandwidth; the engine's 128 x 256 tiles measured 2-3x slower for them on the
//!   H200 (see `ENGINE_MIN_SIDE`; benches/lora_linear.rs times U' both ways). Every product
//!   the engine cannot take (f32 operands, a rank r that is not a multiple of 8, a device without
//!   wgmma) runs the folded composition below on cuBLAS instead, so any r in 1..=min(K, N) and
//!   any M, K, N work; the two-source GEMMs need bf16, sm_90a and r, K, N multiples of 8.
//! - `Cublas` is the composition PEFT runs in eager PyTorch (`result = base(x); result = result +
//!   lora_B(lora_A(x)) * scaling`, backward as autograd runs it): base GEMM, A GEMM, B GEMM into a
//!   fresh [M, N], `* s` and `+` as two elementwise kernels; backward `dY * s`, two GEMMs per
//!   adapter linear, the base's dX GEMM and the add of the two dX. Its temporaries come from the
//!   stream-ordered pool, as PyTorch's come from its caching allocator.
//! - `CublasFolded` is the stronger composition unsloth's LoRA code uses (its addmm): the
//!   adapter's add folded into beta = 1 GEMMs (3 GEMMs forward, 5 backward, no elementwise
//!   kernel).
//! - `Naive` is the folded composition on the naive kernel.
//!
//! On the CPU every path is the folded composition on faer. Activations (Y, U', dX) are stored in
//! the input dtype; the adapter gradients dA, dB in f32. Tensors are dense row-major by
//! construction (loraga's `Tensor` has no strides), so there is no non-contiguous case to refuse;
//! shapes, dtypes and devices are checked up front and errors name the tensor.

use crate::cuda::GemmPath;
use crate::cuda::gemm_sm90::{self, KSource};
use crate::cuda::lora_dy;
use crate::cuda::ops::elementwise;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gemm::{Gemm, gemm, gemm_cuda};
use crate::storage::Storage;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    Naive,
    /// PEFT's eager sequence on cuBLAS (see the module docs).
    Cublas,
    /// The composition with the adapter folded into beta = 1 cuBLAS GEMMs.
    CublasFolded,
    Fused,
}

impl LoraPath {
    pub const ALL: [LoraPath; 4] = [LoraPath::Naive, LoraPath::Cublas, LoraPath::CublasFolded, LoraPath::Fused];

    pub fn name(self) -> &'static str {
        match self {
            LoraPath::Naive => "naive",
            LoraPath::Cublas => "cublas-peft",
            LoraPath::CublasFolded => "cublas-folded",
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
    /// [M, r] in the input dtype: U' = s X Aᵀ, except on the `Cublas` (PEFT) path on a GPU, which
    /// keeps PEFT's unscaled X Aᵀ. Hand it to the backward of the same path.
    pub u: Tensor,
}

pub struct Grads {
    pub dx: Tensor,
    /// [r, K], f32.
    pub da: Tensor,
    /// [N, r], f32.
    pub db: Tensor,
}

/// (M, K, N, r) after checking every shape, dtype and device against each other.
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
        same_device("X", x, what, t)?;
    }
    Ok((m, k, n, r))
}

fn same_device(what_ref: &str, reference: &Tensor, what: &str, t: &Tensor) -> Result<()> {
    let (d0, d1) = (reference.device(), t.device());
    if d0 != d1 {
        return Err(Error::DeviceMismatch {
            op: "lora",
            lhs: format!("{what_ref} on {d0}"),
            rhs: format!("{what} on {d1}"),
        });
    }
    Ok(())
}

/// An error naming `what` unless `t` is `dims` of `dtype` on X's device.
fn expect<const N: usize>(what: &str, t: &Tensor, dims: [usize; N], dtype: DType, x: &Tensor) -> Result<()> {
    if t.dims() != dims || t.dtype() != dtype {
        return Err(Error::shape("lora", format!("{what} is {} {}, expected {dims:?} {dtype}", t.shape(), t.dtype())));
    }
    same_device("X", x, what, t)
}

/// Which GEMM runs one product of a composition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Cpu,
    Naive,
    Cublas,
    /// The Hopper engine where it takes the problem, else cuBLAS.
    Best,
}

impl Via {
    fn of(path: LoraPath, x: &Tensor) -> Via {
        match (x.device().is_cuda(), path) {
            (false, _) => Via::Cpu,
            (true, LoraPath::Naive) => Via::Naive,
            (true, LoraPath::Cublas | LoraPath::CublasFolded) => Via::Cublas,
            (true, LoraPath::Fused) => Via::Best,
        }
    }
}

/// The narrowest output the fused path gives the engine: its N tile. The skinny products (U', V'
/// [M, r], dA [r, K], dB [N, r]) leave most of the engine's 128 x 256 tiles empty and run on at
/// most M / 128 CTAs; cuBLAS has narrow-tile and split-K kernels for them. On the H200 (ncu,
/// M = 8192, K = N = 4096, r = 16, 2026-11-29) the engine took 59 / 53 / 23 / 45 us for U' / V' /
/// dA / dB, cuBLAS 19 / 22 / 24 / 24 us (the skinny ones at ~3.4 TB/s); U' at r = 128 took 54 us
/// on the engine and 30 us on cuBLAS (benches/lora_linear.rs grid).
const ENGINE_MIN_SIDE: usize = 256;

fn product(via: Via, g: Gemm, a: &Tensor, b: &Tensor, c: &mut Tensor) -> Result<()> {
    match via {
        Via::Cpu => gemm(&g, a, b, c),
        Via::Naive => gemm_cuda(GemmPath::Naive, &g, a, b, c),
        Via::Cublas => gemm_cuda(GemmPath::Cublas, &g, a, b, c),
        Via::Best => {
            let d = g.dims(a.dims(), b.dims(), c.dims())?;
            let source = [KSource { a: cuda(a, "A")?, b: cuda(b, "B")?, k: d.k }];
            let fits = d.m.min(d.n) >= ENGINE_MIN_SIDE && engine_takes(&g, &source, d.m, d.n, cuda(c, "C")?);
            gemm_cuda(if fits { GemmPath::Engine } else { GemmPath::Cublas }, &g, a, b, c)
        }
    }
}

const NT: Gemm = Gemm { trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0, deterministic: false };
const NN: Gemm = Gemm { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0, deterministic: false };
const TN: Gemm = Gemm { trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0, deterministic: false };

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
    expect("Y", &out.y, [m, n], x.dtype(), x)?;
    expect("U", &out.u, [m, r], x.dtype(), x)?;
    let via = Via::of(path, x);
    if via == Via::Cublas && path == LoraPath::Cublas {
        return peft_forward(l, x, out);
    }
    product(via, Gemm { alpha: l.scale, ..NT }, x, l.a, &mut out.u)?;
    if via == Via::Best && two_sources(NT, [(x, l.w), (&out.u, l.b)], &mut out.y)? {
        return Ok(());
    }
    product(via, NT, x, l.w, &mut out.y)?;
    product(via, Gemm { beta: 1.0, ..NT }, &out.u, l.b, &mut out.y)
}

/// The backward from dY [M, N]; `u` is [`Forward::u`] of the same path.
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
    expect("dY", dy, [m, n], x.dtype(), x)?;
    expect("U", u, [m, r], x.dtype(), x)?;
    expect("V scratch", v, [m, r], x.dtype(), x)?;
    expect("dX", &grads.dx, [m, k], x.dtype(), x)?;
    expect("dA", &grads.da, [r, k], DType::F32, x)?;
    expect("dB", &grads.db, [n, r], DType::F32, x)?;
    let via = Via::of(path, x);
    if via == Via::Cublas && path == LoraPath::Cublas {
        return peft_backward(l, x, u, dy, v, grads);
    }
    let dy_once = via == Via::Best && dy_products(l, dy, u, v, &mut grads.db)?;
    if !dy_once {
        product(via, Gemm { alpha: l.scale, ..NN }, dy, l.b, v)?;
    }
    if !(via == Via::Best && two_sources(NN, [(dy, l.w), (v, l.a)], &mut grads.dx)?) {
        product(via, NN, dy, l.w, &mut grads.dx)?;
        product(via, Gemm { beta: 1.0, ..NN }, v, l.a, &mut grads.dx)?;
    }
    product(via, TN, v, x, &mut grads.da)?;
    if !dy_once {
        product(via, TN, dy, u, &mut grads.db)?;
    }
    Ok(())
}

/// V' = s dY B into `v` and dB = dYᵀ U' into `db` in one pass over dY (`cuda::lora_dy`), if that
/// kernel takes the operands; false (nothing launched) if not.
fn dy_products(l: &Lora, dy: &Tensor, u: &Tensor, v: &mut Tensor, db: &mut Tensor) -> Result<bool> {
    let (m, n, r) = (dy.dims()[0], dy.dims()[1], u.dims()[1]);
    let dy_s = cuda(dy, "dY")?;
    if !lora_dy::takes(&dy_s.device, dy.dtype(), m, n, r) {
        return Ok(false);
    }
    lora_dy::run(
        dy_s,
        cuda(l.b, "B")?,
        cuda(u, "U")?,
        (m, n, r),
        l.scale,
        cuda_mut(v, "V scratch")?,
        cuda_mut(db, "dB")?,
    )?;
    Ok(true)
}

/// PEFT's forward as eager PyTorch runs it: `result = base(x)`, `T = lora_A(x)` (kept as U),
/// `Z = lora_B(T)`, `result = result + Z * s`.
fn peft_forward(l: &Lora, x: &Tensor, out: &mut Forward) -> Result<()> {
    let cublas = |g: Gemm, a: &Tensor, b: &Tensor, c: &mut Tensor| gemm_cuda(GemmPath::Cublas, &g, a, b, c);
    let (m, n) = (x.dims()[0], l.w.dims()[0]);
    cublas(NT, x, l.w, &mut out.y)?;
    cublas(NT, x, l.a, &mut out.u)?;
    let mut z = fresh(x, [m, n], x.dtype())?;
    cublas(NT, &out.u, l.b, &mut z)?;
    let z = elementwise::scale(cuda(&z, "Z")?, l.scale)?;
    elementwise::add_assign(cuda_mut(&mut out.y, "Y")?, &z, "Z * s")
}

/// PEFT's backward as autograd runs it: `dZ = dY * s`; lora_B's linear backward (`dT = dZ B`,
/// `dB = dZᵀ T`); lora_A's (`dX_lora = dT A`, `dA = dTᵀ X`); the base's `dX = dY W`; then the
/// two dX contributions summed. `dT` (= V') lands in `v`.
fn peft_backward(l: &Lora, x: &Tensor, t: &Tensor, dy: &Tensor, v: &mut Tensor, grads: &mut Grads) -> Result<()> {
    let cublas = |g: Gemm, a: &Tensor, b: &Tensor, c: &mut Tensor| gemm_cuda(GemmPath::Cublas, &g, a, b, c);
    let (m, k, n) = (x.dims()[0], x.dims()[1], l.w.dims()[0]);
    let dz = elementwise::scale(cuda(dy, "dY")?, l.scale)?;
    let dz = Tensor::from_storage(Storage::Cuda(dz), [m, n])?;
    cublas(NN, &dz, l.b, v)?;
    cublas(TN, &dz, t, &mut grads.db)?;
    let mut dx_lora = fresh(x, [m, k], x.dtype())?;
    cublas(NN, v, l.a, &mut dx_lora)?;
    cublas(TN, v, x, &mut grads.da)?;
    cublas(NN, dy, l.w, &mut grads.dx)?;
    elementwise::add_assign(cuda_mut(&mut grads.dx, "dX")?, cuda(&dx_lora, "dX_lora")?, "dX_lora")
}

/// An unset device tensor from the stream-ordered pool (every element is written before it is
/// read).
fn fresh<const N: usize>(like: &Tensor, dims: [usize; N], dtype: DType) -> Result<Tensor> {
    let dev = &cuda(like, "X")?.device;
    let n = dims.iter().product();
    Tensor::from_storage(Storage::Cuda(crate::cuda::ops::output(dev, dtype, n)?), dims)
}

/// `g += alpha * dYᵀ X` into an f32 gradient [N, K] in place: LoRA-GA's estimation step.
/// `Fused` runs the engine's in-place fp32 epilogue (cuBLAS where the engine cannot take the
/// problem); `Cublas` and `CublasFolded` run cuBLAS GemmEx with beta = 1.
pub fn accumulate_weight_grad(path: LoraPath, g: &mut Tensor, dy: &Tensor, x: &Tensor, alpha: f32) -> Result<()> {
    const OP: &str = "accumulate_weight_grad";
    if g.dtype() != DType::F32 {
        return Err(Error::DType { op: OP, msg: format!("the gradient buffer G must be f32, got {}", g.dtype()) });
    }
    if dy.dtype() != x.dtype() {
        return Err(Error::DType { op: OP, msg: format!("dY is {} but X is {}", dy.dtype(), x.dtype()) });
    }
    let (m, k) = x.shape().dims2(OP, "X")?;
    let (my, n) = dy.shape().dims2(OP, "dY")?;
    let (gn, gk) = g.shape().dims2(OP, "G")?;
    if my != m || (gn, gk) != (n, k) {
        return Err(Error::shape(
            OP,
            format!("dY is [{my}, {n}] and X [{m}, {k}], so G must be [{n}, {k}], got [{gn}, {gk}]"),
        ));
    }
    same_device("X", x, "dY", dy)?;
    same_device("X", x, "G", g)?;
    product(Via::of(path, x), Gemm { alpha, beta: 1.0, ..TN }, dy, x, g)
}

fn cuda<'t>(t: &'t Tensor, what: &str) -> Result<&'t crate::cuda::CudaStorage> {
    t.cuda_storage("lora", what)
}

fn cuda_mut<'t>(t: &'t mut Tensor, what: &str) -> Result<&'t mut crate::cuda::CudaStorage> {
    t.cuda_storage_mut("lora", what)
}

/// Whether the Hopper engine runs this product. Only bf16 operands: the engine runs f32 ones as
/// TF32 (~1e-3 relative), and the f32 LoRA layer is held to full f32 accuracy (cuBLAS fp32).
fn engine_takes(g: &Gemm, sources: &[KSource], m: usize, n: usize, c: &crate::cuda::CudaStorage) -> bool {
    sources[0].a.dtype() == DType::BF16 && gemm_sm90::unsupported(g, sources, m, n, c).is_none()
}

/// Whether [`LoraPath::Fused`] runs this layer's forward as one engine GEMM over two K sources,
/// `[X | U'] [W | B]ᵀ`, on these operands (rather than the cuBLAS products it falls back to).
/// A diagnostic: it allocates U' and Y to ask the engine.
pub fn fuses(l: &Lora, x: &Tensor) -> Result<bool> {
    if !x.device().is_cuda() {
        return Ok(false);
    }
    let (m, k, n, r) = dims(l, x)?;
    let (u, y) = (Tensor::zeros([m, r], x.dtype(), &x.device())?, Tensor::zeros([m, n], x.dtype(), &x.device())?);
    let sources =
        [KSource { a: cuda(x, "X")?, b: cuda(l.w, "W")?, k }, KSource { a: cuda(&u, "U")?, b: cuda(l.b, "B")?, k: r }];
    Ok(engine_takes(&NT, &sources, m, n, cuda(&y, "Y")?))
}

/// `c = [a1 | a2] [b1 | b2]` as one engine GEMM over both K sources, if the engine takes the
/// problem; false (nothing launched) if it does not.
fn two_sources(g: Gemm, pairs: [(&Tensor, &Tensor); 2], c: &mut Tensor) -> Result<bool> {
    let (m, n) = c.shape().dims2("lora", "output")?;
    let k_of = |a: &Tensor| a.dims()[1];
    let sources = [
        KSource { a: cuda(pairs[0].0, "X")?, b: cuda(pairs[0].1, "W")?, k: k_of(pairs[0].0) },
        KSource { a: cuda(pairs[1].0, "U")?, b: cuda(pairs[1].1, "adapter")?, k: k_of(pairs[1].0) },
    ];
    let out = cuda_mut(c, "output")?;
    if !engine_takes(&g, &sources, m, n, out) {
        return Ok(false);
    }
    gemm_sm90::gemm(&g, &sources, m, n, out)?;
    Ok(true)
}
