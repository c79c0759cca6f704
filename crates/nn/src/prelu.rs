//! PReLU (PyTorch's `nn.PReLU(n)`): a learned negative slope per feature, or one for all.

use crate::error::Result;
use nibble_autograd::{Param, Tape, Var};

/// `nn.PReLU(num_parameters)`: `weight` `[n]`, `n` the width or 1. In a state dict it is a 1-D
/// `weight` without a bias, like a LayerNorm without one or an RMSNorm, so a reader must be told
/// ([`crate::NormKind::PRelu`]).
#[derive(Debug, Clone)]
pub struct PRelu {
    /// The module's name (`3`, ...).
    pub name: String,
    /// The slopes, `[n]`.
    pub weight: Param,
}

impl PRelu {
    /// Applies the slopes to the non-positive elements of `x` `[batch, d]` (`d` = the number of
    /// slopes, or any with one slope).
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(tape.prelu(x, &self.weight)?)
    }

    /// The number of slopes.
    pub fn slopes(&self) -> usize {
        self.weight.value().numel()
    }
}
