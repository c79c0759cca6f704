//! The f32 tensor: a shape (any rank, row-major, contiguous) and an owned buffer, plus borrowed
//! views of leading-axis slices.

use crate::buffer::{WeightBuf, HUGE_PAGE_BYTES};
use crate::error::{check_len, checked_numel, Result, TensorError};
use crate::rng::Rng;
use std::ops::{Deref, DerefMut};

/// A dense, row-major, contiguous f32 tensor of any rank.
///
/// ```
/// use nibble_tensor::Tensor;
/// let t = Tensor::from_vec(&[2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!(t.rows(1, 2).unwrap().data(), &[4., 5., 6.]);
/// assert!(Tensor::from_vec(&[2, 2], vec![1.0]).is_err());
/// ```
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Elements,
}

/// A tensor's elements: a `Vec` (activations, gradients, anything handed over as a `Vec`),
/// or a [`WeightBuf`] on huge pages for large parameters drawn at random or loaded from a
/// file (a batch-1 forward streams every weight from DRAM: BigNet f32 at batch 1 went from
/// 3.7–3.8 to 2.9 ms with this and the GEMV's neighbouring blocks).
enum Elements {
    Vec(Vec<f32>),
    Weights(WeightBuf<f32>),
}

impl Clone for Elements {
    /// A large `Vec` is copied in parallel chunks ([`crate::ops::copied_vec`]): a serial copy
    /// of a batch's activations into fresh pages (a forward's output starts as its input) took
    /// about 1 % of a 2-thread BigNet forward at batch 1024 in `perf`, with its page faults.
    fn clone(&self) -> Self {
        match self {
            Elements::Vec(v) => Elements::Vec(crate::ops::copied_vec(v)),
            Elements::Weights(w) => Elements::Weights(w.clone()),
        }
    }
}

impl Elements {
    /// `len` elements `f(0), f(1), ...` (called in index order): a [`WeightBuf`] from
    /// [`HUGE_PAGE_BYTES`] on, a `Vec` below.
    /// `None` where `len` floats cannot be allocated.
    fn try_from_fn(len: usize, mut f: impl FnMut(usize) -> f32) -> Option<Self> {
        if len.saturating_mul(4) >= HUGE_PAGE_BYTES {
            WeightBuf::try_from_fn(len, f).map(Elements::Weights)
        } else {
            Some(Elements::Vec((0..len).map(&mut f).collect()))
        }
    }
}

impl Deref for Elements {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Elements::Vec(v) => v,
            Elements::Weights(w) => w,
        }
    }
}

impl DerefMut for Elements {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Elements::Vec(v) => v,
            Elements::Weights(w) => w,
        }
    }
}

impl PartialEq for Elements {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: Vec<f32> = self.data.iter().take(8).copied().collect();
        write!(f, "Tensor{:?} {:?}", self.shape, head)?;
        if self.data.len() > 8 {
            write!(f, "...")?;
        }
        Ok(())
    }
}

