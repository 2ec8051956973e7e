//! Cross-entropy over the vocabulary with an ignore index, as PyTorch's
//! `F.cross_entropy(logits, targets, ignore_index=-100, reduction="mean")`: the mean over the
//! targets that are not ignored.

use super::data::{dims2, f32s, tensor};
use super::tape::{Tape, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The label that contributes nothing to the loss (padding, prompt tokens).
pub const IGNORE_INDEX: i64 = -100;

/// log-sum-exp of a row, accumulated in f64.
fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

impl Tape {
    /// Mean cross-entropy of logits [n, vocab] against `targets` [n] (class ids or -100), a
    /// one-element tensor. All targets ignored is an error (the mean would be 0/0).
    pub fn cross_entropy(&mut self, logits: Var, targets: &[i64]) -> Result<Var> {
        let lv = self.value(logits);
        let (n, vocab) = dims2(lv, "cross_entropy", "logits")?;
        if targets.len() != n {
            return Err(Error::shape("cross_entropy", format!("{} targets for {n} rows of logits", targets.len())));
        }
        if let Some((i, t)) =
            targets.iter().enumerate().find(|&(_, &t)| t != IGNORE_INDEX && !(0..vocab as i64).contains(&t))
        {
            return Err(Error::InvalidArgument(format!(
                "cross_entropy: target {t} at row {i} is neither a class below {vocab} nor {IGNORE_INDEX}"
            )));
        }
        let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        if count == 0 {
            return Err(Error::InvalidArgument("cross_entropy: every target is the ignore index".into()));
        }
        let ls = f32s(lv, "cross_entropy")?;
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
            let (g, ls) = (f32s(dy, "cross_entropy")?[0] as f64 / count as f64, f32s(inp[0], "cross_entropy")?);
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
        Ok(self.push_op("cross_entropy", y, &[logits], back))
    }
}
