#![warn(missing_docs)]
//! # nibble-autograd
//!
//! A tape that records ops only when an input needs a gradient ([`Tape`], [`Var`]), parameters
//! shared between models and optimizers ([`Param`]), ops with gradients (linear — trainable or
//! frozen over any [`WeightMatrix`](nibble_tensor::WeightMatrix) —, add, ReLU, GELU, tanh,
//! sigmoid, SiLU, tanh-GELU, LeakyReLU, ELU, Softplus, Mish, Hardswish, ReLU6 ([`UnaryFn`]), LayerNorm, sum, mean, BCE-with-logits, softmax
//! cross-entropy, MSE), a public [`Op`] trait for other crates' ops, and the [`Sgd`] and
//! [`AdamW`] optimizers with PyTorch's semantics.

pub mod error;
pub mod ops;
pub mod optim;
pub mod param;
pub mod tape;

pub use error::{AutogradError, Result};
pub use ops::{Bias, Coef, UnaryFn};
pub use optim::{AdamW, AdamWConfig, Optimizer, OptimizerState, Sgd, SgdConfig};
pub use param::Param;
pub use tape::{Gradients, Op, OpTime, Pending, Tape, Var};
