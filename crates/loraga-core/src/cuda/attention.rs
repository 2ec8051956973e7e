//! Grouped-query causal attention on the device, forward and backward, with the semantics of the
//! CPU op in [`crate::autograd::attention`]:
//!
//!   S = Q Kᵀ / sqrt(d),  P = softmax(S + mask),  O = P V
//!   dP = dO Vᵀ,  dV = Pᵀ dO,  dS = P ∘ (dP − rowsum(dP ∘ P)),  dQ = dS K / sqrt(d),  dK = dSᵀ Q / sqrt(d)
//!
//! Choice: cuBLAS strided-batched GEMMs for the six products and the fused masked-softmax
//! kernels of `kernels/attention.cu` (option (a) of issue 6), not a flash-style kernel.
//!
//! Layout. q [batch·seq, H·d] and k, v [batch·seq, KV·d] are token-major; `attn_swap` copies them
//! to head-major [batch, H, seq, d] and [batch, KV, seq, d] (and the results back). In head-major
//! order the G = H / KV query heads that share one key/value head are adjacent, so for each
//! (b, g), b < batch, g < KV, the query block Q_bg = [G·seq, d] is one contiguous row-major
//! matrix, and so are S_bg, P_bg = [G·seq, seq] in the [batch, H, seq, seq] score buffers. Every
//! product is then ONE strided-batched call over the batch·KV pairs (b, g), and K, V are never
//! repeated:
//!
//! | product             | row-major per (b, g)                  | m     | n   | k     |
//! |---------------------|---------------------------------------|-------|-----|-------|
//! | S = s·Q Kᵀ          | [G·seq, d] x [seq, d]ᵀ                | G·seq | seq | d     |
//! | O = P V             | [G·seq, seq] x [seq, d]               | G·seq | d   | seq   |
//! | dP = dO Vᵀ          | [G·seq, d] x [seq, d]ᵀ                | G·seq | seq | d     |
//! | dV = Pᵀ dO          | [G·seq, seq]ᵀ x [G·seq, d]            | seq   | d   | G·seq |
//! | dQ = s·dS K         | [G·seq, seq] x [seq, d]               | G·seq | d   | seq   |
//! | dK = s·dSᵀ Q        | [G·seq, seq]ᵀ x [G·seq, d]            | seq   | d   | G·seq |
//!
//! with s = 1/sqrt(d) as the GEMM's alpha; dV and dK sum over the G heads of a group because the
//! inner dimension G·seq runs over them. Batch strides (elements): Q, O, dO, dQ G·seq·d; K, V,
//! dK, dV seq·d; S, P, dP, dS G·seq·seq. Leading dimensions: d for the [·, d] matrices, seq for
//! the score matrices.
//!
//! cuBLAS is column-major. A row-major matrix X [r, c] with `ld` elements between rows is, to
//! cuBLAS, the column-major Xᵀ [c, r] with the same `ld`. So row-major C = op(A) op(B) is
//! column-major Cᵀ = op(B)ᵀ op(A)ᵀ: `batched_gemm` passes B first with B's transpose flag, A
//! second with A's, and the dimensions as (n, m, k). Each leading dimension is then the stored
//! row length, which is at least the column-major row count cuBLAS requires (checked in the
//! table above: for an untransposed B [k, n], ldb = n; for a transposed one stored [n, k],
//! ldb = k; likewise for A).
//!
//! Precision. S and dP are f32 (for bf16 activations the GEMMs take bf16 operands and write f32,
//! CUBLAS_COMPUTE_32F); P and dS have the activations' dtype because they are GEMM operands
//! beside V, K and Q (as in PyTorch's eager bf16 attention); O, dQ, dK, dV have it too. For f32
//! activations everything is f32 with CUBLAS_COMPUTE_32F (full fp32, no TF32).
//!
//! Memory. The tape keeps nothing but q, k, v (and the key mask): the backward recomputes
//! S = Q Kᵀ and the softmax (one more GEMM of the seven, and bit-identical P). Each call holds,
//! transiently, S (f32) and P (activation dtype), i.e. batch·H·seq² · (4 + 2) bytes in bf16 and
//! · 8 in f32 (the backward reuses S's buffer for dP and writes dS over P), plus head-major copies
//! of q, k, v, dO and the results (O(batch·seq·H·d)). SmolLM2-135M at batch 8 × 1024 tokens:
//! 9 heads → 75.5 M scores → 302 MB (S) + 151 MB (P) per call, freed when it returns; a
//! Llama-1B shape (32 heads) → 1.07 GB + 0.54 GB.
//!
//! Time (estimated, not measured yet). Seven GEMMs of 2·batch·H·seq²·d FLOPs each (two forward,
//! five backward; half of the work is above the causal diagonal and discarded), and about 12
//! bytes of memory traffic per score element forward (S written and read, P written and read)
//! and 28 backward. At SmolLM2's shape that is 0.9 GB per layer forward and 2.1 GB backward,
//! ~0.3 + 0.7 ms at H200 bandwidth, i.e. ~30 ms per training step over 30 layers, while the
//! GEMMs' arithmetic is ~0.2 ms per layer: the seq² traffic dominates (d = 64 is a thin inner
//! dimension). A fused flash-style kernel would remove that traffic and the seq² memory; this path
//! is the baseline such a kernel would be checked against.
//!
//! The key mask ([`KeyMask`], batch·seq bytes) is uploaded once per forward and shared by every
//! layer (`crate::autograd::attention::PaddingMask`): the upload comes from pageable host memory,
//! which the driver may stage by waiting for the stream, so once per layer would cost a stall per
//! layer. All other scratch is allocated uninitialised, and every element is written before it
//! is read.

