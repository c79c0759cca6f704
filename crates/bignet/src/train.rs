//! The homework grader's fit task: a frozen random linear head on top of the model, 1000
//! standard-normal samples (500 labelled 0, then 500 labelled 1), AdamW over the trainable
//! parameters, binary cross-entropy with logits; the best accuracy over the steps.

use crate::error::{Error, Result};
use crate::model::BigNet;
use nibble_autograd::{AdamW, AdamWConfig, Optimizer, Tape, Var};
use nibble_quant::act8::{activations, with_activations};
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

/// How a training step spends memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainOptions {
    /// Checkpoint each block ([`BigNet::forward_with`]): keep each block's input, recompute
    /// the block in the backward. Same gradients, bit for bit.
    pub checkpoint: bool,
    /// Run the batch in micro-batches of this many rows, accumulating the gradients (the last
    /// takes the remainder); `None` or a size of at least the batch: one pass. The same update
    /// as the whole batch up to the order of the sums over rows in the weight gradients.
    pub micro_batch: Option<usize>,
}

/// One training step: forward, loss, backward, AdamW; returns (loss, accuracy) before the
/// update.
pub fn train_step(
    model: &BigNet,
    task: &FitTask,
    tape: &Tape,
    opt: &mut dyn Optimizer,
) -> Result<(f32, f32)> {
    train_step_with(model, task, tape, opt, TrainOptions::default())
}

/// [`train_step`] under `options` (checkpointing, micro-batches).
///
/// Runs on a worker of the rayon pool (the global one unless the caller is already inside a
/// pool), as [`BigNet::infer_chunked`] does: each of the step's parallel kernels then starts
/// from inside the pool instead of waking it from outside and sleeping until it is done. A
/// step makes about a thousand such fork-joins per pass over the batch (each GEMM one per
/// block of K, each elementwise op one), four times as many with four micro-batches.
pub fn train_step_with(
    model: &BigNet,
    task: &FitTask,
    tape: &Tape,
    opt: &mut dyn Optimizer,
    options: TrainOptions,
) -> Result<(f32, f32)> {
    on_pool_worker(|| train_step_here(model, task, tape, opt, options))
}

/// Runs `f` on a worker of the rayon pool (the global one unless the caller is already on a
/// worker), under the caller's activation mode (which is per thread). A run of steps enters
/// the pool once: each worker that starts a GEMM keeps a packing buffer of its own (1 MiB at
/// width 1024), so steps entering one by one could each leave one on another worker.
fn on_pool_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mode = activations();
    nibble_tensor::parallel::on_pool_worker(|| with_activations(mode, f))
}

/// [`train_step_with`] on the calling thread.
fn train_step_here(
    model: &BigNet,
    task: &FitTask,
    tape: &Tape,
    opt: &mut dyn Optimizer,
    options: TrainOptions,
) -> Result<(f32, f32)> {
    opt.zero_grad();
    let samples = task.y.numel();
    let micro = match options.micro_batch {
        Some(0) => {
            return Err(Error::Input {
                what: "micro-batch size must be at least 1".into(),
            })
        }
        Some(rows) if rows < samples => rows,
        _ => samples,
    };
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for start in (0..samples).step_by(micro.max(1)) {
        let end = (start + micro).min(samples);
        let (x, y) = if end - start == samples {
            (task.x.clone(), task.y.clone())
        } else {
            let x = task.x.value().rows(start, end)?.to_tensor();
            let y = Tensor::from_vec(&[end - start], task.y.data()[start..end].to_vec())?;
            (Var::constant(x), y)
        };
        let out = model.forward_with(tape, &x, options.checkpoint)?;
        drop(x);
        let logits = tape.frozen_linear(&out, &task.head, None)?;
        drop(out);
        correct += correct_count(logits.value(), &y);
        let loss = tape.bce_with_logits_part(&logits, &y, samples)?;
        loss_sum += loss.value().item()? as f64;
        drop(logits);
        // The backward's input gradients through frozen quantized layers follow the model's
        // activation mode too (int8: `nibble_quant::act8::backward`).
        model.with_own_activations(|| tape.backward(&loss))?;
    }
    opt.step()?;
    Ok((loss_sum as f32, correct as f32 / samples.max(1) as f32))
}

/// Fraction of samples whose logit's sign matches the label: one logit per label (e.g.
/// logits `[n, 1]` for labels `[n]`); other element counts are an [`Error::Input`] naming
/// both shapes.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f32> {
    if logits.numel() != labels.numel() {
        return Err(Error::Input {
            what: format!(
                "accuracy needs one logit per label: logits {:?} ({} elements), labels {:?} ({} elements)",
                logits.shape(),
                logits.numel(),
                labels.shape(),
                labels.numel()
            ),
        });
    }
    Ok(correct_count(logits, labels) as f32 / labels.numel().max(1) as f32)
}

