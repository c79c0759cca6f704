//! PReLU (PyTorch's `nn.PReLU(n)`): `y = x` where `x > 0`, else `a · x`, with one learned slope
//! `a` per feature (`n` = the width) or one for all (`n` = 1), on `[batch, d]`.

use crate::error::{AutogradError, Result};
use crate::param::Param;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::Tensor;
use std::sync::Arc;

/// Backward of [`Tape::prelu`]: `dX = dY · (x > 0 ? 1 : a)`, and, if the slopes train,
/// `da_j = Σ dY · x` over the elements with `x ≤ 0` that slope `j` scales (in row order).
struct PReluOp {
    x: Arc<Tensor>,
    weight: Param,
    x_tracked: bool,
}

/// The index of column `j`'s slope among `slopes`: one per column, or one for all.
#[inline(always)]
fn slope_of(slopes: usize, j: usize) -> usize {
    if slopes == 1 {
        0
    } else {
        j
    }
}

impl Op for PReluOp {
    fn name(&self) -> &'static str {
        "prelu"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        // d_y, x: [batch, d]; weight: [d] or [1]
        let d = self.x.shape().last().copied().unwrap_or(0);
        if d_y.shape() != self.x.shape() {
            return Err(AutogradError::BadGradient {
                op: "prelu",
                what: format!(
                    "an output gradient of shape {:?} for an input of shape {:?}",
                    d_y.shape(),
                    self.x.shape()
                ),
            });
        }
        let a = self.weight.value().data().to_vec();
        if self.weight.requires_grad() {
            let mut d_a = vec![0.0f32; a.len()];
            for (xr, gr) in self
                .x
                .data()
                .chunks(d.max(1))
                .zip(d_y.data().chunks(d.max(1)))
            {
                for (j, (&x, &g)) in xr.iter().zip(gr).enumerate() {
                    if x <= 0.0 {
                        d_a[slope_of(a.len(), j)] += g * x;
                    }
                }
            }
            self.weight
                .accumulate_grad(Tensor::from_vec(&[a.len()], d_a)?)?;
        }
        if !self.x_tracked {
            return Ok(vec![None]);
        }
        let mut d_x = d_y;
        for (gr, xr) in d_x
            .data_mut()
            .chunks_mut(d.max(1))
            .zip(self.x.data().chunks(d.max(1)))
        {
            for (j, (g, &x)) in gr.iter_mut().zip(xr).enumerate() {
                if x <= 0.0 {
                    *g *= a[slope_of(a.len(), j)];
                }
            }
        }
        Ok(vec![Some(d_x)])
    }
}

impl Tape {
    /// `y = x` where `x > 0`, else `weight_j · x`, for `x` `[batch, d]` and `weight` `[d]` or
    /// `[1]` (PyTorch's `nn.PReLU(d)` / `nn.PReLU()`). Another shape is an error.
    ///
    /// ```
    /// use nibble_autograd::{Param, Tape};
    /// use nibble_tensor::Tensor;
    /// let tape = Tape::new();
    /// let x = tape.leaf(Tensor::from_vec(&[1, 2], vec![-2.0, 3.0])?);
    /// let a = Param::new("prelu.weight", Tensor::from_vec(&[1], vec![0.25])?, false);
    /// assert_eq!(tape.prelu(&x, &a)?.value().data(), &[-0.5, 3.0]);
    /// # Ok::<(), nibble_autograd::AutogradError>(())
    /// ```
    pub fn prelu(&self, x: &Var, weight: &Param) -> Result<Var> {
        let a = weight.value().data().to_vec();
        let fits = matches!(x.shape(), &[_, d] if a.len() == d || a.len() == 1);
        if !fits {
            return Err(AutogradError::InvalidInput {
                op: "prelu",
                what: format!("x {:?} with {} slopes", x.shape(), a.len()),
            });
        }
        let d = x.shape()[1];
        let mut y = x.value().clone();
        for row in y.data_mut().chunks_mut(d.max(1)) {
            for (j, v) in row.iter_mut().enumerate() {
                if *v <= 0.0 {
                    *v *= a[slope_of(a.len(), j)];
                }
            }
        }
        self.record("prelu", &[x], y, weight.requires_grad(), || {
            Box::new(PReluOp {
                x: x.shared(),
                weight: weight.clone(),
                x_tracked: x.is_tracked(),
            })
        })
    }
}