use cudarc::cublas::result as blas_result;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::storage::CudaStorage;
use super::typed::{DeviceElem, ptr, ptr_mut};
use crate::autograd::AttentionShape;
use crate::dtype::DType;
use crate::error::{Error, Result};

const OP: &str = "attention";
/// Threads per block of every kernel in `kernels/attention.cu` (its `THREADS`).
const THREADS: u32 = 256;

/// Which tokens may be attended to: 1 for a real token, 0 for padding, one byte per token of the
/// [batch · seq] rows, on the device.
pub struct KeyMask {
    bytes: CudaSlice<u8>,
    tokens: usize,
    device: CudaDevice,
}

impl KeyMask {
    /// Uploads `mask` (false = padding), or all ones when there is none.
    pub fn upload(dev: &CudaDevice, tokens: usize, mask: Option<&[bool]>) -> Result<KeyMask> {
        if let Some(m) = mask
            && m.len() != tokens
        {
            return Err(Error::shape(OP, format!("the padding mask has {} entries for {tokens} tokens", m.len())));
        }
        // At least one byte: the driver refuses empty allocations.
        let host: Vec<u8> = match mask {
            Some(m) if tokens > 0 => m.iter().map(|&b| b as u8).collect(),
            _ => vec![1; tokens.max(1)],
        };
        let bytes = dev.stream().clone_htod(&host).map_err(Error::cuda("cuMemcpyHtoD"))?;
        Ok(KeyMask { bytes, tokens, device: dev.clone() })
    }
}

/// The gradients [`backward`] writes; `None` for an input that needs none.
pub struct AttentionGrads<'a> {
    pub dq: Option<&'a mut CudaStorage>,
    pub dk: Option<&'a mut CudaStorage>,
    pub dv: Option<&'a mut CudaStorage>,
}

/// O = attention(q, k, v) into `out` [batch·seq, H·d] (q's dtype). All tensors on one device,
/// of one dtype (f32 or bf16), with the lengths `s` implies.
pub fn forward(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    s: AttentionShape,
    mask: &KeyMask,
    out: &mut CudaStorage,
) -> Result<()> {
    let d = Dims::new(s)?;
    let (ql, kl) = (d.q_len(), d.kv_len());
    check(mask, d, &[("q", q, ql), ("k", k, kl), ("v", v, kl), ("the output", out, ql)])?;
    let run = Run { dev: &q.device, d, mask: &mask.bytes };
    if d.no_work() {
        return zero(&q.device, out);
    }
    match q.dtype() {
        DType::F32 => run.forward::<f32>(q, k, v, out),
        DType::BF16 => run.forward::<half::bf16>(q, k, v, out),
    }
}