/// Number of samples whose logit's sign matches the label.
fn correct_count(logits: &Tensor, labels: &Tensor) -> usize {
    logits
        .data()
        .iter()
        .zip(labels.data())
        .filter(|(&z, &y)| (z > 0.0) == (y > 0.5))
        .count()
}

/// The grader's fit: `steps` AdamW steps (lr `lr`) over the model's trainable parameters.
/// `on_step(step, loss, accuracy)` is called after each step. A step whose loss is NaN or
/// infinite ends the fit with an [`Error::Diverged`] naming the step, the loss and `lr`.
pub fn fit(
    model: &BigNet,
    task: &FitTask,
    steps: usize,
    lr: f32,
    on_step: impl FnMut(usize, f32, f32) + Send,
) -> Result<FitReport> {
    fit_with(model, task, steps, lr, TrainOptions::default(), on_step)
}

/// [`fit`] under `options` (checkpointing, micro-batches).
pub fn fit_with(
    model: &BigNet,
    task: &FitTask,
    steps: usize,
    lr: f32,
    options: TrainOptions,
    on_step: impl FnMut(usize, f32, f32) + Send,
) -> Result<FitReport> {
    on_pool_worker(|| fit_here(model, task, steps, lr, options, on_step))
}

/// [`fit_with`] on the calling thread.
fn fit_here(
    model: &BigNet,
    task: &FitTask,
    steps: usize,
    lr: f32,
    options: TrainOptions,
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
    // A PEFT adapter loaded with its scaling folded into B trains as PEFT trains its B.
    for (name, lora) in model
        .linears()
        .filter_map(|l| l.lora.as_ref().map(|a| (&l.name, a)))
    {
        if lora.b_scale != 1.0 && lora.b.requires_grad() {
            if lora.b_scale == 0.0 {
                return Err(Error::Model {
                    what: format!(
                        "layer {name}'s adapter has the scaling 0 (`lora_alpha` 0): it adds \
                         nothing to the layer, and its B, held with the scaling folded in, is \
                         lost, so it cannot train; give the adapter a nonzero lora_alpha"
                    ),
                });
            }
            opt.set_storage_scale(&lora.b, lora.b_scale)?;
        }
    }
    let tape = Tape::new();
    let mut report = FitReport {
        // (Grown step by step: the step count may be large, and nothing is known of it.)
        loss: Vec::new(),
        accuracy: Vec::new(),
        best_accuracy: 0.0,
    };
    for step in 0..steps {
        let (loss, acc) = train_step_with(model, task, &tape, &mut opt, options)?;
        if !loss.is_finite() {
            // Every later step would be NaN too, and so would the adapters. The first step's
            // loss comes before any update: then the model itself overflows, whatever the lr.
            return Err(if step == 0 {
                Error::Input {
                    what: format!(
                        "fit: the loss of the first step, before any update, is {loss}: the \
                         model overflows f32 on fit's task (its weights, not --lr); nothing was \
                         saved"
                    ),
                }
            } else {
                Error::Diverged {
                    step: step + 1,
                    steps,
                    loss,
                    lr,
                }
            });
        }
        report.loss.push(loss);
        report.accuracy.push(acc);
        report.best_accuracy = report.best_accuracy.max(acc);
        on_step(step, loss, acc);
    }
    Ok(report)
}

/// Peak bytes held while training `spec`'s model on the grader's task (`samples` rows) under
/// `options`, everything counted: the model, its adapters, gradients and AdamW state, the batch
/// and the activations. The figure is the counting allocator's peak over two steps (the second
/// runs with every buffer of the first already made) above what was held before the model was
/// built; 0 unless [`crate::memory::CountingAlloc`] is the global allocator.
pub fn measure_train_step_bytes(
    spec: &crate::loader::ModelSpec,
    samples: usize,
    options: TrainOptions,
) -> Result<usize> {
    let before = crate::memory::current();
    let model = spec.build()?;
    let task = FitTask::new(model.dim(), samples, spec.seed);
    let mut opt = AdamW::new(model.trainable_params(), AdamWConfig::default())?;
    let tape = Tape::new();
    crate::memory::reset_peak();
    // Both steps on one worker (see `on_pool_worker`).
    on_pool_worker(|| {
        (0..2).try_for_each(|_| train_step_with(&model, &task, &tape, &mut opt, options).map(drop))
    })?;
    Ok(crate::memory::peak().saturating_sub(before))
}
