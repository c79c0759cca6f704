//! The error type of the `nibble-nn` crate.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in `nibble-nn`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a state dict failed (the inner error names file, key, shape, dtype).
    #[error(transparent)]
    State(#[from] nibble_io::Error),
    /// A state dict that does not describe the layers asked for (non-`Sequential` keys, a
    /// missing bias, shapes that do not chain, ...).
    #[error("{}: {what}", file.display())]
    Structure {
        /// The state-dict file.
        file: PathBuf,
        /// What is wrong, naming the key and shapes.
        what: String,
    },
    /// A layer used in a way it does not support (wrong input width, LoRA on nothing, ...).
    #[error("layer `{layer}`: {what}")]
    Layer {
        /// The layer's name.
        layer: String,
        /// What is wrong.
        what: String,
    },
    /// The operating system refused a read, write or directory creation.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A LoRA adapter directory that cannot be read or does not fit the model.
    #[error("{}: adapter: {what}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A parameter or running statistic (of a model or of an adapter file) holding NaN or an
    /// infinity: it would turn every output it touches into NaN.
    #[error("{}: `{key}` holds {value} at {at}: parameters must be finite", file.display())]
    NonFinite {
        /// The file holding the tensor.
        file: PathBuf,
        /// The tensor's key in the file.
        key: String,
        /// Where: `(row r, col c)` for a matrix, `index i` otherwise.
        at: String,
        /// The value found (NaN, inf or -inf).
        value: f32,
    },
    /// Quantizing a weight failed.
    #[error("weight `{key}`: {source}")]
    Quant {
        /// The weight's state-dict key.
        key: String,
        /// The quant crate's error.
        #[source]
        source: nibble_quant::QuantError,
    },
    /// A tensor operation failed (the inner error names the op and shapes).
    #[error(transparent)]
    Compute(#[from] nibble_tensor::TensorError),
    /// Recording, differentiating or optimizing failed.
    #[error(transparent)]
    Autograd(#[from] nibble_autograd::AutogradError),
}

/// Result alias of the `nibble-nn` crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An [`Error::NonFinite`] naming `file`, `key` and the first NaN or infinite element of `t`
/// (by row and column for a matrix), or `Ok` if every element is finite.
pub fn check_finite(file: &std::path::Path, key: &str, t: &nibble_tensor::Tensor) -> Result<()> {
    match t.first_non_finite() {
        None => Ok(()),
        Some((at, value)) => Err(Error::NonFinite {
            file: file.to_path_buf(),
            key: key.to_string(),
            at,
            value,
        }),
    }
}