/// The gradients of attention(q, k, v) for the upstream gradient `dout` (q's shape and dtype).
/// Each gradient has its input's shape and dtype.
pub fn backward(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    dout: &CudaStorage,
    s: AttentionShape,
    mask: &KeyMask,
    grads: AttentionGrads<'_>,
) -> Result<()> {
    let d = Dims::new(s)?;
    let (ql, kl) = (d.q_len(), d.kv_len());
    let mut args = vec![("q", q, ql), ("k", k, kl), ("v", v, kl), ("the output gradient", dout, ql)];
    for (what, g, len) in [("dq", &grads.dq, ql), ("dk", &grads.dk, kl), ("dv", &grads.dv, kl)] {
        if let Some(g) = g {
            args.push((what, &**g, len));
        }
    }
    check(mask, d, &args)?;
    let run = Run { dev: &q.device, d, mask: &mask.bytes };
    if d.no_work() {
        for g in [grads.dq, grads.dk, grads.dv].into_iter().flatten() {
            zero(&q.device, g)?;
        }
        return Ok(());
    }
    match q.dtype() {
        DType::F32 => run.backward::<f32>(q, k, v, dout, grads),
        DType::BF16 => run.backward::<half::bf16>(q, k, v, dout, grads),
    }
}

/// One device, one dtype, and the expected element counts.
fn check(mask: &KeyMask, d: Dims, args: &[(&str, &CudaStorage, usize)]) -> Result<()> {
    let (first_name, first, _) = args[0];
    for &(what, t, len) in args {
        if t.device != first.device {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: format!("{first_name} on {:?}", first.device),
                rhs: format!("{what} on {:?}", t.device),
            });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DType {
                op: OP,
                msg: format!("{first_name} is {} but {what} is {}", first.dtype(), t.dtype()),
            });
        }
        if t.len() != len {
            return Err(Error::shape(OP, format!("{what} holds {} elements, the shape needs {len}", t.len())));
        }
    }
    if mask.device != first.device {
        return Err(Error::DeviceMismatch {
            op: OP,
            lhs: format!("{first_name} on {:?}", first.device),
            rhs: format!("the key mask on {:?}", mask.device),
        });
    }
    if mask.tokens != d.batch * d.seq {
        return Err(Error::shape(OP, format!("the key mask covers {} tokens, not {}", mask.tokens, d.batch * d.seq)));
    }
    Ok(())
}

fn zero(dev: &CudaDevice, t: &mut CudaStorage) -> Result<()> {
    if t.is_empty() {
        return Ok(());
    }
    let s = dev.stream();
    match &mut t.slice {
        super::CudaSlices::F32(x) => s.memset_zeros(x),
        super::CudaSlices::BF16(x) => s.memset_zeros(x),
    }
    .map_err(Error::cuda("cuMemsetD8Async"))
}

/// The sizes of one call, checked against the 32-bit limits of cuBLAS and of the grid.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    heads: usize,
    kv: usize,
    group: usize,
    d: usize,
}

impl Dims {
    fn new(s: AttentionShape) -> Result<Dims> {
        if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(Error::shape(
                OP,
                format!("{} query heads do not share {} key/value heads evenly", s.n_heads, s.n_kv_heads),
            ));
        }
        let d = Dims {
            batch: s.batch,
            seq: s.seq,
            heads: s.n_heads,
            kv: s.n_kv_heads,
            group: s.n_heads / s.n_kv_heads,
            d: s.head_dim,
        };
        let mul = |xs: &[usize]| xs.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x));
        let (b, t, h) = (d.batch, d.seq, d.heads);
        let limits = [
            ("query rows per group (G·seq)", mul(&[d.group, t])),
            ("head_dim", Some(d.d)),
            ("batch·n_kv_heads", mul(&[b, d.kv])),
            ("score rows (batch·n_heads·seq)", mul(&[b, h, t])),
        ];
        for (what, v) in limits {
            if v.is_none_or(|v| v > i32::MAX as usize) {
                return Err(Error::shape(
                    OP,
                    format!("{what} exceeds the 32-bit limit of cuBLAS and CUDA grids ({s:?})"),
                ));
            }
        }
        if mul(&[b, h, t, t, 4]).is_none() || mul(&[b, t, h.max(d.kv), d.d, 4]).is_none() {
            return Err(Error::shape(OP, format!("the buffers of {s:?} do not fit in memory")));
        }
        Ok(d)
    }

    fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.d
    }

    fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv * self.d
    }

    fn scores(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    /// Nothing to compute: the outputs are empty or (no query heads) the gradients are zero.
    fn no_work(&self) -> bool {
        self.batch == 0 || self.seq == 0 || self.heads == 0 || self.d == 0
    }
}

