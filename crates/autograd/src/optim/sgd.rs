//! SGD with momentum, as PyTorch's `torch.optim.SGD` (dampening 0, no Nesterov).

use super::{check_hyper, load_buffers, zeros_like, Optimizer, OptimizerState};
use crate::error::Result;
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
    /// An optimizer over `params` (those that do not require a gradient are skipped).
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
        let params: Vec<Param> = params.into_iter().filter(|p| p.requires_grad()).collect();
        Ok(Sgd {
            momentum: zeros_like(&params),
            params,
            config,
            step: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        let c = self.config;
        let first = self.step == 0;
        self.step += 1;
        for (p, buf) in self.params.iter().zip(&mut self.momentum) {
            let grad = p.grad();
            let Some(g) = grad.as_ref() else { continue };
            let mut value = p.value_mut();
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
