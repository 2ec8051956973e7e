//! Grouped-query causal self-attention with a padding mask, written out plainly for the CPU:
//! scores, masked softmax, weighted sum. Query head h reads key/value head h / (n_heads /
//! n_kv_heads), as transformers' `repeat_kv` arranges them.
//!
//!   P = softmax(Q K^T / sqrt(head_dim) + mask),   O = P V
//!
//! Key j is visible to query i of the same sequence when j <= i and key j is not padding. A
//! query that sees no key at all (a padding token on the left) gets a zero output and zero
//! gradients: it never reaches a loss that ignores padding.
//!
//! On the CPU the op takes f32 and is written out plainly below. On CUDA it takes f32 or bf16
//! (output and gradients in the inputs' dtype) and runs [`crate::cuda::attention`]: cuBLAS
//! batched GEMMs and a fused masked-softmax kernel, which keep nothing between the passes but
//! q, k, v and the key mask (the backward recomputes the scores; see that module for the memory
//! and time this costs). The key mask of a forward is prepared once ([`PaddingMask`], uploaded
//! once to the device) and shared by every layer's attention.

use super::data::zeros_like;
use super::data::{dims2, f32s, tensor};
use std::sync::Arc;

use super::tape::{BackwardFn, Tape, Var};
use crate::cuda::attention::{self as cuda_attention, AttentionGrads, KeyMask};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "attention";

/// The shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn check(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&[bool]>) -> Result<()> {
        let s = self;
        let rows = s.batch * s.seq;
        let bad = |msg: String| Err(Error::shape("attention", msg));
        if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return bad(format!("{} query heads do not share {} key/value heads evenly", s.n_heads, s.n_kv_heads));
        }
        if dims2(q, "attention", "q")? != (rows, s.n_heads * s.head_dim) {
            return bad(format!("q is {:?}, expected [{rows}, {}]", q.dims(), s.n_heads * s.head_dim));
        }
        for (what, t) in [("k", k), ("v", v)] {
            if dims2(t, "attention", what)? != (rows, s.n_kv_heads * s.head_dim) {
                return bad(format!("{what} is {:?}, expected [{rows}, {}]", t.dims(), s.n_kv_heads * s.head_dim));
            }
        }
        if let Some(m) = mask
            && m.len() != rows
        {
            return bad(format!("the padding mask has {} entries for {rows} tokens", m.len()));
        }
        Ok(())
    }
}

/// The padding mask of one forward (`key_mask[token]` false for padding, None for no padding),
/// on the host and, for a CUDA forward, on its device: built once per forward, so that every
/// layer's attention (and its backward) reads one upload.
pub struct PaddingMask {
    host: Option<Vec<bool>>,
    device: Option<Arc<KeyMask>>,
}

impl PaddingMask {
    /// The mask of `tokens` tokens for ops whose tensors live on `device`.
    pub fn new(key_mask: Option<&[bool]>, tokens: usize, device: &Device) -> Result<PaddingMask> {
        if let Some(m) = key_mask
            && m.len() != tokens
        {
            return Err(Error::shape(OP, format!("the padding mask has {} entries for {tokens} tokens", m.len())));
        }
        let device = match device {
            Device::Cpu => None,
            Device::Cuda(d) => Some(Arc::new(KeyMask::upload(d, tokens, key_mask)?)),
        };
        Ok(PaddingMask { host: key_mask.map(<[bool]>::to_vec), device })
    }

    pub fn as_slice(&self) -> Option<&[bool]> {
        self.host.as_deref()
    }
}

/// Row offset of token (b, i), and column offset of head h, in a [batch * seq, heads * d] matrix.
struct Index {
    s: AttentionShape,
}

impl Index {
    fn q(&self, b: usize, i: usize, h: usize) -> usize {
        (b * self.s.seq + i) * self.s.n_heads * self.s.head_dim + h * self.s.head_dim
    }
    fn kv(&self, b: usize, j: usize, h: usize) -> usize {
        let g = h / (self.s.n_heads / self.s.n_kv_heads);
        (b * self.s.seq + j) * self.s.n_kv_heads * self.s.head_dim + g * self.s.head_dim
    }
    /// Row i of the probabilities of (b, h), [seq] long.
    fn p(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.s.n_heads + h) * self.s.seq + i) * self.s.seq
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Tape {
    /// Attention over q [batch*seq, n_heads*head_dim] and k, v [batch*seq, n_kv_heads*head_dim].
    /// `key_mask[token]` is false for padding (None: no padding). Output as q.
    pub fn attention(&mut self, q: Var, k: Var, v: Var, s: AttentionShape, key_mask: Option<&[bool]>) -> Result<Var> {
        let (qv, kv, vv) = (self.value(q), self.value(k), self.value(v));
        s.check(qv, kv, vv, key_mask)?;
        let mask = PaddingMask::new(key_mask, s.batch * s.seq, &qv.device())?;
        self.attention_masked(q, k, v, s, &mask)
    }

    /// The same with the mask prepared once for the whole forward ([`PaddingMask`]).
    pub fn attention_masked(&mut self, q: Var, k: Var, v: Var, s: AttentionShape, mask: &PaddingMask) -> Result<Var> {
        let (qv, kv, vv) = (self.value(q), self.value(k), self.value(v));
        s.check(qv, kv, vv, mask.as_slice())?;
        let (y, back) = match qv.storage() {
            Storage::Cuda(_) => {
                let dev_mask = mask.device.clone().ok_or_else(|| Error::DeviceMismatch {
                    op: OP,
                    lhs: format!("q on {}", qv.device()),
                    rhs: "the padding mask on the CPU".into(),
                })?;
                attention_cuda([qv, kv, vv], s, dev_mask)?
            }
            Storage::Cpu(_) => attention_cpu([qv, kv, vv], s, mask.as_slice())?,
        };
        Ok(self.push_op(OP, y, &[q, k, v], back))
    }
}