/// A row-major matrix per batch entry, as one operand of [`batched_gemm`]: `ld` elements between
/// rows, `stride` between batch entries, used transposed when `trans`.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    dtype: DType,
    ld: usize,
    stride: usize,
    trans: bool,
}

/// One call of the attention algorithm: the device, the sizes, the mask.
struct Run<'a> {
    dev: &'a CudaDevice,
    d: Dims,
    mask: &'a CudaSlice<u8>,
}

impl Run<'_> {
    fn forward<T: DeviceElem>(
        &self,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
        out: &mut CudaStorage,
    ) -> Result<()> {
        let (qh, kh, vh) = self.inputs::<T>(q, k, v)?;
        let (s, p) = self.probabilities(&qh, &kh)?;
        drop(s); // freed in stream order, after the softmax that read it
        let mut oh = self.alloc::<T>(self.d.q_len())?;
        let d = self.d;
        // O = P V
        self.gemm(
            (d.group * d.seq, d.d, d.seq),
            1.0,
            self.scores_op(&p, false),
            self.kv_op(&vh, false),
            self.q_op_mut(&mut oh),
        )?;
        self.to_tokens(&oh, typed_mut::<T>(out)?, d.heads)
    }

    fn backward<T: DeviceElem>(
        &self,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
        dout: &CudaStorage,
        grads: AttentionGrads<'_>,
    ) -> Result<()> {
        let d = self.d;
        let (qh, kh, vh) = self.inputs::<T>(q, k, v)?;
        let (mut s_dp, mut p) = self.probabilities(&qh, &kh)?;
        let doh = self.to_heads(typed::<T>(dout)?, d.heads)?;
        let scale = 1.0 / (d.d as f32).sqrt();
        if let Some(dv) = grads.dv {
            // dV = Pᵀ dO (summed over the group's heads by the inner dimension)
            let mut dvh = self.alloc::<T>(d.kv_len())?;
            self.gemm(
                (d.seq, d.d, d.group * d.seq),
                1.0,
                self.scores_op(&p, true),
                self.q_op(&doh, false),
                self.kv_op_mut(&mut dvh),
            )?;
            self.to_tokens(&dvh, typed_mut::<T>(dv)?, d.kv)?;
        }
        if grads.dq.is_none() && grads.dk.is_none() {
            return Ok(());
        }
        // dP = dO Vᵀ into S's buffer, then dS = P ∘ (dP − rowsum(dP ∘ P)) over P.
        let dp_op = Operand { ptr: ptr_mut(&mut s_dp, self.dev), dtype: DType::F32, ..self.scores_op(&p, false) };
        self.gemm((d.group * d.seq, d.seq, d.d), 1.0, self.q_op(&doh, false), self.kv_op(&vh, true), dp_op)?;
        self.softmax_backward(&mut p, &s_dp)?;
        if let Some(dq) = grads.dq {
            // dQ = s dS K
            let mut dqh = self.alloc::<T>(d.q_len())?;
            self.gemm(
                (d.group * d.seq, d.d, d.seq),
                scale,
                self.scores_op(&p, false),
                self.kv_op(&kh, false),
                self.q_op_mut(&mut dqh),
            )?;
            self.to_tokens(&dqh, typed_mut::<T>(dq)?, d.heads)?;
        }
        if let Some(dk) = grads.dk {
            // dK = s dSᵀ Q (summed over the group's heads by the inner dimension)
            let mut dkh = self.alloc::<T>(d.kv_len())?;
            self.gemm(
                (d.seq, d.d, d.group * d.seq),
                scale,
                self.scores_op(&p, true),
                self.q_op(&qh, false),
                self.kv_op_mut(&mut dkh),
            )?;
            self.to_tokens(&dkh, typed_mut::<T>(dk)?, d.kv)?;
        }
        Ok(())
    }

    /// q, k, v in head-major layout.
    #[allow(clippy::type_complexity)]
    fn inputs<T: DeviceElem>(
        &self,
        q: &CudaStorage,
        k: &CudaStorage,
        v: &CudaStorage,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)> {
        Ok((
            self.to_heads(typed::<T>(q)?, self.d.heads)?,
            self.to_heads(typed::<T>(k)?, self.d.kv)?,
            self.to_heads(typed::<T>(v)?, self.d.kv)?,
        ))
    }

    /// S = Q Kᵀ / sqrt(d) (f32) and P = masked softmax(S) (T): both score buffers.
    fn probabilities<T: DeviceElem>(
        &self,
        qh: &CudaSlice<T>,
        kh: &CudaSlice<T>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<T>)> {
        let d = self.d;
        let mut s = self.alloc::<f32>(d.scores())?;
        let mut p = self.alloc::<T>(d.scores())?;
        let s_op = Operand { ptr: ptr_mut(&mut s, self.dev), dtype: DType::F32, ..self.scores_op(&p, false) };
        let scale = 1.0 / (d.d as f32).sqrt();
        self.gemm((d.group * d.seq, d.seq, d.d), scale, self.q_op(qh, false), self.kv_op(kh, true), s_op)?;
        let f = self.dev.function("attention", &format!("softmax_causal_fwd_{}", T::DTYPE))?;
        let (seq, heads) = (d.seq as i32, d.heads as i32);
        let mut launch = self.dev.stream().launch_builder(&f);
        launch.arg(&s).arg(&mut p).arg(self.mask).arg(&seq).arg(&heads);
        // SAFETY: softmax_causal_fwd_<T>(const float*, T*, const u8*, int, int): S and P hold
        // batch·H·seq·seq elements (one block per row of seq), the mask batch·seq bytes.
        unsafe { launch.launch(self.rows()) }.map_err(Error::cuda("cuLaunchKernel(softmax_causal_fwd)"))?;
        Ok((s, p))
    }

    fn softmax_backward<T: DeviceElem>(&self, p: &mut CudaSlice<T>, dp: &CudaSlice<f32>) -> Result<()> {
        let f = self.dev.function("attention", &format!("softmax_causal_bwd_{}", T::DTYPE))?;
        let seq = self.d.seq as i32;
        let mut launch = self.dev.stream().launch_builder(&f);
        launch.arg(p).arg(dp).arg(&seq);
        // SAFETY: softmax_causal_bwd_<T>(T*, const float*, int): both hold batch·H·seq·seq elements.
        unsafe { launch.launch(self.rows()) }.map_err(Error::cuda("cuLaunchKernel(softmax_causal_bwd)"))?;
        Ok(())
    }

    /// One block per score row.
    fn rows(&self) -> LaunchConfig {
        let rows = self.d.batch * self.d.heads * self.d.seq; // <= i32::MAX (Dims::new)
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// [batch·seq, heads·d] → [batch, heads, seq, d] in a new buffer.
    fn to_heads<T: DeviceElem>(&self, x: &CudaSlice<T>, heads: usize) -> Result<CudaSlice<T>> {
        let mut out = self.alloc::<T>(x.len())?;
        self.swap(x, &mut out, [self.d.batch, self.d.seq, heads, self.d.d])?;
        Ok(out)
    }

    /// [batch, heads, seq, d] → [batch·seq, heads·d] into `out`.
    fn to_tokens<T: DeviceElem>(&self, xh: &CudaSlice<T>, out: &mut CudaSlice<T>, heads: usize) -> Result<()> {
        self.swap(xh, out, [self.d.batch, heads, self.d.seq, self.d.d])
    }

    /// dst [A, Y, X, D] = src [A, X, Y, D] with the middle axes swapped.
    fn swap<T: DeviceElem>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>, dims: [usize; 4]) -> Result<()> {
        let n: usize = dims.iter().product();
        if src.len() != n || dst.len() != n {
            return Err(Error::shape(
                OP,
                format!("attn_swap of {dims:?} got {} and {} elements", src.len(), dst.len()),
            ));
        }
        let f = self.dev.function("attention", &format!("attn_swap_{}", T::DTYPE))?;
        let [a, x, y, e] = dims.map(|v| v as i64);
        let blocks = n.div_ceil(THREADS as usize).clamp(1, self.dev.sm_count().max(1) * 8) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = self.dev.stream().launch_builder(&f);
        launch.arg(src).arg(dst).arg(&a).arg(&x).arg(&y).arg(&e);
        // SAFETY: attn_swap_<T>(const T*, T*, i64 A, i64 X, i64 Y, i64 D) over A·X·Y·D elements,
        // which both buffers hold (checked above); grid-stride loop, any grid size.
        unsafe { launch.launch(cfg) }.map_err(Error::cuda("cuLaunchKernel(attn_swap)"))?;
        Ok(())
    }

    fn alloc<T: DeviceElem>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller writes each element (GEMM with beta = 0, the softmax kernels, the
        // swaps) before anything reads it.
        unsafe { self.dev.stream().alloc::<T>(n.max(1)) }.map_err(Error::cuda("cuMemAlloc"))
    }

    /// A per-(b, g) query-side block [G·seq, d] of a head-major [batch, H, seq, d] buffer.
    fn q_op<T: DeviceElem>(&self, x: &CudaSlice<T>, trans: bool) -> Operand {
        let d = self.d;
        Operand { ptr: ptr(x, self.dev), dtype: T::DTYPE, ld: d.d, stride: d.group * d.seq * d.d, trans }
    }

    fn q_op_mut<T: DeviceElem>(&self, x: &mut CudaSlice<T>) -> Operand {
        Operand { ptr: ptr_mut(x, self.dev), ..self.q_op(x, false) }
    }

    /// A per-(b, g) key/value block [seq, d] of a head-major [batch, KV, seq, d] buffer.
    fn kv_op<T: DeviceElem>(&self, x: &CudaSlice<T>, trans: bool) -> Operand {
        let d = self.d;
        Operand { ptr: ptr(x, self.dev), dtype: T::DTYPE, ld: d.d, stride: d.seq * d.d, trans }
    }

    fn kv_op_mut<T: DeviceElem>(&self, x: &mut CudaSlice<T>) -> Operand {
        Operand { ptr: ptr_mut(x, self.dev), ..self.kv_op(x, false) }
    }

    /// A per-(b, g) score block [G·seq, seq] of a [batch, H, seq, seq] buffer.
    fn scores_op<T: DeviceElem>(&self, x: &CudaSlice<T>, trans: bool) -> Operand {
        let d = self.d;
        Operand { ptr: ptr(x, self.dev), dtype: T::DTYPE, ld: d.seq, stride: d.group * d.seq * d.seq, trans }
    }

    /// C_i [m, n] = alpha op(A_i) op(B_i) for the batch·KV pairs i = (b, g), all row-major.
    fn gemm(&self, (m, n, k): (usize, usize, usize), alpha: f32, a: Operand, b: Operand, c: Operand) -> Result<()> {
        batched_gemm(self.dev, (m, n, k), alpha, a, b, c, self.d.batch * self.d.kv)
    }
}

