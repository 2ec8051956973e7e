//! The key/value cache of incremental decoding, and attention of new tokens against it.
//!
//! Slot s holds one sequence: for each layer, the keys (after RoPE) and values of its positions
//! 0..len(s), each [n_kv_heads * head_dim]. A new token of slot s at position p, with query q,
//! attends to that slot's positions 0..=p:
//!
//!   o_h = sum_j softmax_j(q_h . K[s, j, g] / sqrt(head_dim)) V[s, j, g],   g = h / (n_heads / n_kv_heads)
//!
//! This is `autograd::attention` for one sequence without padding: every sequence keeps its own
//! true positions, so no mask is needed.
//!
//! Where the cache lives follows the model's parameters:
//! - CPU: host memory, f32, attention written out below in the same order and precision as
//!   `autograd::attention`, so cached and full forwards agree to rounding.
//! - CUDA: device memory in the activations' dtype; the new keys and values are stored and the
//!   attention runs by the kernels of `kernels/decode.cu` ([`crate::cuda::decode`]), so q, k, v
//!   and the output never leave the device. The new tokens' cache rows are uploaded once per
//!   decoding step ([`KvCache::step`]) and serve every layer.

use rayon::prelude::*;

use cudarc::driver::CudaSlice;

use crate::cuda::CudaStorage;
use crate::cuda::decode::{self, DecodeShape};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

/// Where a new token goes: its slot (sequence) and position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenAt {
    pub slot: usize,
    pub pos: usize,
}

/// Per layer, the keys and values [slots * capacity, n_kv_heads * head_dim] (row
/// slot * capacity + position).
enum Store {
    Host { keys: Vec<Vec<f32>>, values: Vec<Vec<f32>> },
    Device { keys: Vec<CudaStorage>, values: Vec<CudaStorage> },
}

pub struct KvCache {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    slots: usize,
    capacity: usize,
    store: Store,
    lens: Vec<usize>,
}

/// The new tokens of one decoding step, checked against the cache, with their cache rows on the
/// device for a device cache (uploaded once, used by every layer).
pub struct Step {
    at: Vec<TokenAt>,
    rows: Option<CudaSlice<u32>>,
    /// The (slots, capacity) of the cache that checked it.
    layout: (usize, usize),
}

impl KvCache {
    /// Room for `slots` sequences of up to `capacity` tokens, on `device`: on the host in f32
    /// (pages are touched only as positions fill), on a CUDA device in `dtype` (the activations'),
    /// zeroed. Memory: 2 * layers * slots * capacity * n_kv_heads * head_dim elements.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        slots: usize,
        capacity: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<KvCache> {
        if slots == 0 || capacity == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::InvalidArgument(format!(
                "KV cache: {slots} slots of {capacity} positions, {n_heads} heads over {n_kv_heads} KV heads"
            )));
        }
        let rows = slots * capacity;
        if rows > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "KV cache: {slots} x {capacity} rows exceed 32-bit row indices"
            )));
        }
        let n = rows * n_kv_heads * head_dim;
        let store = match device {
            Device::Cpu => Store::Host {
                keys: (0..n_layers).map(|_| vec![0.0; n]).collect(),
                values: (0..n_layers).map(|_| vec![0.0; n]).collect(),
            },
            Device::Cuda(dev) => {
                if head_dim > decode::MAX_HEAD_DIM {
                    return Err(Error::InvalidArgument(format!(
                        "KV cache: head_dim {head_dim} is above the decode kernel's {}",
                        decode::MAX_HEAD_DIM
                    )));
                }
                let zeros = || (0..n_layers).map(|_| CudaStorage::zeros(dev, dtype, n)).collect::<Result<Vec<_>>>();
                Store::Device { keys: zeros()?, values: zeros()? }
            }
        };
        Ok(KvCache { n_heads, n_kv_heads, head_dim, slots, capacity, store, lens: vec![0; slots] })
    }

    /// Where the cache lives (and its attention runs).
    pub fn device(&self) -> Device {
        match &self.store {
            Store::Host { .. } => Device::Cpu,
            Store::Device { keys, .. } => match keys.first() {
                Some(k) => Device::Cuda(k.device.clone()),
                None => Device::Cpu,
            },
        }
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

    /// Checks the new tokens of a step against the cache (each slot and position inside it, no
    /// two at one place) and, for a device cache, uploads their rows once for every layer.
    pub fn step(&self, at: &[TokenAt]) -> Result<Step> {
        if let Some(a) = at.iter().find(|a| a.slot >= self.slots || a.pos >= self.capacity) {
            return Err(Error::InvalidArgument(format!(
                "cached attention: token at slot {} position {} is outside the cache ({} slots of {})",
                a.slot, a.pos, self.slots, self.capacity
            )));
        }
        if at.is_empty() {
            return Err(Error::InvalidArgument("cached attention: a step without tokens".into()));
        }
        // Below u32::MAX: KvCache::new checked slots * capacity.
        let rows: Vec<u32> = at.iter().map(|a| (a.slot * self.capacity + a.pos) as u32).collect();
        let mut sorted = rows.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            let (slot, pos) = (w[0] as usize / self.capacity, w[0] as usize % self.capacity);
            return Err(Error::InvalidArgument(format!(
                "cached attention: two new tokens at slot {slot} position {pos}"
            )));
        }
        let device_rows = match &self.store {
            Store::Device { keys, .. } => keys.first().map(|k| decode::upload_rows(&k.device, &rows)).transpose()?,
            Store::Host { .. } => None,
        };
        Ok(Step { at: at.to_vec(), rows: device_rows, layout: (self.slots, self.capacity) })
    }

    /// Stores the keys and values of the step's new tokens in layer `layer`, then returns their
    /// attention outputs [tokens, n_heads * head_dim]. q is [tokens, n_heads * head_dim], k and v
    /// [tokens, n_kv_heads * head_dim], RoPE already applied; a token sees its slot's positions up
    /// to its own, so several tokens of one slot can come at once (a prompt).
    ///
    /// A host cache takes q, k, v from any device and returns the output on q's device in q's
    /// dtype (through the host); a device cache takes them on its device in its dtype.
    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, step: &Step) -> Result<Tensor> {
        let (hd, kvw, t) = (self.n_heads * self.head_dim, self.kv_width(), step.at.len());
        let shapes_ok = q.dims() == [t, hd] && k.dims() == [t, kvw] && v.dims() == [t, kvw];
        if !shapes_ok {
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
        if step.layout != (self.slots, self.capacity)
            || step.rows.is_some() != matches!(self.store, Store::Device { .. })
        {
            return Err(Error::InvalidArgument("cached attention: a step checked by another cache".into()));
        }
        if layer >= self.layers() {
            return Err(Error::InvalidArgument(format!("cached attention: layer {layer} of {}", self.layers())));
        }
        let shape = DecodeShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
        };
        match &mut self.store {
            Store::Host { keys, values } => {
                Ok(attend_host(&mut keys[layer], &mut values[layer], shape, q, k, v, &step.at)?)
            }
            Store::Device { keys, values } => {
                let (kc, vc) = (&mut keys[layer], &mut values[layer]);
                let Some(rows) = &step.rows else { unreachable!("checked above: a device cache's step has rows") };
                let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (q.storage(), k.storage(), v.storage())
                else {
                    return Err(Error::DeviceMismatch {
                        op: "cached attention",
                        lhs: "q, k or v on the CPU".into(),
                        rhs: "the KV cache on CUDA".into(),
                    });
                };
                decode::store(ks, vs, kc, vc, rows, kvw)?;
                let o = decode::attention(qs, kc, vc, rows, shape)?;
                Tensor::from_storage(Storage::Cuda(o), [t, hd])
            }
        }
    }

    fn layers(&self) -> usize {
        match &self.store {
            Store::Host { keys, .. } => keys.len(),
            Store::Device { keys, .. } => keys.len(),
        }
    }
}