impl Tensor {
    /// A tensor of zeros.
    ///
    /// # Panics
    /// If the element count (the product of `shape`) overflows `usize`; use
    /// [`Tensor::try_zeros`] for untrusted shapes.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::try_zeros(shape).expect("Tensor::zeros: shape overflows")
    }

    /// A tensor of zeros, or an error if the element count overflows or the memory cannot be
    /// allocated ([`crate::TensorError::Alloc`]: a shape beyond the
    /// address space). Large tensors are cleared in parallel (calloc clears reused memory with
    /// one serial memset).
    pub fn try_zeros(shape: &[usize]) -> Result<Self> {
        let n = checked_numel("zeros", shape)?;
        let data = crate::ops::try_zeros_vec(n)
            .ok_or_else(|| crate::error::alloc_error::<f32>("zeros", shape, n))?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: Elements::Vec(data),
        })
    }

    /// A tensor with every element equal to `value`.
    ///
    /// # Panics
    /// If the element count (the product of `shape`) overflows `usize`; for untrusted shapes
    /// use [`Tensor::try_zeros`] and fill it, or [`Tensor::from_fn`]`(shape, |_| value)`.
    pub fn full(shape: &[usize], value: f32) -> Self {
        let mut t = Self::zeros(shape);
        t.data.fill(value);
        t
    }

    /// A tensor from a buffer whose length must equal the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        check_len("from_vec", shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: Elements::Vec(data),
        })
    }

    /// A tensor from a [`WeightBuf`] whose length must equal the product of `shape` (no
    /// copy: the elements stay where the buffer placed them, e.g. on huge pages).
    ///
    /// ```
    /// use nibble_tensor::{buffer::WeightBuf, Tensor};
    /// let t = Tensor::from_weight_buf(&[2], WeightBuf::from_slice(&[1.0f32, 2.0])).unwrap();
    /// assert_eq!(t.data(), &[1.0, 2.0]);
    /// assert!(Tensor::from_weight_buf(&[3], WeightBuf::zeroed(2)).is_err());
    /// ```
    pub fn from_weight_buf(shape: &[usize], data: WeightBuf<f32>) -> Result<Self> {
        check_len("from_weight_buf", shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: Elements::Weights(data),
        })
    }

    /// A scalar (rank-0) tensor.
    pub fn scalar(value: f32) -> Self {
        Tensor {
            shape: vec![],
            data: Elements::Vec(vec![value]),
        }
    }

    /// Elements drawn uniformly from `[low, high)`, in row-major order. Like
    /// [`Tensor::randn`], meant for parameters: from 2 MiB on the elements sit on huge pages
    /// ([`WeightBuf`]).
    ///
    /// # Panics
    /// If the element count (the product of `shape`) overflows `usize`; for untrusted shapes
    /// use [`Tensor::from_fn`]`(shape, |_| rng.uniform(low, high))`, which returns an error
    /// (the same values).
    pub fn uniform(shape: &[usize], low: f32, high: f32, rng: &mut Rng) -> Self {
        Self::from_fn(shape, |_| rng.uniform(low, high)).expect("Tensor::uniform: shape overflows")
    }

    /// Elements drawn from the standard normal distribution, in row-major order.
    ///
    /// # Panics
    /// If the element count (the product of `shape`) overflows `usize`; for untrusted shapes
    /// use [`Tensor::from_fn`]`(shape, |_| rng.normal())`, which returns an error (the same
    /// values).
    pub fn randn(shape: &[usize], rng: &mut Rng) -> Self {
        Self::from_fn(shape, |_| rng.normal()).expect("Tensor::randn: shape overflows")
    }

    /// A tensor whose row-major element `i` is `f(i)`, called once per index in increasing
    /// order; an error if the element count overflows or the memory cannot be allocated.
    /// Written once, straight into its final
    /// place: from 2 MiB on that is a [`WeightBuf`] on huge pages, so this is the constructor
    /// for parameters (random init, checkpoint loading).
    ///
    /// ```
    /// use nibble_tensor::Tensor;
    /// let t = Tensor::from_fn(&[2, 2], |i| i as f32).unwrap();
    /// assert_eq!(t.data(), &[0.0, 1.0, 2.0, 3.0]);
    /// assert!(!t.on_huge_pages());
    /// ```
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> f32) -> Result<Self> {
        let n = checked_numel("from_fn", shape)?;
        let data = Elements::try_from_fn(n, f)
            .ok_or_else(|| crate::error::alloc_error::<f32>("from_fn", shape, n))?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A tensor of `self`'s shape holding `data` (crate-internal: elementwise ops that give
    /// one output per element of `self`, so the lengths agree by construction).
    pub(crate) fn with_same_shape(&self, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(data.len(), self.data().len());
        Tensor {
            shape: self.shape.clone(),
            data: Elements::Vec(data),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, row-major, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The elements as a `Vec`: the tensor's own buffer if it holds one, else a copy (of a
    /// [`WeightBuf`]).
    pub fn into_vec(self) -> Vec<f32> {
        match self.data {
            Elements::Vec(v) => v,
            Elements::Weights(w) => w.to_vec(),
        }
    }

    /// Whether the elements were placed for huge pages (see [`WeightBuf`]).
    pub fn on_huge_pages(&self) -> bool {
        matches!(&self.data, Elements::Weights(w) if w.is_huge_page_aligned())
    }

    /// The value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.data.len() != 1 {
            return Err(TensorError::Rank {
                op: "item",
                expected: 0,
                found: self.shape.clone(),
            });
        }
        Ok(self.data[0])
    }

    /// `(rows, cols)` of a rank-2 tensor, or a [`TensorError::Rank`] naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(TensorError::Rank {
                op,
                expected: 2,
                found: self.shape.clone(),
            }),
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        let n = checked_numel("reshape", shape)?;
        if n != self.data.len() {
            return Err(TensorError::ShapeMismatch {
                op: "reshape",
                lhs: self.shape,
                rhs: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: self.data,
        })
    }

    /// A borrowed view of the whole tensor.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            shape: self.shape.clone(),
            data: &self.data,
        }
    }

    /// A borrowed view of `start..end` along the leading axis (no copy).
    pub fn rows(&self, start: usize, end: usize) -> Result<TensorView<'_>> {
        self.view().rows(start, end)
    }
}

