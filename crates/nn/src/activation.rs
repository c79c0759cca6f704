//! Parameter-free activations.

use crate::error::Result;
use nibble_autograd::{Tape, Var};
use std::fmt;
use std::str::FromStr;

/// An elementwise activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)` (`nn.ReLU`).
    Relu,
    /// `x · Φ(x)`, the exact erf form (`nn.GELU()`, PyTorch's default).
    Gelu,
}

impl Activation {
    /// Applies the activation on `tape`.
    pub fn forward(self, tape: &Tape, x: &Var) -> Result<Var> {
        Ok(match self {
            Activation::Relu => tape.relu(x)?,
            Activation::Gelu => tape.gelu(x)?,
        })
    }

    /// The name (`relu`, `gelu`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            _ => Err(format!("unknown activation `{s}` (expected relu or gelu)")),
        }
    }
}
