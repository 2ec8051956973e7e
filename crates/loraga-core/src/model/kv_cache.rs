//! The key/value cache of incremental decoding, and attention of new tokens against it (CPU,
//! f32).
//!
//! Slot s holds one sequence: for each layer, the keys (after RoPE) and values of its positions
//! 0..len(s), each [n_kv_heads * head_dim]. A new token of slot s at position p, with query q,
//! attends to that slot's positions 0..=p:
//!
//!   o_h = sum_j softmax_j(q_h . K[s, j, g] / sqrt(head_dim)) V[s, j, g],   g = h / (n_heads / n_kv_heads)
//!
//! This is `autograd::attention` for one sequence without padding: every sequence keeps its own
//! true positions, so no mask is needed. The scores, softmax and weighted sum are computed in the
//! same order and precision as there, so cached and full forwards agree to rounding.
//!
//! A CUDA path would keep these buffers on the device and replace [`KvCache::attend`] by a
//! kernel; the rest of the decoder already goes through device-generic ops.

use rayon::prelude::*;

use crate::cpu::CpuStorage;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// Where a new token goes: its slot (sequence) and position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenAt {
    pub slot: usize,
    pub pos: usize,
}

pub struct KvCache {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    slots: usize,
    capacity: usize,
    /// Per layer, [slots, capacity, n_kv_heads * head_dim].
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    lens: Vec<usize>,
}

impl KvCache {
    /// Room for `slots` sequences of up to `capacity` tokens. Memory:
    /// 2 * layers * slots * capacity * n_kv_heads * head_dim floats (pages are touched only as
    /// positions fill).
    pub fn new(
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        slots: usize,
        capacity: usize,
    ) -> Result<KvCache> {
        if slots == 0 || capacity == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::InvalidArgument(format!(
                "KV cache: {slots} slots of {capacity} positions, {n_heads} heads over {n_kv_heads} KV heads"
            )));
        }
        let n = slots * capacity * n_kv_heads * head_dim;
        Ok(KvCache {
            n_heads,
            n_kv_heads,
            head_dim,
            slots,
            capacity,
            keys: (0..n_layers).map(|_| vec![0.0; n]).collect(),
            values: (0..n_layers).map(|_| vec![0.0; n]).collect(),
            lens: vec![0; slots],
        })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many tokens slot `slot` holds.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Forgets slot `slot`'s tokens (its buffers are overwritten by the next sequence).
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Records that `n` more tokens of `slot` are stored (after every layer has seen them).
    pub(crate) fn advance(&mut self, slot: usize, n: usize) {
        self.lens[slot] += n;
    }

    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Stores the keys and values of new tokens `at` in layer `layer`, then returns their
    /// attention outputs [tokens, n_heads * head_dim]. q is [tokens, n_heads * head_dim], k and v
    /// [tokens, n_kv_heads * head_dim], RoPE already applied; a token sees its slot's positions
    /// up to its own, so several tokens of one slot can come at once (a prompt).
    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, at: &[TokenAt]) -> Result<Vec<f32>> {
        let (hd, kvw) = (self.n_heads * self.head_dim, self.kv_width());
        let (qs, ks, vs) = (host(q, "q")?, host(k, "k")?, host(v, "v")?);
        let t = at.len();
        if qs.len() != t * hd || ks.len() != t * kvw || vs.len() != t * kvw {
            return Err(Error::shape(
                "cached attention",
                format!(
                    "{t} tokens with q {:?}, k {:?}, v {:?} (heads {hd}, KV width {kvw})",
                    q.dims(),
                    k.dims(),
                    v.dims()
                ),
            ));
        }
        if let Some(a) = at.iter().find(|a| a.slot >= self.slots || a.pos >= self.capacity) {
            return Err(Error::InvalidArgument(format!(
                "cached attention: token at slot {} position {} is outside the cache ({} slots of {})",
                a.slot, a.pos, self.slots, self.capacity
            )));
        }
        let (cap, d) = (self.capacity, self.head_dim);
        let (keys, values) = (&mut self.keys[layer], &mut self.values[layer]);
        for (i, a) in at.iter().enumerate() {
            let dst = (a.slot * cap + a.pos) * kvw;
            keys[dst..dst + kvw].copy_from_slice(&ks[i * kvw..(i + 1) * kvw]);
            values[dst..dst + kvw].copy_from_slice(&vs[i * kvw..(i + 1) * kvw]);
        }
        let (keys, values) = (&*keys, &*values);
        let group = self.n_heads / self.n_kv_heads;
        let n_heads = self.n_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0f32; t * hd];
        // One task per (token, head); the scratch row of scores is reused within a worker.
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |p: &mut Vec<f32>, (row, o)| {
            let (a, h) = (at[row / n_heads], row % n_heads);
            let qi = &qs[row * d..(row + 1) * d];
            let base = a.slot * cap * kvw + (h / group) * d;
            let key = |j: usize| &keys[base + j * kvw..base + j * kvw + d];
            let value = |j: usize| &values[base + j * kvw..base + j * kvw + d];
            p.clear();
            p.extend((0..=a.pos).map(|j| dot(qi, key(j)) * scale));
            let max = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0f32;
            for x in p.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            for (j, &pj) in p.iter().enumerate() {
                let pj = pj / sum;
                o.iter_mut().zip(value(j)).for_each(|(o, v)| *o += pj * v);
            }
        });
        Ok(out)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn host<'a>(t: &'a Tensor, what: &str) -> Result<&'a [f32]> {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        Storage::Cpu(other) => Err(Error::DType {
            op: "cached attention",
            msg: format!("{what} is {}, the CPU decoder computes in f32", other.dtype()),
        }),
        Storage::Cuda(_) => Err(Error::NotOnCuda("cached attention")),
    }
}