fn cuda_type(dt: DType) -> cudaDataType {
    match dt {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
    }
}

/// Row-major C_i [m, n] = alpha op(A_i) op(B_i) for i < batch, through cuBLAS's column-major
/// Cᵀ = op(B)ᵀ op(A)ᵀ (see the module docs). beta = 0: C is not read. All dimensions were
/// checked against i32 by [`Dims::new`].
fn batched_gemm(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    b: Operand,
    c: Operand,
    batch: usize,
) -> Result<()> {
    debug_assert!(!c.trans && a.dtype == b.dtype);
    let blas = dev.cublas()?;
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let beta = 0.0f32;
    // SAFETY: a, b, c point to live device buffers holding `batch` matrices at the given strides
    // and leading dimensions (sized by Run from Dims); alpha and beta are host f32s as
    // CUBLAS_COMPUTE_32F requires in the default host pointer mode.
    unsafe {
        blas_result::gemm_strided_batched_ex(
            *blas.handle(),
            op(b.trans),
            op(a.trans),
            n as i32,
            m as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            b.ptr as *const _,
            cuda_type(b.dtype),
            b.ld as i32,
            b.stride as i64,
            a.ptr as *const _,
            cuda_type(a.dtype),
            a.ld as i32,
            a.stride as i64,
            (&beta as *const f32).cast(),
            c.ptr as *mut _,
            cuda_type(c.dtype),
            c.ld as i32,
            c.stride as i64,
            batch as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(Error::cublas("cublasGemmStridedBatchedEx(attention)"))
}

fn typed<T: DeviceElem>(s: &CudaStorage) -> Result<&CudaSlice<T>> {
    let dtype = s.dtype();
    T::slice(&s.slice).ok_or_else(|| Error::DType { op: OP, msg: format!("expected {}, got {dtype}", T::DTYPE) })
}

fn typed_mut<T: DeviceElem>(s: &mut CudaStorage) -> Result<&mut CudaSlice<T>> {
    let dtype = s.dtype();
    T::slice_mut(&mut s.slice)
        .ok_or_else(|| Error::DType { op: OP, msg: format!("expected {}, got {dtype}", T::DTYPE) })
}
