//! Elementwise ops: add (the residual) and ReLU.

use crate::error::Result;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// Backward of [`Tape::add`]: the gradient flows unchanged to both inputs.
struct AddOp;

impl Op for AddOp {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(d_y.clone()), Some(d_y)])
    }
}

/// Which elements of a tensor are positive, one bit each (bit `i % 64` of word `i / 64`):
/// what ReLU's backward reads, at 1/32 of the size of the f32 output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositiveMask {
    words: Vec<u64>,
    len: usize,
}

impl PositiveMask {
    /// The mask of `values > 0` (NaN counts as not positive).
    pub fn of(values: &[f32]) -> Self {
        let words = values
            .chunks(64)
            .map(|chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .fold(0u64, |w, (i, &v)| w | (u64::from(v > 0.0) << i))
            })
            .collect();
        PositiveMask {
            words,
            len: values.len(),
        }
    }

    /// Number of elements covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the mask covers no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the bits.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Zeroes the elements of `values` (of the mask's length) whose bit is clear.
    pub fn apply(&self, values: &mut [f32]) {
        debug_assert_eq!(values.len(), self.len);
        for (chunk, &word) in values.chunks_mut(64).zip(&self.words) {
            // A select, not a conditional store, so that it vectorizes.
            for (i, g) in chunk.iter_mut().enumerate() {
                *g = if (word >> i) & 1 == 1 { *g } else { 0.0 };
            }
        }
    }
}

/// Backward of [`Tape::relu`]: `dX = dY · [y > 0]`, from a bit per element (the output itself
/// is not kept: a layer that needs it, e.g. a trainable linear layer after the ReLU, keeps it).
struct ReluOp {
    positive: PositiveMask,
}

impl Op for ReluOp {
    fn name(&self) -> &'static str {
        "relu"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        if d_y.numel() != self.positive.len() {
            return Err(crate::AutogradError::BadGradient {
                op: "relu",
                what: format!(
                    "an output gradient of {} elements for {} outputs",
                    d_y.numel(),
                    self.positive.len()
                ),
            });
        }
        // In place, in the buffer of dY.
        let mut d_x = d_y;
        self.positive.apply(d_x.data_mut());
        Ok(vec![Some(d_x)])
    }
}

impl Tape {
    /// `a + b`, elementwise (same shapes).
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = a.value().add(b.value())?;
        self.record("add", &[a, b], y, false, || Box::new(AddOp))
    }

    /// `max(x, 0)`, elementwise. Saves one bit per element for the backward.
    pub fn relu(&self, x: &Var) -> Result<Var> {
        let y = Arc::new(x.value().relu());
        let output = Arc::clone(&y);
        // The mask is made only when the op is recorded; the handle to the output is dropped
        // with the closure either way.
        self.record_shared("relu", &[x], y, false, move || {
            Box::new(ReluOp {
                positive: PositiveMask::of(output.data()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_matches_the_float_test_on_ragged_lengths() {
        for n in [0usize, 1, 7, 63, 64, 65, 129, 1023] {
            let values: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => -(i as f32),
                    1 => f32::NAN,
                    2 => 0.0,
                    _ => i as f32 * 0.5,
                })
                .collect();
            let mask = PositiveMask::of(&values);
            assert_eq!(mask.len(), n);
            assert_eq!(mask.bytes(), n.div_ceil(64) * 8);
            let mut g = vec![1.5f32; n];
            mask.apply(&mut g);
            for (i, (&gv, &v)) in g.iter().zip(&values).enumerate() {
                assert_eq!(gv, if v > 0.0 { 1.5 } else { 0.0 }, "element {i} of {n}");
            }
        }
    }
}
