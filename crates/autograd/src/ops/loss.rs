//! Reductions and losses: sum, mean, binary cross-entropy with logits, mean-squared error.

use crate::error::Result;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::{Tensor, TensorError};
use std::sync::Arc;

/// Backward of [`Tape::sum`] and [`Tape::mean`]: `dX = dY · scale` everywhere.
struct BroadcastOp {
    shape: Vec<usize>,
    scale: f32,
}

impl Op for BroadcastOp {
    fn name(&self) -> &'static str {
        "sum/mean"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = d_y.item()? * self.scale;
        Ok(vec![Some(Tensor::full(&self.shape, g))])
    }
}

/// Backward of [`Tape::bce_with_logits`]: `dz = (sigmoid(z) - y) / N` (`N`: the
/// `denominator`, the size of the whole batch when this is one micro-batch of it).
struct BceOp {
    logits: Arc<Tensor>,
    targets: Tensor,
    denominator: usize,
}

impl Op for BceOp {
    fn name(&self) -> &'static str {
        "bce_with_logits"
    }
    fn backward(self: Box<Self>, d_loss: Tensor) -> Result<Vec<Option<Tensor>>> {
        let scale = d_loss.item()? / self.denominator.max(1) as f32;
        let mut d_z = Tensor::zeros(self.logits.shape());
        for ((g, &z), &y) in d_z
            .data_mut()
            .iter_mut()
            .zip(self.logits.data())
            .zip(self.targets.data())
        {
            *g = (sigmoid(z) - y) * scale;
        }
        Ok(vec![Some(d_z)])
    }
}

/// Backward of [`Tape::mse`]: `dp = 2 (p - t) / N`.
struct MseOp {
    pred: Arc<Tensor>,
    target: Tensor,
}

impl Op for MseOp {
    fn name(&self) -> &'static str {
        "mse"
    }
    fn backward(self: Box<Self>, d_loss: Tensor) -> Result<Vec<Option<Tensor>>> {
        let scale = 2.0 * d_loss.item()? / self.target.numel() as f32;
        let mut d_p = Tensor::zeros(self.pred.shape());
        for ((g, &p), &t) in d_p
            .data_mut()
            .iter_mut()
            .zip(self.pred.data())
            .zip(self.target.data())
        {
            *g = (p - t) * scale;
        }
        Ok(vec![Some(d_p)])
    }
}

fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

fn same_count(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.numel() != b.numel() {
        return Err(TensorError::ShapeMismatch {
            op,
            lhs: a.shape().to_vec(),
            rhs: b.shape().to_vec(),
        }
        .into());
    }
    Ok(())
}

impl Tape {
    /// Sum of all elements, as a one-element tensor.
    pub fn sum(&self, x: &Var) -> Result<Var> {
        let shape = x.shape().to_vec();
        self.record("sum", &[x], Tensor::scalar(x.value().sum()), false, || {
            Box::new(BroadcastOp { shape, scale: 1.0 })
        })
    }

    /// Mean of all elements, as a one-element tensor.
    pub fn mean(&self, x: &Var) -> Result<Var> {
        let shape = x.shape().to_vec();
        let n = x.value().numel().max(1) as f32;
        self.record(
            "mean",
            &[x],
            Tensor::scalar(x.value().mean()),
            false,
            || {
                Box::new(BroadcastOp {
                    shape,
                    scale: 1.0 / n,
                })
            },
        )
    }

    /// PyTorch's `binary_cross_entropy_with_logits(z, y)` with mean reduction, in the stable
    /// form `max(z, 0) - z·y + ln(1 + e^{-|z|})`. `logits` and `targets` must hold the same
    /// number of elements (e.g. `[n, 1]` and `[n]`).
    pub fn bce_with_logits(&self, logits: &Var, targets: &Tensor) -> Result<Var> {
        self.bce_with_logits_part(logits, targets, targets.numel())
    }

    /// One micro-batch's share of a batch's [`Tape::bce_with_logits`]: the sum of these
    /// samples' losses divided by `batch`, the size of the whole batch. The shares' gradients
    /// are those of the whole batch's mean element for element (each is `(sigmoid(z) - y) /
    /// batch`), so accumulating them over the micro-batches gives the whole batch's gradient
    /// up to the order of the sums over rows.
    pub fn bce_with_logits_part(
        &self,
        logits: &Var,
        targets: &Tensor,
        batch: usize,
    ) -> Result<Var> {
        same_count("bce_with_logits", logits.value(), targets)?;
        let n = batch.max(1) as f64;
        let total: f64 = logits
            .value()
            .data()
            .iter()
            .zip(targets.data())
            .map(|(&z, &y)| {
                let (z, y) = (z as f64, y as f64);
                z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
            })
            .sum();
        let loss = Tensor::scalar((total / n) as f32);
        self.record("bce_with_logits", &[logits], loss, false, || {
            Box::new(BceOp {
                logits: logits.shared(),
                targets: targets.clone(),
                denominator: batch,
            })
        })
    }

    /// Mean-squared error `mean((pred - target)²)` (same element counts).
    pub fn mse(&self, pred: &Var, target: &Tensor) -> Result<Var> {
        same_count("mse", pred.value(), target)?;
        let total: f64 = pred
            .value()
            .data()
            .iter()
            .zip(target.data())
            .map(|(&p, &t)| ((p - t) as f64).powi(2))
            .sum();
        let loss = Tensor::scalar((total / target.numel().max(1) as f64) as f32);
        self.record("mse", &[pred], loss, false, || {
            Box::new(MseOp {
                pred: pred.shared(),
                target: target.clone(),
            })
        })
    }
}
