//! f16 storage for weights: half the bytes of f32, widened to f32 on the fly by the kernels.

use crate::buffer::WeightBuf;
use crate::error::{check_len, checked_numel, Result, TensorError};
use crate::tensor::Tensor;
use half::f16;

/// A dense, row-major tensor stored as IEEE f16. Arithmetic happens in f32: the matmul converts
/// panels as it packs them, so no f32 copy of the whole weight is ever made. The elements live
/// in a [`WeightBuf`] (huge pages for large weights: batch-1 inference streams them).
///
/// ```
/// use nibble_tensor::{HalfTensor, Tensor};
/// let t = Tensor::from_vec(&[2], vec![1.0, 0.1]).unwrap();
/// let h = HalfTensor::from_f32(&t);
/// assert_eq!(h.to_f32().data()[0], 1.0);
/// assert!((h.to_f32().data()[1] - 0.1).abs() < 1e-4);
/// ```
#[derive(Clone, PartialEq, Debug)]
pub struct HalfTensor {
    shape: Vec<usize>,
    data: WeightBuf<f16>,
}

impl HalfTensor {
    /// Rounds every element of `t` to the nearest f16 (ties to even), as PyTorch's `.half()`.
    pub fn from_f32(t: &Tensor) -> Self {
        use half::slice::HalfFloatSliceExt;
        let mut data = WeightBuf::zeroed(t.numel());
        data.convert_from_f32_slice(t.data());
        HalfTensor {
            shape: t.shape().to_vec(),
            data,
        }
    }

    /// A tensor from f16 values whose count must equal the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f16>) -> Result<Self> {
        check_len("HalfTensor::from_vec", shape, data.len())?;
        Ok(HalfTensor {
            shape: shape.to_vec(),
            data: WeightBuf::from_slice(&data),
        })
    }

    /// A tensor whose row-major element `i` is `f(i)`, called once per index in increasing
    /// order, written straight into its [`WeightBuf`]; an error if the element count
    /// overflows or the memory cannot be allocated.
    ///
    /// ```
    /// use nibble_tensor::{f16, HalfTensor};
    /// let h = HalfTensor::from_fn(&[3], |i| f16::from_f32(i as f32)).unwrap();
    /// assert_eq!(h.to_f32().data(), &[0.0, 1.0, 2.0]);
    /// ```
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> f16) -> Result<Self> {
        let n = checked_numel("HalfTensor::from_fn", shape)?;
        let data = WeightBuf::try_from_fn(n, f)
            .ok_or_else(|| crate::error::alloc_error::<f16>("HalfTensor::from_fn", shape, n))?;
        Ok(HalfTensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The f16 elements, row-major.
    pub fn data(&self) -> &[f16] {
        &self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Widens to an f32 tensor (exact: every f16 is an f32).
    pub fn to_f32(&self) -> Tensor {
        use half::slice::HalfFloatSliceExt;
        use rayon::prelude::*;
        // Rows of 16 Ki values a task: F16C converts 8 lanes at a time where the CPU has it.
        const CHUNK: usize = 1 << 14;
        let mut out = vec![0.0f32; self.data.len()];
        out.par_chunks_mut(CHUNK)
            .zip(self.data.par_chunks(CHUNK))
            .for_each(|(o, h)| h.convert_to_f32_slice(o));
        Tensor::from_vec(&self.shape, out).expect("same element count")
    }

    /// `(rows, cols)` of a rank-2 tensor.
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
}
