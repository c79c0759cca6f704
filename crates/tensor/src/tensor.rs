//! The f32 tensor: a shape (any rank, row-major, contiguous) and an owned buffer, plus borrowed
//! views of leading-axis slices.

use crate::error::{checked_numel, Result, TensorError};
use crate::rng::Rng;

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
    data: Vec<f32>,
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
    /// A tensor of zeros. Panics only if the element count overflows `usize`
    /// (use [`Tensor::try_zeros`] for untrusted shapes).
    pub fn zeros(shape: &[usize]) -> Self {
        Self::try_zeros(shape).expect("Tensor::zeros: shape overflows")
    }

    /// A tensor of zeros, or an error if the element count overflows.
    pub fn try_zeros(shape: &[usize]) -> Result<Self> {
        let n = checked_numel("zeros", shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        })
    }

    /// A tensor with every element equal to `value`.
    pub fn full(shape: &[usize], value: f32) -> Self {
        let mut t = Self::zeros(shape);
        t.data.fill(value);
        t
    }

    /// A tensor from a buffer whose length must equal the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n = checked_numel("from_vec", shape)?;
        if n != data.len() {
            return Err(TensorError::Length {
                op: "from_vec",
                shape: shape.to_vec(),
                expected: n,
                found: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A scalar (rank-0) tensor.
    pub fn scalar(value: f32) -> Self {
        Tensor {
            shape: vec![],
            data: vec![value],
        }
    }

    /// Elements drawn uniformly from `[low, high)`.
    pub fn uniform(shape: &[usize], low: f32, high: f32, rng: &mut Rng) -> Self {
        let mut t = Self::zeros(shape);
        t.data.iter_mut().for_each(|v| *v = rng.uniform(low, high));
        t
    }

    /// Elements drawn from the standard normal distribution.
    pub fn randn(shape: &[usize], rng: &mut Rng) -> Self {
        let mut t = Self::zeros(shape);
        t.data.iter_mut().for_each(|v| *v = rng.normal());
        t
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

    /// Gives up the buffer.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
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

    /// An owned copy.
    pub fn to_tensor(&self) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.to_vec(),
        }
    }
}
