//! The error type of the whole `nibble-io` crate.
//!
//! One enum for the crate: every variant names the file it is about and, where relevant, the
//! tensor key and the expected / found shape or dtype, so that a message alone is enough to find
//! the fault.

use std::path::PathBuf;

use thiserror::Error;

use crate::checkpoint::{DType, Format};

/// Everything that can go wrong in `nibble-io`.
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
    /// The content is neither a safetensors file nor a PyTorch zip checkpoint.
    #[error("{}: unrecognised checkpoint format: {reason}", path.display())]
    UnknownFormat {
        /// The file involved.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The file's structure is broken (truncated, out-of-range offsets, invalid header, ...).
    #[error("{}: malformed {format} file: {reason}", path.display())]
    Malformed {
        /// The file involved.
        path: PathBuf,
        /// The format it was read as.
        format: Format,
        /// What is wrong.
        reason: String,
    },
    /// A zip entry of a `.pth` archive is unusable (compressed, out of range, unsafe name, ...).
    #[error("{}: zip entry `{entry}`: {reason}", path.display())]
    ZipEntry {
        /// The file involved.
        path: PathBuf,
        /// The entry's name as stored in the archive (lossily decoded).
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// The pickle program (`data.pkl`) of a `.pth` archive is invalid or outside the supported
    /// subset.
    #[error("{}: pickle `{entry}` at byte {offset}: {reason}", path.display())]
    Pickle {
        /// The file involved.
        path: PathBuf,
        /// The pickle's entry name in the archive.
        entry: String,
        /// Byte offset of the offending opcode within the pickle.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// Two tensors (or two metadata entries) share one name.
    #[error("{}: duplicate key `{key}`", path.display())]
    DuplicateKey {
        /// The file involved.
        path: PathBuf,
        /// The repeated key.
        key: String,
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
    /// A dtype name this crate does not know.
    #[error("{}: tensor `{key}`: unknown dtype `{found}`", path.display())]
    UnknownDType {
        /// The file involved.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The dtype name found.
        found: String,
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
    /// Building a tensor from checkpoint data failed in `nibble-tensor`.
    #[error("{}: tensor `{key}`: {source}", path.display())]
    Tensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// The tensor crate's error.
        #[source]
        source: nibble_tensor::TensorError,
    },
    /// The caller passed tensors that cannot be written (length mismatch, reserved or repeated
    /// name, ...).
    #[error("{}: cannot write tensor `{key}`: {reason}", path.display())]
    InvalidWrite {
        /// The file that was to be written.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// What is wrong.
        reason: String,
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
    /// An element of a weight that its storage format cannot hold: NaN or infinite, beyond
    /// f16's range, or making its row's or block's scale or minimum overflow (it would be
    /// stored as inf or NaN).
    #[error("weight `{key}` row {row}, column {col}: {}", source)]
    Unstorable {
        /// The weight's state-dict key.
        key: String,
        /// Row of the first element that would be stored non-finite.
        row: usize,
        /// Its column (for a row or group that overflows, the first column).
        col: usize,
        /// The weight at fault (NaN, infinite, or the one that overflows).
        value: f32,
        /// The quant crate's error, naming the format and what overflows (boxed: it keeps
        /// this crate's error small).
        #[source]
        source: Box<nibble_quant::QuantError>,
    },
    /// A weight cannot be stored or read as asked (e.g. f32, which is not a frozen format).
    #[error("weight `{key}`: {what}")]
    Unsupported {
        /// The weight's state-dict key.
        key: String,
        /// What is wrong.
        what: String,
    },
    /// A data file whose content does not fit what it must hold (labels out of range, NaN
    /// features, x and y of different lengths, a feature count that is not the model's, ...).
    #[error(
        "{}: tensor `{key}`{}: {what}",
        path.display(),
        index.map(|i| format!(" at index {i}")).unwrap_or_default()
    )]
    Data {
        /// The file involved.
        path: PathBuf,
        /// The tensor's key (`x_test`, `y_train`, ...).
        key: String,
        /// The element (flat index) or row at fault, if one is.
        index: Option<usize>,
        /// The expected and the found value: `expected ..., found ...`.
        what: String,
    },
}

/// Result alias of the `nibble-io` crate.
pub type Result<T> = std::result::Result<T, Error>;