/// The host cache's store and attention (f32, whatever q's device and dtype).
fn attend_host(
    keys: &mut [f32],
    values: &mut [f32],
    s: DecodeShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    at: &[TokenAt],
) -> Result<Tensor> {
    let (qs, ks, vs) = (q.to_f32_vec()?, k.to_f32_vec()?, v.to_f32_vec()?);
    let (cap, d) = (s.capacity, s.head_dim);
    let (kvw, hd) = (s.n_kv_heads * d, s.n_heads * d);
    for (i, a) in at.iter().enumerate() {
        let dst = (a.slot * cap + a.pos) * kvw;
        keys[dst..dst + kvw].copy_from_slice(&ks[i * kvw..(i + 1) * kvw]);
        values[dst..dst + kvw].copy_from_slice(&vs[i * kvw..(i + 1) * kvw]);
    }
    let (keys, values) = (&*keys, &*values);
    let group = s.n_heads / s.n_kv_heads;
    let n_heads = s.n_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; at.len() * hd];
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
    let out = Tensor::from_vec(out, [at.len(), hd], &Device::Cpu)?;
    if q.device().is_cuda() || q.dtype() != DType::F32 { out.to(&q.device(), q.dtype()) } else { Ok(out) }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_checked_against_their_cache() {
        let cache = |cap| KvCache::new(2, 4, 2, 8, 3, cap, &Device::Cpu, DType::F32).unwrap();
        let (mut a, b) = (cache(5), cache(6));
        let at = |slot, pos| TokenAt { slot, pos };
        let err = |r: Result<Step>| r.err().unwrap().to_string();
        assert!(err(a.step(&[at(0, 1), at(0, 1)])).contains("two new tokens at slot 0 position 1"));
        assert!(err(a.step(&[at(3, 0)])).contains("slot 3 position 0 is outside"));
        assert!(err(a.step(&[at(0, 5)])).contains("outside the cache (3 slots of 5)"));
        assert!(err(a.step(&[])).contains("without tokens"));
        let step = b.step(&[at(1, 0)]).unwrap();
        let z = |w| Tensor::zeros([1, w], DType::F32, &Device::Cpu).unwrap();
        let e = a.attend(0, &z(32), &z(16), &z(16), &step).unwrap_err().to_string();
        assert!(e.contains("another cache"), "{e}");
        assert_eq!(a.device(), Device::Cpu);
    }
}
