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
    /// The buffer called `name`, checked against `shape`.
    pub(crate) fn take(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        match self.tensors.iter().find(|(n, _)| n == name) {
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
