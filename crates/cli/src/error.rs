//! The error type of the `nibble` program: the library crates' errors (which name file, key,
//! shape and dtype) and the program's own (arguments, files it refuses to touch).

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in `nibble`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a state dict, checkpoint or data file failed.
    #[error(transparent)]
    Io(#[from] nibble_io::Error),
    /// Building, running or training the model failed.
    #[error(transparent)]
    Nn(#[from] nibble_nn::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] nibble_tensor::TensorError),
    /// Recording, differentiating or optimizing failed.
    #[error(transparent)]
    Autograd(#[from] nibble_autograd::AutogradError),
    /// An argument that cannot be used (named, with the reason).
    #[error("{arg}: {what}")]
    Usage {
        /// The argument (`--include`, `--format`, ...).
        arg: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// A verb would write over one of its own inputs.
    #[error("{}: refusing to write over an input of this command ({what})", path.display())]
    WouldOverwrite {
        /// The output path.
        path: PathBuf,
        /// Which input it is.
        what: String,
    },
    /// `quantize` was given a checkpoint whose layers are already quantized: re-quantizing
    /// would quantize their codes and scales as if they were weights.
    #[error(
        "{}: {key} is already quantized ({format}); quantize the f32/f16 checkpoint",
        path.display()
    )]
    AlreadyQuantized {
        /// The checkpoint.
        path: PathBuf,
        /// A quantized weight's key.
        key: String,
        /// Its format (`q4`, `bitsandbytes fp4, blocks of 64`, ...).
        format: String,
    },
    /// A weight `quantize` cannot store: NaN or infinite, or beyond what the format can
    /// represent (it would be written as inf or NaN).
    #[error("{}: `{key}` row {row}, column {col}: {what}", path.display())]
    Weight {
        /// The checkpoint.
        path: PathBuf,
        /// The weight's key.
        key: String,
        /// Row of the element.
        row: usize,
        /// Column of the element.
        col: usize,
        /// The value and what is wrong with it.
        what: String,
    },
    /// Training diverged: a step's loss was NaN or infinite (the learning rate is too high
    /// for the model, most often). Every later step, and the adapter, would be NaN too.
    #[error(
        "--lr: {lr:?}: training diverged: the loss is {loss} at step {step} of {steps}; \
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
    /// The operating system refused a file operation of the program itself.
    #[error("{}: {op}: {source}", path.display())]
    File {
        /// The file involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of the `nibble` program.
pub type Result<T> = std::result::Result<T, Error>;
