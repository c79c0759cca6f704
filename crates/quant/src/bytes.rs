//! [`Bytes`]: an immutable byte buffer that is either owned or borrowed from a shared buffer
//! (typically a memory-mapped checkpoint), so that quantized weights load without copying.
//!
//! Owned buffers start on a 64-byte cache line (they live in a [`WeightBuf`]): the kernels'
//! 512-bit loads of a row of codes then never straddle two lines (a `Vec`'s large storage sits
//! 16 bytes into its pages). On the 2-core Xeon the int8 format's batch-1 forward with int8
//! activations went from 0.372 to 0.359 ms (medians of six rounds in turns); a model whose
//! codes were mapped from a file 40 bytes into a line ran no slower than that (0.344–0.349 ms),
//! so the gain may owe as much to where the buffers land as to the split loads. Borrowed bytes
//! stay where their file put them.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use nibble_tensor::buffer::WeightBuf;

use crate::error::{QuantError, Result};

/// The alignment of owned buffers: one cache line.
pub(crate) const LINE: usize = 64;

/// The owner of a shared buffer: anything that derefs to bytes and can cross threads
/// (`Vec<u8>`, `memmap2::Mmap`, ...).
pub type SharedOwner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// An immutable byte buffer: an owned allocation or a range of a shared buffer.
///
/// Owned buffers start on a 64-byte line (so typed views of them never need a copy): see the
/// [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use nibble_quant::Bytes;
/// let file: Arc<Vec<u8>> = Arc::new((0u8..10).collect());
/// let b = Bytes::from_shared(file, 2..6).unwrap();
/// assert_eq!(b.as_slice(), &[2, 3, 4, 5]);
/// assert!(b.is_shared());
/// assert_eq!(Bytes::from_vec(vec![7, 8]).as_slice(), &[7, 8]);
/// ```
#[derive(Clone)]
pub struct Bytes {
    owner: SharedOwner,
    range: Range<usize>,
    shared: bool,
}

/// Line-aligned owned storage.
struct Lines(WeightBuf<u8>);
impl AsRef<[u8]> for Lines {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Bytes {
    /// An owned copy of `v`, on a line of its own (a model holds exactly its bytes).
    pub fn from_vec(v: Vec<u8>) -> Self {
        Self::from_weight_buf(WeightBuf::from_slice(&v))
    }

    /// Owns `buf` (no copy: a [`WeightBuf`] starts on a line). Quantizers write their codes
    /// into one and hand it over.
    pub fn from_weight_buf(buf: WeightBuf<u8>) -> Self {
        let n = buf.len();
        Bytes {
            owner: Arc::new(Lines(buf)),
            range: 0..n,
            shared: false,
        }
    }

    /// An owned copy of f32 values (little-endian bytes).
    pub fn from_f32(v: Vec<f32>) -> Self {
        Self::from_vec_of(&v)
    }

    /// An owned copy of f16 values (little-endian bytes).
    pub fn from_f16(v: Vec<half::f16>) -> Self {
        Self::from_vec_of(&v)
    }

    fn from_vec_of<T: bytemuck::Pod>(v: &[T]) -> Self {
        Self::from_weight_buf(WeightBuf::from_slice(bytemuck::cast_slice(v)))
    }

    /// Borrows `range` of a shared buffer (no copy); errors if the range is outside it.
    pub fn from_shared(owner: SharedOwner, range: Range<usize>) -> Result<Self> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(QuantError::Range {
                op: "Bytes::from_shared",
                start: range.start,
                end: range.end,
                len,
            });
        }
        Ok(Bytes {
            owner,
            range,
            shared: true,
        })
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.range.end - self.range.start
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes are borrowed from a shared buffer (not copied).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// `self` if its start is aligned to `align` bytes, else an aligned owned copy.
    pub(crate) fn aligned(self, align: usize) -> Self {
        if (self.as_slice().as_ptr() as usize) % align == 0 {
            return self;
        }
        debug_assert!(align <= LINE);
        Self::from_weight_buf(WeightBuf::from_slice(self.as_slice()))
    }

    /// The bytes as f32 values. Only called on buffers made aligned at construction.
    #[inline]
    #[allow(dead_code)]
    pub(crate) fn f32s(&self) -> &[f32] {
        bytemuck::try_cast_slice(self.as_slice()).unwrap_or(&[])
    }

    /// The bytes as f16 values. Only called on buffers made aligned at construction.
    #[inline]
    pub(crate) fn f16s(&self) -> &[half::f16] {
        bytemuck::try_cast_slice(self.as_slice()).unwrap_or(&[])
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Bytes({} bytes, {})",
            self.len(),
            if self.shared { "shared" } else { "owned" }
        )
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// Checks a part's byte length for `from_parts`.
pub(crate) fn check_part(
    op: &'static str,
    part: &'static str,
    out: usize,
    inn: usize,
    b: &Bytes,
    expected: usize,
) -> Result<()> {
    if b.len() != expected {
        return Err(QuantError::PartLength {
            op,
            part,
            out,
            inn,
            expected,
            found: b.len(),
        });
    }
    Ok(())
}

/// Checks the values of a scale-like part for `from_parts`: each finite and, when
/// `non_negative`, not negative; else a [`QuantError::PartValue`] naming the part, the index
/// and the value.
pub(crate) fn check_values(
    op: &'static str,
    part: &'static str,
    values: impl IntoIterator<Item = f32>,
    non_negative: bool,
) -> Result<()> {
    for (index, v) in values.into_iter().enumerate() {
        if !v.is_finite() || (non_negative && v < 0.0) {
            let must = if non_negative {
                "finite and not negative"
            } else {
                "finite"
            };
            return Err(QuantError::PartValue {
                op,
                part,
                index,
                what: format!("{v} (must be {must})"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_a_line(b: &Bytes) -> bool {
        (b.as_slice().as_ptr() as usize).is_multiple_of(LINE)
    }

    /// Every owned buffer starts on a cache line, whatever its size and element type, and
    /// holds exactly its bytes; a realigned copy of a misaligned shared range too.
    #[test]
    fn owned_buffers_start_on_a_line() {
        for n in [1usize, 7, 63, 64, 65, 4096, 1 << 20] {
            let v: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let b = Bytes::from_vec(v.clone());
            assert!(on_a_line(&b), "from_vec, {n} bytes");
            assert_eq!(b.as_slice(), &v[..]);
            let f = Bytes::from_f32(vec![1.5; n]);
            assert!(on_a_line(&f) && f.f32s() == vec![1.5; n], "from_f32, {n}");
            let h = Bytes::from_f16(vec![half::f16::ONE; n]);
            assert!(on_a_line(&h) && h.len() == 2 * n, "from_f16, {n}");
            let file: SharedOwner = Arc::new(v.clone());
            let shared = Bytes::from_shared(file, 1..n).unwrap();
            assert!(shared.is_shared());
            let copy = shared.aligned(LINE);
            // (An empty copy has no storage to place.)
            assert!(copy.is_empty() || on_a_line(&copy), "aligned, {n}");
            assert!(!copy.is_shared());
            assert_eq!(copy.as_slice(), &v[1..]);
        }
    }
}
