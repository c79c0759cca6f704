//! RMSNorm over each row (PyTorch's `nn.RMSNorm(c)` on `[m, c]`).

use crate::error::Result;
use crate::param::Param;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::{rms_norm, rms_norm_backward, Tensor};
use std::sync::Arc;

/// Backward of [`Tape::rms_norm`]. Saves the input (shared with the op that produced it) and
/// one float per row.
struct RmsNormOp {
    x: Arc<Tensor>,
    rrms: Vec<f32>,
    weight: Param,
    x_tracked: bool,
}

impl Op for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        // d_y, x: [m, c]; weight: [c]; rrms: [m]
        let (d_x, d_weight) = {
            let w = self.weight.value();
            rms_norm_backward(&d_y, &self.x, w.data(), &self.rrms)?
        };
        self.weight.accumulate_vec_grad(d_weight)?;
        Ok(vec![self.x_tracked.then_some(d_x)])
    }
}

impl Tape {
    /// Divides each row of `x` `[m, c]` by its root mean square, `sqrt(mean(x²) + eps)`, then
    /// scales it by `weight` `[c]` (PyTorch's `nn.RMSNorm(c, eps)`; its `eps=None` is
    /// [`f32::EPSILON`] for f32).
    pub fn rms_norm(&self, x: &Var, weight: &Param, eps: f32) -> Result<Var> {
        let (y, rrms) = {
            let w = weight.value();
            rms_norm(x.value(), w.data(), eps)?
        };
        self.record("rms_norm", &[x], y, weight.requires_grad(), || {
            Box::new(RmsNormOp {
                x: x.shared(),
                rrms,
                weight: weight.clone(),
                x_tracked: x.is_tracked(),
            })
        })
    }
}
