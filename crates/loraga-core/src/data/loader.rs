//! Examples into batches: deterministic shuffling, optional length bucketing, right padding, and
//! an iterator that can start from any [`Position`] (resuming a checkpointed run).
//!
//! Epoch e's order depends only on (seed, e): a ChaCha8 stream keyed by the two, and a
//! Fisher-Yates shuffle with our own unbiased bounded draw, so the order is the same on every run,
//! platform and `rand` version (ChaCha's output is fixed by its specification).
//!
//! Length bucketing (as Hugging Face's `group_by_length`): after the shuffle, each chunk of
//! `chunk_batches * batch_size` examples is sorted by length (longest first) and cut into
//! batches, so a batch holds examples of similar length and little padding; then the batches'
//! order is shuffled, so lengths do not drift over the epoch.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::encode::Example;
use crate::autograd::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::model::Batch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// false: every epoch in the examples' own order (evaluation).
    pub shuffle: bool,
    /// Sort by length within chunks of this many batches (None: no bucketing).
    pub bucket_chunk_batches: Option<usize>,
    /// Leave out an epoch's last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// The id written into padding (masked and ignored, so any id in the vocabulary does).
    pub pad_id: u32,
}

impl LoaderConfig {
    /// Shuffled, no bucketing, partial last batch kept.
    pub fn new(batch_size: usize, seed: u64, pad_id: u32) -> LoaderConfig {
        LoaderConfig { batch_size, seed, shuffle: true, bucket_chunk_batches: None, drop_last: false, pad_id }
    }
}

/// Where a run stands in its data: the next batch is batch `batch` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Position {
    pub epoch: u64,
    pub batch: usize,
}

pub struct Loader<'a> {
    examples: &'a [Example],
    cfg: LoaderConfig,
}

impl<'a> Loader<'a> {
    pub fn new(examples: &'a [Example], cfg: LoaderConfig) -> Result<Loader<'a>> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("data loader: {m}")));
        if examples.is_empty() {
            return bad("no examples".into());
        }
        if cfg.batch_size == 0 {
            return bad("batch_size is 0".into());
        }
        if cfg.bucket_chunk_batches == Some(0) {
            return bad("bucket_chunk_batches is 0".into());
        }
        if cfg.drop_last && examples.len() < cfg.batch_size {
            return bad(format!(
                "drop_last with {} examples for batches of {}: no batch",
                examples.len(),
                cfg.batch_size
            ));
        }
        if let Some(e) = examples.iter().find(|e| e.is_empty()) {
            return bad(format!("example from record {} has no tokens", e.source));
        }
        Ok(Loader { examples, cfg })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.examples.len(), self.cfg.batch_size);
        if self.cfg.drop_last { n / b } else { n.div_ceil(b) }
    }

    /// The examples (indices into the slice) of each batch of `epoch`, in order.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let b = self.cfg.batch_size;
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = keyed_rng(self.cfg.seed, epoch);
        if self.cfg.shuffle {
            shuffle(&mut order, &mut rng);
        }
        let mut batches: Vec<Vec<usize>> = match self.cfg.bucket_chunk_batches {
            None => order.chunks(b).map(<[usize]>::to_vec).collect(),
            Some(chunk) => {
                let mut out = Vec::new();
                for c in order.chunks(chunk * b) {
                    let mut c = c.to_vec();
                    // Stable: equal lengths keep the shuffled order.
                    c.sort_by_key(|&i| std::cmp::Reverse(self.examples[i].len()));
                    out.extend(c.chunks(b).map(<[usize]>::to_vec));
                }
                if self.cfg.shuffle {
                    shuffle(&mut out, &mut rng);
                }
                out
            }
        };
        if self.cfg.drop_last {
            batches.retain(|x| x.len() == b);
        }
        batches
    }

    /// The batch of these examples (indices into the slice).
    pub fn collate(&self, indices: &[usize]) -> Batch {
        let examples: Vec<&Example> = indices.iter().map(|&i| &self.examples[i]).collect();
        collate(&examples, self.cfg.pad_id)
    }

    /// Every batch from `start` on, epoch after epoch (without end: `take` what a run needs).
    pub fn batches_from(&self, start: Position) -> Result<Batches<'_, 'a>> {
        let per_epoch = self.batches_per_epoch();
        if start.batch > per_epoch {
            return Err(Error::InvalidArgument(format!(
                "data position: batch {} of epoch {} is past the {per_epoch} batches of an epoch (another data set or batch size?)",
                start.batch, start.epoch
            )));
        }
        Ok(Batches { loader: self, plan: self.epoch_plan(start.epoch), next: start })
    }
}

/// Batches in order from a [`Position`]; each item comes with its own position.
pub struct Batches<'l, 'a> {
    loader: &'l Loader<'a>,
    plan: Vec<Vec<usize>>,
    next: Position,
}

impl Batches<'_, '_> {
    /// The position of the batch `next()` returns: what a checkpoint saves to resume after the
    /// batches already taken.
    pub fn next_position(&self) -> Position {
        if self.next.batch == self.plan.len() { Position { epoch: self.next.epoch + 1, batch: 0 } } else { self.next }
    }
}

impl Iterator for Batches<'_, '_> {
    type Item = (Position, Batch);

    fn next(&mut self) -> Option<(Position, Batch)> {
        let pos = self.next_position();
        if pos.epoch != self.next.epoch {
            self.plan = self.loader.epoch_plan(pos.epoch);
        }
        self.next = Position { epoch: pos.epoch, batch: pos.batch + 1 };
        Some((pos, self.loader.collate(&self.plan[pos.batch])))
    }
}

/// Right-pads examples into one batch: mask false and label -100 on the padding.
pub fn collate(examples: &[&Example], pad_id: u32) -> Batch {
    let seq = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let n = examples.len() * seq;
    let (mut ids, mut mask, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for e in examples {
        let pad = seq - e.len();
        ids.extend(e.input_ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        mask.extend(std::iter::repeat_n(true, e.len()).chain(std::iter::repeat_n(false, pad)));
        labels.extend(e.labels().chain(std::iter::repeat_n(IGNORE_INDEX, pad)));
    }
    Batch { batch: examples.len(), seq, input_ids: ids, attention_mask: Some(mask), labels: Some(labels) }
}

/// ChaCha8 keyed by two words (the loader: the seed and the epoch).
pub(crate) fn keyed_rng(a: u64, b: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..16].copy_from_slice(&b.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A uniform draw from 0..n (n > 0) by rejection, so no residue class is favoured.
pub(crate) fn below(rng: &mut impl RngCore, n: usize) -> usize {
    let n = n as u64;
    let limit = u64::MAX - u64::MAX % n;
    loop {
        let r = rng.next_u64();
        if r < limit {
            return (r % n) as usize;
        }
    }
}

/// Fisher-Yates: swaps each position from the end with a uniformly drawn earlier one.
pub(crate) fn shuffle<T>(v: &mut [T], rng: &mut impl RngCore) {
    for i in (1..v.len()).rev() {
        v.swap(i, below(rng, i + 1));
    }
}
