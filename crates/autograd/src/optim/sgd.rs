//! SGD with momentum, as PyTorch's `torch.optim.SGD` (dampening 0, no Nesterov).

use super::{
    check_hyper, check_step_shapes, distinct_params, load_buffers, next_step, zeros_like,
    Optimizer, OptimizerState,
};
use crate::error::{AutogradError, Result};
use crate::param::Param;
use nibble_tensor::Tensor;

/// SGD's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 disables momentum).
    pub momentum: f32,
    /// L2 penalty added to the gradient (PyTorch's coupled `weight_decay`).
    pub weight_decay: f32,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-2,
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }
}

/// `g += wd·p; buf = momentum·buf + g (buf = g at the first step); p -= lr·buf`.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<Param>,
    config: SgdConfig,
    step: u64,
    momentum: Vec<Tensor>,
}

impl Sgd {
    /// An optimizer over `params` (those that do not require a gradient are skipped). An
    /// error for an invalid hyper-parameter, and for a parameter given twice or two parameters
    /// of one name ([`AutogradError::InvalidInput`] naming it): the state is saved and loaded
    /// by name, and a parameter given twice would be updated twice per step.
    pub fn new(params: Vec<Param>, config: SgdConfig) -> Result<Self> {
        check_hyper("SGD", "lr", config.lr as f64, config.lr >= 0.0)?;
        check_hyper(
            "SGD",
            "momentum",
            config.momentum as f64,
            config.momentum >= 0.0,
        )?;
        check_hyper(
            "SGD",
            "weight_decay",
            config.weight_decay as f64,
            config.weight_decay >= 0.0,
        )?;
        let params = distinct_params("SGD::new", params)?;
        Ok(Sgd {
            momentum: zeros_like(&params),
            params,
            config,
            step: 0,
        })
    }
}

impl Optimizer for Sgd {
    /// One SGD update of every parameter that has a gradient. Before anything is updated,
    /// every gradient and momentum buffer is checked to have its parameter's shape (an error
    /// naming the parameter and both shapes otherwise, nothing updated, the step count kept).
    fn step(&mut self) -> Result<()> {
        check_step_shapes("SGD::step", &self.params, &[("momentum", &self.momentum)])?;
        let c = self.config;
        let first = self.step == 0;
        self.step = next_step(self.step)?;
        for (p, buf) in self.params.iter().zip(&mut self.momentum) {
            let grad = p.grad();
            let Some(g) = grad.as_ref() else { continue };
            let mut value = p.value_mut();
            // Checked above; again under the locks (a gradient or value swapped in between).
            let shape = value.shape();
            if g.shape() != shape || buf.shape() != shape {
                return Err(AutogradError::InvalidInput {
                    op: "SGD::step",
                    what: format!(
                        "parameter {}: gradient {:?} and momentum {:?} for a value of shape \
                         {shape:?}",
                        p.name(),
                        g.shape(),
                        buf.shape()
                    ),
                });
            }
            for ((w, &g), b) in value
                .data_mut()
                .iter_mut()
                .zip(g.data())
                .zip(buf.data_mut())
            {
                let mut d = g + c.weight_decay * *w;
                if c.momentum != 0.0 {
                    *b = if first { d } else { c.momentum * *b + d };
                    d = *b;
                }
                *w -= c.lr * d;
            }
        }
        Ok(())
    }

    fn zero_grad(&mut self) {
        self.params.iter().for_each(Param::zero_grad);
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            step: self.step,
            tensors: self
                .params
                .iter()
                .zip(&self.momentum)
                .map(|(p, b)| (format!("momentum.{}", p.name()), b.clone()))
                .collect(),
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let mut bufs = self.momentum.clone();
        load_buffers(state, "momentum", &self.params, &mut bufs)?;
        self.momentum = bufs;
        self.step = state.step;
        Ok(())
    }
}
