//! Cross-entropy over the vocabulary with an ignore index, as PyTorch's
//! `F.cross_entropy(logits, targets, ignore_index=-100, reduction="mean")`: the mean over the
//! targets that are not ignored.
//!
//! On the CPU the logits are f32 and the sums f64. On CUDA they are f32 or bf16 and the op runs
//! [`crate::cuda::cross_entropy`] (one block per row, f32 arithmetic): the loss is a one-element
//! f32 tensor on the device, the gradient has the logits' dtype.

use super::data::zeros_like;
use super::data::{dims2, f32s, tensor};
use super::tape::{BackwardFn, Tape, Var};
use crate::cuda::cross_entropy as cuda_ce;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;

const OP: &str = "cross_entropy";

/// The label that contributes nothing to the loss (padding, prompt tokens).
pub const IGNORE_INDEX: i64 = -100;

/// log-sum-exp of a row, accumulated in f64.
fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// The number of targets that count (not [`IGNORE_INDEX`]), after checking that there is one
/// per row, that each is a class below `vocab` or the ignore index, and that at least one counts
/// (the mean would be 0/0).
pub(crate) fn count_targets(n: usize, vocab: usize, targets: &[i64]) -> Result<usize> {
    let count = check_targets(n, vocab, targets)?;
    if count == 0 {
        return Err(Error::InvalidArgument("cross_entropy: every target is the ignore index".into()));
    }
    Ok(count)
}

/// One target per row, each a class below `vocab` or the ignore index; the number that count.
pub(crate) fn check_targets(n: usize, vocab: usize, targets: &[i64]) -> Result<usize> {
    if targets.len() != n {
        return Err(Error::shape(OP, format!("{} targets for {n} rows of logits", targets.len())));
    }
    if let Some((i, t)) =
        targets.iter().enumerate().find(|&(_, &t)| t != IGNORE_INDEX && !(0..vocab as i64).contains(&t))
    {
        return Err(Error::InvalidArgument(format!(
            "cross_entropy: target {t} at row {i} is neither a class below {vocab} nor {IGNORE_INDEX}"
        )));
    }
    Ok(targets.iter().filter(|&&t| t != IGNORE_INDEX).count())
}

/// Each row's cross-entropy `logsumexp(x[r]) − x[r, t[r]]` (0 where the target is
/// [`IGNORE_INDEX`]), computed where the logits [n, vocab] live, so that evaluation brings n
/// numbers to the host instead of n·vocab logits. f64 sums on the CPU, f32 on CUDA.
pub fn row_losses(logits: &Tensor, targets: &[i64]) -> Result<Vec<f64>> {
    let (n, vocab) = dims2(logits, OP, "logits")?;
    check_targets(n, vocab, targets)?;
    match logits.storage() {
        Storage::Cuda(s) => {
            let losses = cuda_ce::row_losses(s, n, vocab, targets)?;
            let host = s.device.stream().clone_dtoh(&losses).map_err(Error::cuda("cuMemcpyDtoH"))?;
            Ok(host.into_iter().map(f64::from).collect())
        }
        Storage::Cpu(_) => {
            let ls = f32s(logits, OP)?;
            Ok(ls
                .chunks_exact(vocab)
                .zip(targets)
                .map(|(row, &t)| if t == IGNORE_INDEX { 0.0 } else { logsumexp(row) - row[t as usize] as f64 })
                .collect())
        }
    }
}

impl Tape {
    /// Mean cross-entropy of logits [n, vocab] against `targets` \[n\] (class ids or -100), a
    /// one-element f32 tensor on the logits' device. All targets ignored is an error (the mean
    /// would be 0/0).
    pub fn cross_entropy(&mut self, logits: Var, targets: &[i64]) -> Result<Var> {
        let lv = self.value(logits);
        let (n, vocab) = dims2(lv, OP, "logits")?;
        let count = count_targets(n, vocab, targets)?;
        let (y, back) = match lv.storage() {
            Storage::Cuda(_) => cross_entropy_cuda(lv, n, vocab, targets)?,
            Storage::Cpu(_) => cross_entropy_cpu(lv, n, vocab, targets, count)?,
        };
        Ok(self.push_op(OP, y, &[logits], back))
    }
}

fn cross_entropy_cuda(lv: &Tensor, n: usize, vocab: usize, targets: &[i64]) -> Result<(Tensor, BackwardFn)> {
    let mut y = Tensor::zeros([1], DType::F32, &lv.device())?;
    let state =
        cuda_ce::forward(lv.cuda_storage(OP, "logits")?, n, vocab, targets, y.cuda_storage_mut(OP, "the loss")?)?;
    let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
        // Tape::backward seeds the loss with a host tensor; a gradient from another op is
        // already on the device.
        let uploaded = match dy.storage() {
            Storage::Cpu(_) => Some(dy.to_device(&inp[0].device())?),
            Storage::Cuda(_) => None,
        };
        let g = uploaded.as_ref().unwrap_or(dy).cuda_storage(OP, "the upstream gradient")?;
        let mut d = zeros_like(inp[0])?;
        cuda_ce::backward(inp[0].cuda_storage(OP, "logits")?, &state, g, d.cuda_storage_mut(OP, "dlogits")?)?;
        Ok(vec![Some(d)])
    });
    Ok((y, back))
}

fn cross_entropy_cpu(
    lv: &Tensor,
    n: usize,
    vocab: usize,
    targets: &[i64],
    count: usize,
) -> Result<(Tensor, BackwardFn)> {
    let ls = f32s(lv, OP)?;
    let mut total = 0.0f64;
    for (row, &t) in ls.chunks_exact(vocab).zip(targets) {
        if t != IGNORE_INDEX {
            total += logsumexp(row) - row[t as usize] as f64;
        }
    }
    let y = tensor(vec![(total / count as f64) as f32], &[1])?;
    let targets = targets.to_vec();
    let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], _: &[bool]| {
        // d loss / d logits = (softmax - onehot) / count on the rows that count.
        let (g, ls) = (f32s(dy, OP)?[0] as f64 / count as f64, f32s(inp[0], OP)?);
        let mut d = vec![0.0f32; n * vocab];
        for ((row, drow), &t) in ls.chunks_exact(vocab).zip(d.chunks_exact_mut(vocab)).zip(&targets) {
            if t == IGNORE_INDEX {
                continue;
            }
            let lse = logsumexp(row);
            for (dx, &x) in drow.iter_mut().zip(row) {
                *dx = ((x as f64 - lse).exp() * g) as f32;
            }
            drow[t as usize] -= g as f32;
        }
        Ok(vec![Some(tensor(d, &[n, vocab])?)])
    });
    Ok((y, back))
}
