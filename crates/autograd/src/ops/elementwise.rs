//! Elementwise ops: add (the residual) and ReLU.

use crate::error::Result;
use crate::tape::{Op, Pending, Tape, Var};
use nibble_tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// Backward of [`Tape::add`]: the gradient flows unchanged to both inputs (one of them gets a
/// copy, made in parallel: a whole activation).
struct AddOp;

impl Op for AddOp {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(d_y.parallel_clone()), Some(d_y)])
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
    /// The mask of `values > 0` (NaN counts as not positive). Large tensors are split over the
    /// rayon pool (blocks of [`MASK_BLOCK_WORDS`] words), so the mask adds no serial pass to a
    /// training step on many cores.
    pub fn of(values: &[f32]) -> Self {
        let mut words = vec![0u64; values.len().div_ceil(64)];
        let fill = |(b, block): (usize, &mut [u64])| {
            let start = b * MASK_BLOCK_WORDS * 64;
            let end = (start + block.len() * 64).min(values.len());
            for (word, chunk) in block.iter_mut().zip(values[start..end].chunks(64)) {
                *word = nibble_tensor::ops::positive_bits(chunk);
            }
        };
        if values.len() >= PARALLEL_MIN_ELEMENTS {
            words
                .par_chunks_mut(MASK_BLOCK_WORDS)
                .enumerate()
                .for_each(fill);
        } else {
            words
                .chunks_mut(MASK_BLOCK_WORDS)
                .enumerate()
                .for_each(fill);
        }
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

    /// Zeroes the elements of `values` (of the mask's length) whose bit is clear, in parallel
    /// for large tensors (each element on its own: the same result for any thread count).
    pub fn apply(&self, values: &mut [f32]) {
        debug_assert_eq!(values.len(), self.len);
        let apply_block = |(b, block): (usize, &mut [f32])| {
            let words = &self.words[b * MASK_BLOCK_WORDS..];
            for (chunk, &word) in block.chunks_mut(64).zip(words) {
                keep_set_word(word, chunk);
            }
        };
        let block = MASK_BLOCK_WORDS * 64;
        if values.len() >= PARALLEL_MIN_ELEMENTS {
            values
                .par_chunks_mut(block)
                .enumerate()
                .for_each(apply_block);
        } else {
            values.chunks_mut(block).enumerate().for_each(apply_block);
        }
    }
}

/// Zeroes `values[i]` (at most 64) where bit `i` of `word` is clear; a whole word's 64 values
/// go through chunks of exactly 8, which vectorize.
fn keep_set_word(word: u64, values: &mut [f32]) {
    if values.len() == 64 {
        for (j, eight) in values.chunks_exact_mut(8).enumerate() {
            keep_set_bits((word >> (8 * j)) as u8, eight);
        }
    } else {
        for (j, eight) in values.chunks_mut(8).enumerate() {
            keep_set_bits((word >> (8 * j)) as u8, eight);
        }
    }
}

