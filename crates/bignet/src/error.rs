//! TEMP (dev worktree): merged with the checkpoint error enum at integration.
use thiserror::Error;
/// Errors.
#[derive(Debug, Error)]
pub enum Error {
    /// Model construction.
    #[error("model: {what}")]
    Model { what: String },
    /// Bad input.
    #[error("input: {what}")]
    Input { what: String },
    /// Tensor.
    #[error(transparent)]
    Tensor(#[from] nibble_tensor::TensorError),
    /// Autograd.
    #[error(transparent)]
    Autograd(#[from] nibble_autograd::AutogradError),
}
/// Result.
pub type Result<T> = std::result::Result<T, Error>;
