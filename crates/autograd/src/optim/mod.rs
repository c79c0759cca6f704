//! Optimizers with PyTorch's semantics: [`Sgd`] (with momentum) and [`AdamW`], and a state that
//! can be saved and restored ([`OptimizerState`]).

pub mod adamw;
pub mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};

use crate::error::{AutogradError, Result};
use crate::param::Param;
use nibble_tensor::Tensor;

/// What every optimizer does. `Send`, so that a training step can run on a worker of the
/// rayon pool.
pub trait Optimizer: Send {
    /// Updates every parameter that has a gradient.
    fn step(&mut self) -> Result<()>;
    /// Drops the gradients of the optimizer's parameters.
    fn zero_grad(&mut self);
    /// The optimizer's buffers and step count, as named tensors.
    fn state(&self) -> OptimizerState;
    /// Restores what [`Optimizer::state`] returned (names and shapes must match).
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// An optimizer's state: its step count and named buffers (e.g. `exp_avg.<param name>`), ready
/// to be written to a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Steps taken.
    pub step: u64,
    /// Buffers, by name.
    pub tensors: Vec<(String, Tensor)>,
}

impl OptimizerState {
    /// The buffer called `name`, checked against `shape`; an error if the state holds two
    /// buffers of that name (which one is meant cannot be told).
    pub(crate) fn take(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let mut found = self.tensors.iter().filter(|(n, _)| n == name);
        let first = found.next();
        if first.is_some() && found.next().is_some() {
            return Err(AutogradError::State {
                what: format!("buffer {name} appears more than once"),
            });
        }
        match first {
            None => Ok(None),
            Some((_, t)) if t.shape() == shape => Ok(Some(t.clone())),
            Some((_, t)) => Err(AutogradError::State {
                what: format!(
                    "buffer {name}: expected shape {shape:?}, found {:?}",
                    t.shape()
                ),
            }),
        }
    }
}

/// Checks a hyper-parameter lies in `range`.
pub(crate) fn check_hyper(
    optimizer: &'static str,
    name: &'static str,
    value: f64,
    ok: bool,
) -> Result<()> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(AutogradError::HyperParameter {
            optimizer,
            name,
            value,
        })
    }
}

/// The parameters an optimizer keeps (those that require a gradient), checked to be distinct:
/// the same parameter given twice would be updated twice per step, and two parameters of one
/// name would share their buffers in [`Optimizer::state`] (saved and loaded by name). Either
/// is [`AutogradError::InvalidInput`] naming `op` and the parameter.
pub(crate) fn distinct_params(op: &'static str, params: Vec<Param>) -> Result<Vec<Param>> {
    let params: Vec<Param> = params.into_iter().filter(|p| p.requires_grad()).collect();
    let mut seen: std::collections::HashMap<&str, &Param> =
        std::collections::HashMap::with_capacity(params.len());
    for p in &params {
        if let Some(prev) = seen.insert(p.name(), p) {
            let what = if prev.same_as(p) {
                format!("parameter {} is given twice", p.name())
            } else {
                format!(
                    "two parameters are named {} (the optimizer's state is saved and loaded by \
                     name)",
                    p.name()
                )
            };
            return Err(AutogradError::InvalidInput { op, what });
        }
    }
    Ok(params)
}

/// Checks, before a step updates anything, that every parameter's gradient (where it has one)
/// and its buffers (one slice per kind of buffer, one tensor per parameter, named
/// `<kind>.<param name>`) have the shape of its value: a mismatch is an error naming `op`, the
/// parameter and both shapes (the step's zipped loops would otherwise update part of it).
pub(crate) fn check_step_shapes(
    op: &'static str,
    params: &[Param],
    bufs: &[(&str, &[Tensor])],
) -> Result<()> {
    for (i, p) in params.iter().enumerate() {
        let shape = p.value().shape().to_vec();
        if let Some(g) = p.grad().as_ref() {
            if g.shape() != shape.as_slice() {
                return Err(AutogradError::InvalidInput {
                    op,
                    what: format!(
                        "parameter {}: gradient of shape {:?} for a value of shape {shape:?}",
                        p.name(),
                        g.shape()
                    ),
                });
            }
        }
        for (kind, b) in bufs {
            let found = b.get(i).map(|t| t.shape());
            if found != Some(shape.as_slice()) {
                return Err(AutogradError::State {
                    what: format!(
                        "buffer {kind}.{}: shape {found:?} for a value of shape {shape:?}",
                        p.name()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The step count after one more step, or an error where it would overflow (a loaded state's).
pub(crate) fn next_step(step: u64) -> Result<u64> {
    step.checked_add(1).ok_or_else(|| AutogradError::State {
        what: format!("step count {step} cannot be incremented"),
    })
}

/// One buffer per parameter, zero-initialised lazily.
pub(crate) fn zeros_like(params: &[Param]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| Tensor::zeros(p.value().shape()))
        .collect()
}

/// Loads buffers `<prefix>.<param name>` from `state` into `bufs` (all or nothing).
pub(crate) fn load_buffers(
    state: &OptimizerState,
    prefix: &str,
    params: &[Param],
    bufs: &mut [Tensor],
) -> Result<()> {
    let mut loaded = Vec::with_capacity(params.len());
    for p in params {
        let name = format!("{prefix}.{}", p.name());
        let shape = p.value().shape().to_vec();
        loaded.push(
            state
                .take(&name, &shape)?
                .ok_or_else(|| AutogradError::State {
                    what: format!("missing buffer {name}"),
                })?,
        );
    }
    bufs.iter_mut().zip(loaded).for_each(|(b, l)| *b = l);
    Ok(())
}