/// A borrowed, contiguous slice of a tensor along its leading axis.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl<'a> TensorView<'a> {
    /// A view over `data` with `shape` (lengths must agree).
    pub fn new(shape: &[usize], data: &'a [f32]) -> Result<Self> {
        let n = checked_numel("view", shape)?;
        if n != data.len() {
            return Err(TensorError::Length {
                op: "view",
                shape: shape.to_vec(),
                expected: n,
                found: data.len(),
            });
        }
        Ok(TensorView {
            shape: shape.to_vec(),
            data,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// `start..end` along the leading axis.
    pub fn rows(&self, start: usize, end: usize) -> Result<TensorView<'a>> {
        let len = *self.shape.first().ok_or(TensorError::Rank {
            op: "rows",
            expected: 1,
            found: vec![],
        })?;
        if start > end || end > len {
            return Err(TensorError::OutOfRange {
                op: "rows",
                start,
                end,
                len,
            });
        }
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Ok(TensorView {
            shape,
            data: &self.data[start * row..end * row],
        })
    }

    /// An owned copy (written in parallel for large views, e.g. a micro-batch's rows).
    pub fn to_tensor(&self) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: Elements::Vec(crate::ops::copied_vec(self.data)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::huge_pages_enabled;

    /// Large random tensors land on huge pages with the same values, in the same order, as
    /// the `Vec` path would give; equality and conversions ignore where the elements live.
    #[test]
    fn large_parameters_sit_on_huge_pages_with_unchanged_values() {
        let shape = [1024, 1024];
        let t = Tensor::uniform(&shape, -0.5, 0.5, &mut Rng::new(3));
        let mut rng = Rng::new(3);
        let want: Vec<f32> = (0..1024 * 1024).map(|_| rng.uniform(-0.5, 0.5)).collect();
        assert_eq!(t.data(), &want[..]);
        assert_eq!(t.on_huge_pages(), huge_pages_enabled());
        let as_vec = Tensor::from_vec(&shape, want.clone()).unwrap();
        assert!(!as_vec.on_huge_pages());
        assert_eq!(t, as_vec);
        assert_eq!(t.clone(), t);
        assert_eq!(t.clone().into_vec(), want);
        let r = t.reshape(&[1 << 20]).unwrap();
        assert_eq!(r.on_huge_pages(), huge_pages_enabled());
        assert_eq!(r.data(), &want[..]);
        // Below 2 MiB: a plain Vec.
        assert!(!Tensor::randn(&[4, 4], &mut Rng::new(1)).on_huge_pages());
    }

    #[test]
    fn from_fn_and_from_weight_buf_check_their_shapes() {
        assert!(Tensor::from_fn(&[usize::MAX, 2], |_| 0.0).is_err());
        assert!(Tensor::from_weight_buf(&[2, 3], WeightBuf::zeroed(5)).is_err());
        let t = Tensor::from_weight_buf(&[2, 3], WeightBuf::from_fn(6, |i| i as f32)).unwrap();
        assert_eq!(t.rows(1, 2).unwrap().data(), &[3.0, 4.0, 5.0]);
    }
}
