//! The crate's single error type.

use nibble_tensor::TensorError;
use thiserror::Error;

/// Everything that can go wrong while quantizing, loading or multiplying a quantized weight.
/// Each variant names the operation and the offending key, shape, position or value.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    /// A NaN or infinite weight: quantizing it would give a meaningless code.
    #[error("{op}: non-finite weight {value} at (row {row}, col {col})")]
    NonFinite {
        /// The operation that was attempted.
        op: &'static str,
        /// Row of the weight.
        row: usize,
        /// Column of the weight.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// A block scale too large for its storage type (e.g. a Q4 norm that f16 rounds to infinity, 65520 or more).
    #[error("{op}: block scale {value} of the block starting at (row {row}, col {col}) overflows {storage}")]
    ScaleOverflow {
        /// The operation that was attempted.
        op: &'static str,
        /// Row of the block.
        row: usize,
        /// First column of the block.
        col: usize,
        /// The scale that does not fit.
        value: f32,
        /// The storage type of the scale.
        storage: &'static str,
    },
    /// A finite weight the format cannot store: the weight itself, or a scale or minimum
    /// derived from it, overflows its storage type (an f16 weight beyond ±65504, an int8 row
    /// whose range overflows f32, a group minimum or scale beyond f16's range), so that
    /// elements would be stored as infinities or NaN.
    #[error("{op}: (row {row}, col {col}) would be stored as inf or NaN in {storage}: {what}")]
    Overflow {
        /// The operation that was attempted.
        op: &'static str,
        /// Row of the first element that would be stored non-finite.
        row: usize,
        /// Column of that element (for a row or group that overflows, its first column).
        col: usize,
        /// The weight that overflows (of a row or group, the one of largest magnitude; `what`
        /// names its column).
        value: f32,
        /// The storage type that overflows (`f16`, `f32`).
        storage: &'static str,
        /// What overflows, naming the weight, and the group where there is one.
        what: String,
    },
    /// A dimension that the format cannot hold (e.g. `in` not a multiple of the block size).
    #[error("{op}: shape {shape:?} is not supported: {what}")]
    Shape {
        /// The operation that was attempted.
        op: &'static str,
        /// The shape given.
        shape: Vec<usize>,
        /// Why it is refused.
        what: String,
    },
    /// A part handed to `from_parts` whose byte length is wrong.
    #[error("{op}: part `{part}` of a {out}x{inn} matrix needs {expected} bytes, found {found}")]
    PartLength {
        /// The operation that was attempted.
        op: &'static str,
        /// Name of the part (`packed`, `norm`, `absmax`, ...).
        part: &'static str,
        /// Rows of the matrix.
        out: usize,
        /// Columns of the matrix.
        inn: usize,
        /// Expected byte length.
        expected: usize,
        /// Byte length found.
        found: usize,
    },
    /// A part whose content is invalid (e.g. a bit width other than 3 or 4).
    #[error("{op}: invalid value in part `{part}` at index {index}: {what}")]
    PartValue {
        /// The operation that was attempted.
        op: &'static str,
        /// Name of the part.
        part: &'static str,
        /// Index of the offending element.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A byte range outside the shared buffer it should borrow from.
    #[error("{op}: range {start}..{end} is outside a buffer of {len} bytes")]
    Range {
        /// The operation that was attempted.
        op: &'static str,
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// An error from the tensor crate (shapes of operands, ...).
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// `v` for a message: plain for moderate magnitudes, in exponent form for huge or tiny ones
/// (`3e38`, not 39 digits).
pub(crate) fn number(v: f32) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// Result alias for the quant crate.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

impl From<QuantError> for TensorError {
    fn from(e: QuantError) -> Self {
        match e {
            QuantError::Tensor(t) => t,
            other => TensorError::Invalid {
                op: "quant",
                what: other.to_string(),
            },
        }
    }
}
