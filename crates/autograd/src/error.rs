//! The autograd crate's error type.

use nibble_tensor::TensorError;
use thiserror::Error;

/// Everything that can go wrong while recording, differentiating or optimizing.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AutogradError {
    /// A tensor operation failed (shape mismatch, ...); the inner error names the op.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// A [`Var`](crate::Var) recorded on a tape that has since been cleared or run backward.
    #[error(
        "{op}: the variable belongs to an earlier use of the tape (it was cleared or backward ran)"
    )]
    StaleVar {
        /// The operation that received the stale variable.
        op: &'static str,
    },
    /// `backward` needs a one-element loss.
    #[error("backward: the loss must have one element, found shape {shape:?}")]
    NonScalarLoss {
        /// Shape of the value passed as the loss.
        shape: Vec<usize>,
    },
    /// A custom op's backward returned the wrong number of gradients or a mis-shaped one.
    #[error("{op}: backward returned {what}")]
    BadGradient {
        /// The op's name.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
    /// Input an op cannot use (a label out of range, a label count that does not match, ...).
    #[error("{op}: {what}")]
    InvalidInput {
        /// The op.
        op: &'static str,
        /// What is wrong, naming the index and the values.
        what: String,
    },
    /// Optimizer state that does not fit the optimizer's parameters.
    #[error("optimizer state: {what}")]
    State {
        /// What did not fit (parameter name, expected and found shapes).
        what: String,
    },
    /// An invalid hyper-parameter (negative learning rate, beta outside [0, 1), ...).
    #[error("{optimizer}: invalid hyper-parameter {name} = {value}")]
    HyperParameter {
        /// The optimizer.
        optimizer: &'static str,
        /// The hyper-parameter's name.
        name: &'static str,
        /// The value given.
        value: f64,
    },
}

/// Result alias for the autograd crate.
pub type Result<T, E = AutogradError> = std::result::Result<T, E>;
