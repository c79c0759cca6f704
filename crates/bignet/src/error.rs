//! The error type of the whole `nibble-bignet` crate.
//!
//! One enum for the crate: every variant names the file it is about and, where relevant, the
//! tensor key and the expected / found shape or dtype, so that a message alone is enough to find
//! the fault. New subsystems (model, CLI) add their own variants here.

use std::path::PathBuf;

use thiserror::Error;

use nibble_io::DType;

/// Everything that can go wrong in `nibble-bignet`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused a read, write, rename or map.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What was being done ("open", "map", "write", "rename", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor that the caller asked for is not in the file.
    #[error("{}: no tensor named `{key}`", path.display())]
    MissingKey {
        /// The file involved.
        path: PathBuf,
        /// The key asked for.
        key: String,
    },
    /// A tensor whose stored description or data is inconsistent (offsets, sizes, strides).
    #[error("{}: tensor `{key}`: {reason}", path.display())]
    BadTensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor whose dtype is not one the caller can use.
    #[error("{}: tensor `{key}`: expected dtype {expected}, found {found}", path.display())]
    DType {
        /// The file involved.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The dtype(s) accepted, e.g. "f32 or f16".
        expected: String,
        /// The dtype stored.
        found: DType,
    },
    /// A tensor whose shape is not the one the caller expects.
    #[error("{}: tensor `{key}`: expected shape {expected:?}, found {found:?}", path.display())]
    Shape {
        /// The file involved.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The shape asked for.
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
    },
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
    /// A LoRA adapter directory that cannot be read or does not fit the model.
    #[error("{}: adapter: {what}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Quantizing or loading a quantized weight failed.
    #[error("weight `{key}`: {source}")]
    Quant {
        /// The weight's state-dict key.
        key: String,
        /// The quant crate's error.
        #[source]
        source: nibble_quant::QuantError,
    },
    /// Reading or writing a state dict failed (the inner error names file, key, shape, dtype).
    #[error(transparent)]
    State(#[from] nibble_io::Error),
    /// A generic layer failed (building, running or loading its adapter).
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
