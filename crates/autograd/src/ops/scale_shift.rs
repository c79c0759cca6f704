//! A frozen per-feature affine map, `y = x · scale + shift` on `[batch, d]` (what an
//! `nn.BatchNorm1d` in eval mode computes, with its running statistics folded into `scale`
//! and `shift`). Only `x` gets a gradient.

use crate::error::{AutogradError, Result};
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// Backward of [`Tape::scale_shift`]: `dX = dY · scale` per column.
struct ScaleShiftOp {
    scale: Arc<[f32]>,
}

impl Op for ScaleShiftOp {
    fn name(&self) -> &'static str {
        "scale_shift"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.scale.len();
        if d == 0 || !d_y.numel().is_multiple_of(d) {
            return Err(AutogradError::BadGradient {
                op: "scale_shift",
                what: format!(
                    "an output gradient of {} elements for rows of {d}",
                    d_y.numel()
                ),
            });
        }
        let mut d_x = d_y;
        for row in d_x.data_mut().chunks_exact_mut(d) {
            row.iter_mut()
                .zip(self.scale.iter())
                .for_each(|(g, s)| *g *= s);
        }
        Ok(vec![Some(d_x)])
    }
}

impl Tape {
    /// `y[r, c] = x[r, c] · scale[c] + shift[c]` for `x` `[batch, d]`, `scale` and `shift`
    /// `[d]` (constants: only `x` gets a gradient). Shapes that do not fit are an error.
    ///
    /// ```
    /// use nibble_autograd::Tape;
    /// use nibble_tensor::Tensor;
    /// let tape = Tape::new();
    /// let x = tape.leaf(Tensor::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0])?);
    /// let y = tape.scale_shift(&x, &[2.0, -1.0], &[0.5, 0.0])?;
    /// assert_eq!(y.value().data(), &[2.5, -2.0, 6.5, -4.0]);
    /// let grads = tape.backward(&tape.sum(&y)?)?;
    /// assert_eq!(grads.get(&x).unwrap().data(), &[2.0, -1.0, 2.0, -1.0]);
    /// # Ok::<(), nibble_autograd::AutogradError>(())
    /// ```
    pub fn scale_shift(&self, x: &Var, scale: &[f32], shift: &[f32]) -> Result<Var> {
        let d = scale.len();
        let fits = matches!(x.shape(), &[_, c] if c == d) && shift.len() == d;
        if !fits {
            return Err(AutogradError::InvalidInput {
                op: "scale_shift",
                what: format!(
                    "x {:?} with a scale of {d} and a shift of {} values",
                    x.shape(),
                    shift.len()
                ),
            });
        }
        let mut y = x.value().clone();
        nibble_tensor::ops::scale_shift_rows(y.data_mut(), scale, shift)?;
        let scale: Arc<[f32]> = scale.into();
        self.record("scale_shift", &[x], y, false, || {
            Box::new(ScaleShiftOp { scale })
        })
    }
}
