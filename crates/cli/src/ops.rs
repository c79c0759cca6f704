//! The activations and the loss the classifier needs beyond the autograd crate's ops: GELU
//! (exact erf form, PyTorch's default) and mean softmax cross-entropy.

use nibble_autograd::{Op, Result, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// A parameter-free activation layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x Φ(x)` with the exact normal CDF (PyTorch's `nn.GELU()` default).
    Gelu,
}

impl Activation {
    /// Applies the activation, recorded on `tape` where `x` is tracked.
    pub fn forward(self, tape: &Tape, x: &Var) -> Result<Var> {
        match self {
            Activation::Relu => tape.relu(x),
            Activation::Gelu => gelu(tape, x),
        }
    }
}

/// erf(x) in f64 (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// Φ(x), the standard normal CDF.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

struct GeluOp {
    x: Arc<Tensor>,
}

impl Op for GeluOp {
    fn name(&self) -> &'static str {
        "gelu"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut d_x = d_y;
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        d_x.data_mut()
            .iter_mut()
            .zip(self.x.data())
            .for_each(|(g, &x)| {
                let x = f64::from(x);
                let d = normal_cdf(x) + x * inv_sqrt_2pi * (-0.5 * x * x).exp();
                *g = (f64::from(*g) * d) as f32;
            });
        Ok(vec![Some(d_x)])
    }
}

fn gelu(tape: &Tape, x: &Var) -> Result<Var> {
    let mut y = x.value().clone();
    y.data_mut()
        .iter_mut()
        .for_each(|v| *v = (f64::from(*v) * normal_cdf(f64::from(*v))) as f32);
    let saved = x.shared();
    tape.record("gelu", &[x], y, false, move || {
        Box::new(GeluOp { x: saved })
    })
}

struct CrossEntropyOp {
    /// softmax(logits) − one_hot(labels), divided by the rows.
    grad: Tensor,
}

impl Op for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let scale = d_y.data().first().copied().unwrap_or(0.0);
        let mut g = self.grad;
        g.data_mut().iter_mut().for_each(|v| *v *= scale);
        Ok(vec![Some(g)])
    }
}

/// Mean softmax cross-entropy of `logits` `[rows, classes]` against `labels` (each below
/// `classes`; checked by the caller's data reader), a one-element loss.
pub fn cross_entropy(tape: &Tape, logits: &Var, labels: &[usize]) -> Result<Var> {
    let (rows, classes) = logits.value().dims2("cross_entropy")?;
    let mut grad = logits.value().clone();
    let mut total = 0.0f64;
    for (row, &label) in grad.data_mut().chunks_exact_mut(classes.max(1)).zip(labels) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        total += f64::from(max) + sum.ln() - f64::from(row[label]);
        for (j, v) in row.iter_mut().enumerate() {
            let p = f64::from(*v - max).exp() / sum;
            let target = if j == label { 1.0 } else { 0.0 };
            *v = ((p - target) / rows.max(1) as f64) as f32;
        }
    }
    let loss = Tensor::from_vec(&[1], vec![(total / rows.max(1) as f64) as f32])?;
    tape.record("cross_entropy", &[logits], loss, false, move || {
        Box::new(CrossEntropyOp { grad })
    })
}
