//! Softmax cross-entropy over class logits with integer labels, mean over rows (PyTorch's
//! `F.cross_entropy(logits, labels)`), computed stably through the log-sum-exp.

use crate::error::{AutogradError, Result};
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// Backward of [`Tape::cross_entropy`]: `dZ = (softmax(Z) − onehot(labels)) · dL / n`.
struct CrossEntropyOp {
    logits: Arc<Tensor>,
    labels: Vec<usize>,
}

impl Op for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn backward(self: Box<Self>, d_loss: Tensor) -> Result<Vec<Option<Tensor>>> {
        let (n, c) = self.logits.dims2("cross_entropy backward")?;
        let scale = d_loss.item()? as f64 / n as f64;
        let mut d_z = Tensor::zeros(&[n, c]);
        for ((row, d_row), &label) in self
            .logits
            .data()
            .chunks_exact(c)
            .zip(d_z.data_mut().chunks_exact_mut(c))
            .zip(&self.labels)
        {
            let (max, sum) = max_and_sum_exp(row);
            for (j, (g, &z)) in d_row.iter_mut().zip(row).enumerate() {
                let p = ((z as f64 - max).exp() / sum) - if j == label { 1.0 } else { 0.0 };
                *g = (p * scale) as f32;
            }
        }
        Ok(vec![Some(d_z)])
    }
}

/// The row's maximum and `Σ exp(z − max)`, in f64.
fn max_and_sum_exp(row: &[f32]) -> (f64, f64) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
    let sum = row.iter().map(|&z| (z as f64 - max).exp()).sum();
    (max, sum)
}

impl Tape {
    /// Mean over the `n` rows of `logits` `[n, c]` of `logsumexp(row) − row[label]`. Every label
    /// must be below `c`; `labels.len()` must be `n ≥ 1`.
    pub fn cross_entropy(&self, logits: &Var, labels: &[usize]) -> Result<Var> {
        let (n, c) = logits.value().dims2("cross_entropy")?;
        let invalid = |what: String| AutogradError::InvalidInput {
            op: "cross_entropy",
            what,
        };
        if labels.len() != n {
            return Err(invalid(format!(
                "{} labels for logits of shape [{n}, {c}]",
                labels.len()
            )));
        }
        if n == 0 {
            return Err(invalid("no rows: the mean of nothing is undefined".into()));
        }
        if let Some((row, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= c) {
            return Err(invalid(format!(
                "label {label} of row {row} is out of range for {c} classes"
            )));
        }
        let total: f64 = logits
            .value()
            .data()
            .chunks_exact(c)
            .zip(labels)
            .map(|(row, &label)| {
                let (max, sum) = max_and_sum_exp(row);
                max + sum.ln() - row[label] as f64
            })
            .sum();
        let loss = Tensor::scalar((total / n as f64) as f32);
        self.record("cross_entropy", &[logits], loss, false, || {
            Box::new(CrossEntropyOp {
                logits: logits.shared(),
                labels: labels.to_vec(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_gradient_match_finite_differences() {
        let z = vec![1.0f32, -2.0, 0.5, 3.0, 100.0, -100.0, 99.0, 0.0];
        let labels = [2usize, 0];
        let tape = Tape::new();
        let x = tape.leaf(Tensor::from_vec(&[2, 4], z.clone()).unwrap());
        let loss = tape.cross_entropy(&x, &labels).unwrap();
        let l = loss.value().item().unwrap() as f64;
        let reference = |z: &[f32]| -> f64 {
            z.chunks(4)
                .zip(labels)
                .map(|(r, y)| {
                    let m = r.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
                    let s: f64 = r.iter().map(|&v| (v as f64 - m).exp()).sum();
                    m + s.ln() - r[y] as f64
                })
                .sum::<f64>()
                / 2.0
        };
        assert!((l - reference(&z)).abs() < 1e-5, "{l}");
        assert!(l.is_finite());
        let grads = tape.backward(&loss).unwrap();
        let g = grads.get(&x).unwrap();
        for i in 0..z.len() {
            let h = 1e-2f32;
            let (mut p, mut m) = (z.clone(), z.clone());
            p[i] += h;
            m[i] -= h;
            let num = (reference(&p) - reference(&m)) / (2.0 * h as f64);
            assert!(
                (g.data()[i] as f64 - num).abs() < 1e-4,
                "{i}: {} vs {num}",
                g.data()[i]
            );
        }
    }

    #[test]
    fn bad_labels_are_errors() {
        let tape = Tape::new();
        let x = Var::constant(Tensor::zeros(&[2, 3]));
        let e = tape.cross_entropy(&x, &[0, 3]).unwrap_err().to_string();
        assert!(
            e.contains("label 3 of row 1") && e.contains("3 classes"),
            "{e}"
        );
        let e = tape.cross_entropy(&x, &[0]).unwrap_err().to_string();
        assert!(e.contains("1 labels") && e.contains("[2, 3]"), "{e}");
        let empty = Var::constant(Tensor::zeros(&[0, 3]));
        assert!(tape.cross_entropy(&empty, &[]).is_err());
        let flat = Var::constant(Tensor::zeros(&[3]));
        assert!(tape.cross_entropy(&flat, &[0, 0, 0]).is_err());
    }
}
