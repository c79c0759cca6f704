//! [`Bytes`]: an immutable byte buffer that is either owned or borrowed from a shared buffer
//! (typically a memory-mapped checkpoint), so that quantized weights load without copying.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::error::{QuantError, Result};

/// The owner of a shared buffer: anything that derefs to bytes and can cross threads
/// (`Vec<u8>`, `memmap2::Mmap`, ...).
pub type SharedOwner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// An immutable byte buffer: an owned allocation or a range of a shared buffer.
///
/// Owned buffers made by [`Bytes::from_f32`] / [`Bytes::from_f16`] keep their element
/// alignment, so typed views of them never need a copy.
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

struct F32Buf(Vec<f32>);
impl AsRef<[u8]> for F32Buf {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}
struct F16Buf(Vec<half::f16>);
impl AsRef<[u8]> for F16Buf {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}
/// 8-byte aligned owned storage for copies of misaligned parts.
struct AlignedBuf(Vec<u64>, usize);
impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.0)[..self.1]
    }
}

impl Bytes {
    /// An owned buffer (its spare capacity is released: a model holds exactly its bytes).
    pub fn from_vec(mut v: Vec<u8>) -> Self {
        v.shrink_to_fit();
        let n = v.len();
        Bytes {
            owner: Arc::new(v),
            range: 0..n,
            shared: false,
        }
    }

    /// An owned buffer of f32 values (little-endian bytes, 4-byte aligned).
    pub fn from_f32(mut v: Vec<f32>) -> Self {
        v.shrink_to_fit();
        let n = v.len() * 4;
        Bytes {
            owner: Arc::new(F32Buf(v)),
            range: 0..n,
            shared: false,
        }
    }

    /// An owned buffer of f16 values (little-endian bytes, 2-byte aligned).
    pub fn from_f16(mut v: Vec<half::f16>) -> Self {
        v.shrink_to_fit();
        let n = v.len() * 2;
        Bytes {
            owner: Arc::new(F16Buf(v)),
            range: 0..n,
            shared: false,
        }
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
        let n = self.len();
        let mut v = vec![0u64; n.div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut v)[..n].copy_from_slice(self.as_slice());
        Bytes {
            owner: Arc::new(AlignedBuf(v, n)),
            range: 0..n,
            shared: false,
        }
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
