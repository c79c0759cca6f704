//! Per-feature affine maps on `[batch, d]`:
//! - [`Tape::scale_shift`], `y = x · scale + shift` with constant `scale` and `shift` (what an
//!   `nn.BatchNorm1d` in eval mode computes, with its running statistics folded into `scale`
//!   and `shift`); only `x` gets a gradient;
//! - [`Tape::scale_by_magnitude`], `y = x · (magnitude / norm) + shift` with a parameter
//!   `magnitude` and constant `norm` and `shift` (DoRA's output scale, whose weight norm is
//!   detached); `x` and `magnitude` get gradients.

use crate::error::{AutogradError, Result};
use crate::param::Param;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use rayon::prelude::*;
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
        Ok(vec![Some(scale_columns("scale_shift", d_y, &self.scale)?)])
    }
}

/// `dX = dY · scale` per column of rows of `d = scale.len()` (an output gradient of another
/// size is an error naming `op`).
fn scale_columns(op: &'static str, d_y: Tensor, scale: &[f32]) -> Result<Tensor> {
    let mut d_x = d_y;
    let elements = d_x.numel();
    nibble_tensor::ops::scale_rows(d_x.data_mut(), scale).map_err(|_| {
        AutogradError::BadGradient {
            op,
            what: format!(
                "an output gradient of {elements} elements for rows of {}",
                scale.len()
            ),
        }
    })?;
    Ok(d_x)
}

/// `Σ_r dy[r, c] · x[r, c]` for each column `c` of rows of `d` (the rows of each column summed
/// in row order: the same bits for any thread count), columns in blocks on the rayon pool.
fn column_dots(x: &[f32], d_y: &[f32], d: usize) -> Vec<f32> {
    const COLUMNS: usize = 64;
    let mut sums = vec![0.0f32; d];
    let row = d.max(1);
    sums.par_chunks_mut(COLUMNS)
        .enumerate()
        .for_each(|(b, acc)| {
            let c0 = b * COLUMNS;
            for (xr, gr) in x.chunks_exact(row).zip(d_y.chunks_exact(row)) {
                let (xr, gr) = (&xr[c0..c0 + acc.len()], &gr[c0..c0 + acc.len()]);
                for ((a, &x), &g) in acc.iter_mut().zip(xr).zip(gr) {
                    *a += g * x;
                }
            }
        });
    sums
}

/// Backward of [`Tape::scale_by_magnitude`] (`x`, `dY`: `[batch, d]`; `magnitude`, `norm`:
/// `[d]`): `dX = dY · scale` per column, and, if the magnitude trains,
/// `dmagnitude_c = Σ_r dY[r, c] · x[r, c] / norm[c]` (the sum over rows in row order).
struct MagnitudeScaleOp {
    x: Arc<Tensor>,
    magnitude: Param,
    norm: Arc<[f32]>,
    scale: Arc<[f32]>,
    x_tracked: bool,
}

impl Op for MagnitudeScaleOp {
    fn name(&self) -> &'static str {
        "scale_by_magnitude"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        if d_y.shape() != self.x.shape() {
            return Err(AutogradError::BadGradient {
                op: "scale_by_magnitude",
                what: format!(
                    "an output gradient of shape {:?} for an input of shape {:?}",
                    d_y.shape(),
                    self.x.shape()
                ),
            });
        }
        let d = self.norm.len();
        if self.magnitude.requires_grad() {
            let mut d_m = column_dots(self.x.data(), d_y.data(), d);
            d_m.iter_mut()
                .zip(self.norm.iter())
                .for_each(|(g, n)| *g /= n);
            self.magnitude.accumulate_vec_grad(d_m)?;
        }
        if !self.x_tracked {
            return Ok(vec![None]);
        }
        Ok(vec![Some(scale_columns(
            "scale_by_magnitude",
            d_y,
            &self.scale,
        )?)])
    }
}

/// `magnitude[c] / norm[c]` for each column `c`: the scale [`Tape::scale_by_magnitude`]
/// multiplies by (in f32), for code that applies it outside the tape and wants its bits.
pub fn magnitude_scale(magnitude: &[f32], norm: &[f32]) -> Vec<f32> {
    magnitude.iter().zip(norm).map(|(m, n)| m / n).collect()
}

impl Tape {
    /// `y[r, c] = x[r, c] · scale[c] + shift[c]` with `scale[c] = magnitude[c] / norm[c]`
    /// ([`magnitude_scale`]), for `x` `[batch, d]`, `magnitude` (a parameter), `norm` and
    /// `shift` `[d]` (constants): PEFT's DoRA output scale, its weight norm detached. `x` and,
    /// if it trains, `magnitude` get gradients. Shapes that do not fit are an error.
    ///
    /// ```
    /// use nibble_autograd::{Param, Tape};
    /// use nibble_tensor::Tensor;
    /// let tape = Tape::new();
    /// let x = tape.leaf(Tensor::from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0])?);
    /// let m = Param::new("m", Tensor::from_vec(&[2], vec![4.0, 1.0])?, true);
    /// let y = tape.scale_by_magnitude(&x, &m, &[2.0, 1.0], &[0.5, 0.0])?;
    /// assert_eq!(y.value().data(), &[2.5, 2.0, 6.5, 4.0]);
    /// tape.backward(&tape.sum(&y)?)?;
    /// // dm = Σ_r x[r, c] / norm[c]
    /// assert_eq!(m.grad().as_ref().unwrap().data(), &[2.0, 6.0]);
    /// # Ok::<(), nibble_autograd::AutogradError>(())
    /// ```
    pub fn scale_by_magnitude(
        &self,
        x: &Var,
        magnitude: &Param,
        norm: &[f32],
        shift: &[f32],
    ) -> Result<Var> {
        let d = norm.len();
        let m = magnitude.value().data().to_vec();
        let fits = matches!(x.shape(), &[_, c] if c == d) && shift.len() == d && m.len() == d;
        if !fits {
            return Err(AutogradError::InvalidInput {
                op: "scale_by_magnitude",
                what: format!(
                    "x {:?} with a magnitude of {:?}, a norm of {d} and a shift of {} values",
                    x.shape(),
                    magnitude.value().shape(),
                    shift.len()
                ),
            });
        }
        let scale: Arc<[f32]> = magnitude_scale(&m, norm).into();
        let y = nibble_tensor::ops::scale_shift_rows_from(x.value().data(), &scale, shift)?;
        let y = Tensor::from_vec(x.shape(), y)?;
        self.record(
            "scale_by_magnitude",
            &[x],
            y,
            magnitude.requires_grad(),
            || {
                Box::new(MagnitudeScaleOp {
                    x: x.shared(),
                    magnitude: magnitude.clone(),
                    norm: norm.into(),
                    scale,
                    x_tracked: x.is_tracked(),
                })
            },
        )
    }

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
