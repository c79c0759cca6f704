//! LayerNorm over the last dimension (PyTorch's `nn.LayerNorm(dim)`, eps 1e-5) of `[batch, dim]`
//! inputs.

use crate::error::{Error, Result};
use nibble_autograd::{Param, Tape, Var};
use nibble_tensor::Tensor;

/// A LayerNorm with an affine weight and bias `[dim]`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// The module's name (`2`, `model.norm`, ...).
    pub name: String,
    /// `weight` `[dim]`.
    pub weight: Param,
    /// `bias` `[dim]`.
    pub bias: Param,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// PyTorch's default epsilon.
    pub const DEFAULT_EPS: f32 = 1e-5;

    /// A LayerNorm named `name` from its weight and bias (both `[dim]`), trainable.
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Tensor) -> Result<Self> {
        let name = name.into();
        if weight.shape().len() != 1 || weight.shape() != bias.shape() {
            return Err(Error::Layer {
                layer: name,
                what: format!(
                    "LayerNorm weight and bias must both be [dim], found {:?} and {:?}",
                    weight.shape(),
                    bias.shape()
                ),
            });
        }
        Ok(LayerNorm {
            weight: Param::new(format!("{name}.weight"), weight, true),
            bias: Param::new(format!("{name}.bias"), bias, true),
            name,
            eps: Self::DEFAULT_EPS,
        })
    }

    /// The normalized width.
    pub fn dim(&self) -> usize {
        self.weight.value().numel()
    }

    /// Normalizes each row of `x` `[batch, dim]`.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(tape.layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }

    /// The weight and bias.
    pub fn params(&self) -> Vec<Param> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}