/// Bit `i` of each byte, as a lane mask.
const BYTE_BITS: [u8; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Zeroes `values[i]` (at most 8) where bit `i` of `byte` is clear: an AND with an all-ones or
/// all-zeros lane mask (a zeroed value is +0.0, as `0.0` is), so that it vectorizes.
#[inline(always)]
fn keep_set_bits(byte: u8, values: &mut [f32]) {
    for (v, bit) in values.iter_mut().zip(BYTE_BITS) {
        let keep = if byte & bit != 0 { u32::MAX } else { 0 };
        *v = f32::from_bits(v.to_bits() & keep);
    }
}

/// Words of a [`PositiveMask`] per parallel task (16 Ki elements: a 250-row micro-batch of
/// width 1024 still makes 16 tasks).
pub const MASK_BLOCK_WORDS: usize = 256;

/// Tensors of at least this many elements build and apply their mask on the rayon pool.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 17;

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

    /// `a + b`, elementwise (same shapes), written into `a`'s buffer when nothing else holds
    /// it (else into a new one): a residual sum that allocates nothing. The same bits as
    /// [`Tape::add`] and the same record.
    pub fn add_owned(&self, a: Var, b: &Var) -> Result<Var> {
        if a.shape() != b.shape() {
            return Err(nibble_tensor::TensorError::ShapeMismatch {
                op: "add",
                lhs: a.shape().to_vec(),
                rhs: b.shape().to_vec(),
            }
            .into());
        }
        let a_tracked = a.clone_handle();
        let mut y = a.into_tensor();
        y.add_assign(b.value())?;
        self.record("add", &[&a_tracked, b], y, false, || Box::new(AddOp))
    }

    /// [`Tape::add`] of an output recorded without a value (see [`Pending`]) and `b`, itself
    /// recorded without computing the sum: the same record, for a recomputation whose
    /// backward never reads the sum (e.g. a residual block's output).
    pub fn add_pending(&self, a: Pending, b: &Var) -> Result<Pending> {
        if a.shape() != b.shape() {
            return Err(nibble_tensor::TensorError::ShapeMismatch {
                op: "add_pending",
                lhs: a.shape().to_vec(),
                rhs: b.shape().to_vec(),
            }
            .into());
        }
        let shape = a.shape().to_vec();
        self.record_pending("add", Some(a), &[b], shape, false, || Box::new(AddOp))
    }

    /// `max(x, 0)`, elementwise. Saves one bit per element for the backward.
    pub fn relu(&self, x: &Var) -> Result<Var> {
        // When the op will be recorded, the mask is made in the same pass as the output.
        let (y, mask) = if self.would_record(&[x], false) {
            let (y, words) = x.value().relu_with_positive_bits();
            let len = y.numel();
            (y, Some(PositiveMask { words, len }))
        } else {
            (x.value().relu(), None)
        };
        let y = Arc::new(y);
        let output = Arc::clone(&y);
        // The handle to the output is dropped with the closure (made into a mask only if none
        // was made above).
        self.record_shared("relu", &[x], y, false, move || {
            Box::new(ReluOp {
                positive: mask.unwrap_or_else(|| PositiveMask::of(output.data())),
            })
        })
    }

    /// [`Tape::relu`] written into `x`'s buffer when nothing else holds it (else into a new
    /// one): a ReLU after a layer whose output no record keeps allocates nothing and passes
    /// over the activations once. The same bits and the same record as [`Tape::relu`].
    pub fn relu_owned(&self, x: Var) -> Result<Var> {
        let x_tracked = x.clone_handle();
        let recorded = self.would_record(&[&x], false);
        let mut y = x.into_tensor();
        let mask = if recorded {
            let words = y.relu_assign_with_positive_bits();
            Some(PositiveMask {
                words,
                len: y.numel(),
            })
        } else {
            nibble_tensor::ops::relu_in_place(y.data_mut());
            None
        };
        let y = Arc::new(y);
        let output = Arc::clone(&y);
        self.record_shared("relu", &[&x_tracked], y, false, move || {
            Box::new(ReluOp {
                positive: mask.unwrap_or_else(|| PositiveMask::of(output.data())),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values cycling through negative, NaN, zero and two positives.
    fn mixed_signs(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 5 {
                0 => -(i as f32),
                1 => f32::NAN,
                2 => 0.0,
                _ => i as f32 * 0.5,
            })
            .collect()
    }

    #[test]
    fn relu_owned_is_relu_in_place() {
        let n = (1 << 15) + 77; // parallel chunks and a ragged tail
        let values = mixed_signs(n);
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for shared in [false, true] {
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_vec(&[n], values.clone()).unwrap());
            // An op's output (not a leaf, which its record keeps a handle to).
            let owned_input = tape.add(&x, &Var::constant(Tensor::zeros(&[n]))).unwrap();
            let by_ref = tape.relu(&owned_input).unwrap();
            let keep = shared.then(|| owned_input.shared());
            let before = owned_input.value().data().as_ptr();
            let owned = tape.relu_owned(owned_input).unwrap();
            assert!(
                bits(owned.value()) == bits(by_ref.value()),
                "shared={shared}"
            );
            // In place unless another handle holds the input, which then stays as it was.
            assert_eq!(owned.value().data().as_ptr() == before, !shared);
            if let Some(k) = keep {
                assert!(k.data()[0] < 0.0 || k.data()[0] == 0.0);
                assert!(k.data()[1].is_nan());
            }
            // The same gradient through either.
            let loss = tape.sum(&tape.add(&by_ref, &owned).unwrap()).unwrap();
            let grads = tape.backward(&loss).unwrap();
            let g = grads.get(&x).unwrap().data();
            for (i, (&gi, &v)) in g.iter().zip(&values).enumerate() {
                assert_eq!(gi, if v > 0.0 { 2.0 } else { 0.0 }, "element {i}");
            }
        }
    }

    #[test]
    fn mask_matches_the_float_test_on_ragged_lengths() {
        for n in [
            0usize,
            1,
            7,
            63,
            64,
            65,
            129,
            1023,
            (1 << 15) + 5,
            (1 << 17) + 77,
        ] {
            let values = mixed_signs(n);
            let mask = PositiveMask::of(&values);
            assert_eq!(mask.len(), n);
            // The mask a recorded ReLU makes with its output, in one pass, is the same.
            let input = Tensor::from_vec(&[n], values.clone()).unwrap();
            let (y, words) = input.relu_with_positive_bits();
            assert_eq!(PositiveMask { words, len: n }, mask, "fused mask of {n}");
            let want = input.relu();
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same(y.data(), want.data()), "fused relu of {n}");
            assert_eq!(mask.bytes(), n.div_ceil(64) * 8);
            let mut g = vec![1.5f32; n];
            mask.apply(&mut g);
            for (i, (&gv, &v)) in g.iter().zip(&values).enumerate() {
                assert_eq!(gv, if v > 0.0 { 1.5 } else { 0.0 }, "element {i} of {n}");
            }
        }
    }
}
