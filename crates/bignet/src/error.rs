//! The error type of the whole `nibble-bignet` crate.
//!
//! One enum for the crate: every variant names what it is about (the model, the input, the
//! file, key and shape), so that a message alone is enough to find the fault. Faults of a file
//! itself (I/O, a missing key, a wrong dtype or shape) are `nibble-io`'s errors, wrapped as
//! [`Error::State`], and faults of a layer, a quantized weight or an adapter are `nibble-nn`'s,
//! wrapped as [`Error::Layers`], rather than repeated here. New subsystems (model, CLI) add
//! their own variants here.

use thiserror::Error;

/// Everything that can go wrong in `nibble-bignet`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A model cannot be built or used as asked (missing weights, wrong variant for an action).
    #[error("model: {what}")]
    Model {
        /// What is wrong.
        what: String,
    },
    /// Input data that does not fit the model (wrong width, missing tensor).
    #[error("input: {what}")]
    Input {
        /// What is wrong.
        what: String,
    },
    /// Training diverged: a step's loss was NaN or infinite (the learning rate is too high for
    /// the model, most often). Every later step, and any adapter saved, would be NaN too.
    #[error(
        "fit: training diverged: the loss is {loss} at step {step} of {steps} (--lr {lr:?}); \
         nothing was saved; try a lower --lr"
    )]
    Diverged {
        /// The step (from 1) whose loss was not finite.
        step: usize,
        /// The steps asked for.
        steps: usize,
        /// The loss (NaN, inf or -inf).
        loss: f32,
        /// The learning rate.
        lr: f32,
    },
    /// Reading or writing a state dict failed (the inner error names file, key, shape, dtype).
    #[error(transparent)]
    State(#[from] nibble_io::Error),
    /// A generic layer failed (building, running, quantizing, or saving or loading its
    /// adapter).
    #[error(transparent)]
    Layers(#[from] nibble_nn::Error),
    /// A tensor operation failed while computing (the inner error names the op and shapes).
    #[error(transparent)]
    Compute(#[from] nibble_tensor::TensorError),
    /// Recording, differentiating or optimizing failed.
    #[error(transparent)]
    Autograd(#[from] nibble_autograd::AutogradError),
}

/// Result alias of the `nibble-bignet` crate.
pub type Result<T> = std::result::Result<T, Error>;