fn attention_cuda([qv, kv, vv]: [&Tensor; 3], s: AttentionShape, mask: Arc<KeyMask>) -> Result<(Tensor, BackwardFn)> {
    let (qs, ks, vs) = (qv.cuda_storage(OP, "q")?, kv.cuda_storage(OP, "k")?, vv.cuda_storage(OP, "v")?);
    let mut y = zeros_like(qv)?;
    cuda_attention::forward(qs, ks, vs, s, &mask, y.cuda_storage_mut(OP, "the output")?)?;
    let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
        let grad = |i: usize| needs[i].then(|| zeros_like(inp[i])).transpose();
        let (mut dq, mut dk, mut dv) = (grad(0)?, grad(1)?, grad(2)?);
        let grads = AttentionGrads {
            dq: dq.as_mut().map(|t| t.cuda_storage_mut(OP, "dq")).transpose()?,
            dk: dk.as_mut().map(|t| t.cuda_storage_mut(OP, "dk")).transpose()?,
            dv: dv.as_mut().map(|t| t.cuda_storage_mut(OP, "dv")).transpose()?,
        };
        cuda_attention::backward(
            inp[0].cuda_storage(OP, "q")?,
            inp[1].cuda_storage(OP, "k")?,
            inp[2].cuda_storage(OP, "v")?,
            dy.cuda_storage(OP, "the output gradient")?,
            s,
            &mask,
            grads,
        )?;
        Ok(vec![dq, dk, dv])
    });
    Ok((y, back))
}

fn attention_cpu(
    [qv, kv, vv]: [&Tensor; 3],
    s: AttentionShape,
    key_mask: Option<&[bool]>,
) -> Result<(Tensor, BackwardFn)> {
    let (qs, ks, vs) = (f32s(qv, "attention")?, f32s(kv, "attention")?, f32s(vv, "attention")?);
    let (d, ix) = (s.head_dim, Index { s });
    let scale = 1.0 / (d as f32).sqrt();
    let visible = |b: usize, j: usize| key_mask.is_none_or(|m| m[b * s.seq + j]);
    let mut probs = vec![0.0f32; s.batch * s.n_heads * s.seq * s.seq];
    let mut out = vec![0.0f32; qs.len()];
    for b in 0..s.batch {
        for h in 0..s.n_heads {
            for i in 0..s.seq {
                let qi = &qs[ix.q(b, i, h)..ix.q(b, i, h) + d];
                let p = &mut probs[ix.p(b, h, i)..ix.p(b, h, i) + s.seq];
                let mut max = f32::NEG_INFINITY;
                for j in (0..=i).filter(|&j| visible(b, j)) {
                    p[j] = dot(qi, &ks[ix.kv(b, j, h)..ix.kv(b, j, h) + d]) * scale;
                    max = max.max(p[j]);
                }
                if max == f32::NEG_INFINITY {
                    continue; // no visible key: zero output
                }
                let mut sum = 0.0f32;
                for j in (0..=i).filter(|&j| visible(b, j)) {
                    p[j] = (p[j] - max).exp();
                    sum += p[j];
                }
                let o = &mut out[ix.q(b, i, h)..ix.q(b, i, h) + d];
                for j in (0..=i).filter(|&j| visible(b, j)) {
                    p[j] /= sum;
                    let vj = &vs[ix.kv(b, j, h)..ix.kv(b, j, h) + d];
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o += p[j] * v);
                }
            }
        }
    }
    let y = tensor(out, qv.dims())?;
    let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
        let (g, qs, ks, vs) = (
            f32s(dy, "attention")?,
            f32s(inp[0], "attention")?,
            f32s(inp[1], "attention")?,
            f32s(inp[2], "attention")?,
        );
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; qs.len()], vec![0.0f32; ks.len()], vec![0.0f32; vs.len()]);
        let mut dp = vec![0.0f32; s.seq];
        for b in 0..s.batch {
            for h in 0..s.n_heads {
                for i in 0..s.seq {
                    let p = &probs[ix.p(b, h, i)..ix.p(b, h, i) + s.seq];
                    let gi = &g[ix.q(b, i, h)..ix.q(b, i, h) + d];
                    // dP_ij = dO_i . v_j; dS_ij = P_ij (dP_ij - sum_l P_il dP_il).
                    let mut rowdot = 0.0f32;
                    for j in 0..=i {
                        dp[j] = if p[j] == 0.0 { 0.0 } else { dot(gi, &vs[ix.kv(b, j, h)..ix.kv(b, j, h) + d]) };
                        rowdot += p[j] * dp[j];
                    }
                    let qi = ix.q(b, i, h);
                    for j in (0..=i).filter(|&j| p[j] != 0.0) {
                        let kj = ix.kv(b, j, h);
                        let ds = p[j] * (dp[j] - rowdot) * scale;
                        for t in 0..d {
                            dv[kj + t] += p[j] * gi[t];
                            dq[qi + t] += ds * ks[kj + t];
                            dk[kj + t] += ds * qs[qi + t];
                        }
                    }
                }
            }
        }
        let wrap = |need: bool, v: Vec<f32>, t: &Tensor| need.then(|| tensor(v, t.dims())).transpose();
        Ok(vec![wrap(needs[0], dq, inp[0])?, wrap(needs[1], dk, inp[1])?, wrap(needs[2], dv, inp[2])?])
    });
    Ok((y, back))
}
