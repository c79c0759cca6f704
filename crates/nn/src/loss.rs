//! Losses for classifiers.

use crate::error::Result;
use nibble_autograd::{Tape, Var};

/// Softmax cross-entropy of `logits` `[n, classes]` against integer `labels` (`n` of them,
/// each below `classes`), mean over rows: PyTorch's `F.cross_entropy(logits, labels)`.
/// Numerically stable (log-sum-exp); differentiable on `tape`. A label out of range or a count
/// that does not match `n` is an error naming the row and values.
pub fn cross_entropy(tape: &Tape, logits: &Var, labels: &[usize]) -> Result<Var> {
    Ok(tape.cross_entropy(logits, labels)?)
}
