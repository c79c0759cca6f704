//! The tensor crate's error type.

use thiserror::Error;

/// Everything that can go wrong in a tensor operation. Each variant names the op and the
/// shapes involved, so that a user can find the faulty call without a debugger.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TensorError {
    /// Two operands whose shapes do not fit together.
    #[error("{op}: shape mismatch between {lhs:?} and {rhs:?}")]
    ShapeMismatch {
        /// The operation that was attempted.
        op: &'static str,
        /// Shape of the first operand.
        lhs: Vec<usize>,
        /// Shape of the second operand.
        rhs: Vec<usize>,
    },
    /// A tensor of the wrong rank (e.g. a vector where a matrix is needed).
    #[error("{op}: expected a tensor of rank {expected}, found shape {found:?}")]
    Rank {
        /// The operation that was attempted.
        op: &'static str,
        /// The rank the operation needs.
        expected: usize,
        /// The shape it was given.
        found: Vec<usize>,
    },
    /// A buffer whose length is not the product of the shape.
    #[error("{op}: shape {shape:?} needs {expected} elements, the buffer has {found}")]
    Length {
        /// The operation that was attempted.
        op: &'static str,
        /// The requested shape.
        shape: Vec<usize>,
        /// The element count the shape implies.
        expected: usize,
        /// The element count found.
        found: usize,
    },
    /// A shape whose element count overflows `usize`.
    #[error("{op}: the element count of shape {shape:?} overflows")]
    Overflow {
        /// The operation that was attempted.
        op: &'static str,
        /// The offending shape.
        shape: Vec<usize>,
    },
    /// A buffer the memory allocator cannot give (more bytes than the address space or the
    /// machine holds).
    #[error("{op}: cannot allocate {bytes} bytes for shape {shape:?}")]
    Alloc {
        /// The operation that was attempted.
        op: &'static str,
        /// The requested shape.
        shape: Vec<usize>,
        /// The bytes asked for (saturated at `usize::MAX`).
        bytes: usize,
    },
    /// An index or range outside the tensor.
    #[error("{op}: range {start}..{end} is outside 0..{len}")]
    OutOfRange {
        /// The operation that was attempted.
        op: &'static str,
        /// Start of the requested range.
        start: usize,
        /// End of the requested range.
        end: usize,
        /// Length of the axis.
        len: usize,
    },
    /// An argument with an invalid value (a zero-sized group, a negative scale, ...).
    #[error("{op}: invalid argument: {what}")]
    Invalid {
        /// The operation that was attempted.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
}

/// Result alias for tensor operations.
pub type Result<T, E = TensorError> = std::result::Result<T, E>;

/// Checks that a buffer of `found` elements fills `shape` exactly: [`TensorError::Overflow`]
/// or [`TensorError::Length`] naming `op` otherwise.
pub fn check_len(op: &'static str, shape: &[usize], found: usize) -> Result<()> {
    let expected = checked_numel(op, shape)?;
    if expected != found {
        return Err(TensorError::Length {
            op,
            shape: shape.to_vec(),
            expected,
            found,
        });
    }
    Ok(())
}

/// [`TensorError::Alloc`] for `n` elements of `T` in `shape`.
pub(crate) fn alloc_error<T>(op: &'static str, shape: &[usize], n: usize) -> TensorError {
    TensorError::Alloc {
        op,
        shape: shape.to_vec(),
        bytes: n.saturating_mul(std::mem::size_of::<T>()),
    }
}

/// Product of `shape`, or [`TensorError::Overflow`] naming `op`. A shape with a dimension of
/// 0 holds 0 elements whatever its other dimensions (`[2^62, 4, 0]`, as PyTorch takes it).
///
/// ```
/// use nibble_tensor::error::checked_numel;
/// assert_eq!(checked_numel("t", &[1 << 62, 4, 0]).unwrap(), 0);
/// assert!(checked_numel("t", &[1 << 62, 4, 1]).is_err());
/// ```
pub fn checked_numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    if shape.contains(&0) {
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TensorError::Overflow {
            op,
            shape: shape.to_vec(),
        })
}
