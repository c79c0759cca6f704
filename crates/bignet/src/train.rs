//! The homework grader's fit task: a frozen random linear head on top of the model, 1000
//! standard-normal samples (500 labelled 0, then 500 labelled 1), AdamW over the trainable
//! parameters, binary cross-entropy with logits; the best accuracy over the steps.

use crate::error::{Error, Result};
use crate::model::BigNet;
use nibble_autograd::{AdamW, AdamWConfig, Optimizer, Tape, Var};
use nibble_tensor::{Rng, Tensor, WeightMatrix};
use std::sync::Arc;

/// The data and head of a fit run.
#[derive(Debug, Clone)]
pub struct FitTask {
    /// Inputs `[samples, dim]`, standard normal, as an untracked value every step shares
    /// (no copy per step).
    pub x: Var,
    /// Labels `[samples]`: the first half 0, the second half 1.
    pub y: Tensor,
    /// The frozen head `[1, dim]`, uniform ±1/√dim (PyTorch's default Linear init), no bias.
    pub head: Arc<dyn WeightMatrix>,
}

impl FitTask {
    /// The task at width `dim` with `samples` samples drawn from `seed`.
    pub fn new(dim: usize, samples: usize, seed: u64) -> Self {
        let mut rng = Rng::fork(seed, 0xF17);
        let bound = 1.0 / (dim as f32).sqrt();
        let head = Tensor::uniform(&[1, dim], -bound, bound, &mut rng);
        let x = Tensor::randn(&[samples, dim], &mut rng);
        let y = Tensor::from_vec(
            &[samples],
            (0..samples)
                .map(|i| if i < samples / 2 { 0.0 } else { 1.0 })
                .collect(),
        )
        .expect("samples labels");
        FitTask {
            x: Var::constant(x),
            y,
            head: Arc::new(head),
        }
    }
}

/// What a fit run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Loss at each step (before that step's update).
    pub loss: Vec<f32>,
    /// Accuracy at each step (before that step's update).
    pub accuracy: Vec<f32>,
    /// The best accuracy seen.
    pub best_accuracy: f32,
}

/// One training step: forward, loss, backward, AdamW; returns (loss, accuracy) before the
/// update.
pub fn train_step(
    model: &BigNet,
    task: &FitTask,
    tape: &Tape,
    opt: &mut dyn Optimizer,
) -> Result<(f32, f32)> {
    opt.zero_grad();
    let out = model.forward(tape, &task.x)?;
    let logits = tape.frozen_linear(&out, &task.head, None)?;
    let accuracy = accuracy(logits.value(), &task.y);
    let loss = tape.bce_with_logits(&logits, &task.y)?;
    let loss_value = loss.value().item()?;
    drop(out);
    drop(logits);
    tape.backward(&loss)?;
    opt.step()?;
    Ok((loss_value, accuracy))
}

/// Fraction of samples whose logit's sign matches the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> f32 {
    let correct = logits
        .data()
        .iter()
        .zip(labels.data())
        .filter(|(&z, &y)| (z > 0.0) == (y > 0.5))
        .count();
    correct as f32 / labels.numel().max(1) as f32
}

/// The grader's fit: `steps` AdamW steps (lr `lr`) over the model's trainable parameters.
/// `on_step(step, loss, accuracy)` is called after each step.
pub fn fit(
    model: &BigNet,
    task: &FitTask,
    steps: usize,
    lr: f32,
    mut on_step: impl FnMut(usize, f32, f32),
) -> Result<FitReport> {
    let params = model.trainable_params();
    if params.is_empty() {
        return Err(Error::Model {
            what: format!(
                "variant {} has no trainable parameters: nothing to fit (try lora or qlora)",
                model.variant()
            ),
        });
    }
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr,
            ..AdamWConfig::default()
        },
    )?;
    let tape = Tape::new();
    let mut report = FitReport {
        loss: Vec::with_capacity(steps),
        accuracy: Vec::with_capacity(steps),
        best_accuracy: 0.0,
    };
    for step in 0..steps {
        let (loss, acc) = train_step(model, task, &tape, &mut opt)?;
        report.loss.push(loss);
        report.accuracy.push(acc);
        report.best_accuracy = report.best_accuracy.max(acc);
        on_step(step, loss, acc);
    }
    Ok(report)
}
