//! GroupNorm over the channels of each row (PyTorch's `nn.GroupNorm(groups, c)` on `[m, c]`).

use crate::error::Result;
use crate::param::Param;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::{group_norm, group_norm_backward, LayerNormStats, Tensor};
use std::sync::Arc;

/// Backward of [`Tape::group_norm`]. Saves the input (shared with the op that produced it)
/// and two floats per group of each row.
struct GroupNormOp {
    x: Arc<Tensor>,
    groups: usize,
    stats: LayerNormStats,
    weight: Param,
    bias: Param,
    x_tracked: bool,
}

impl Op for GroupNormOp {
    fn name(&self) -> &'static str {
        "group_norm"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        // d_y, x: [m, c]; weight, bias: [c]; stats: [m·groups]
        let (d_x, d_weight, d_bias) = {
            let w = self.weight.value();
            group_norm_backward(&d_y, &self.x, self.groups, w.data(), &self.stats)?
        };
        self.weight.accumulate_vec_grad(d_weight)?;
        self.bias.accumulate_vec_grad(d_bias)?;
        Ok(vec![self.x_tracked.then_some(d_x)])
    }
}

impl Tape {
    /// Splits each row of `x` `[m, c]` into `groups` groups of `c / groups` neighbouring
    /// channels, normalizes each group (biased variance, `eps` added), then applies the affine
    /// `weight`, `bias` `[c]` per channel (PyTorch's `nn.GroupNorm(groups, c, eps)`).
    pub fn group_norm(
        &self,
        x: &Var,
        groups: usize,
        weight: &Param,
        bias: &Param,
        eps: f32,
    ) -> Result<Var> {
        let (y, stats) = {
            let (w, b) = (weight.value(), bias.value());
            group_norm(x.value(), groups, w.data(), b.data(), eps)?
        };
        let trains = weight.requires_grad() || bias.requires_grad();
        self.record("group_norm", &[x], y, trains, || {
            Box::new(GroupNormOp {
                x: x.shared(),
                groups,
                stats,
                weight: weight.clone(),
                bias: bias.clone(),
                x_tracked: x.is_tracked(),
            })
        })
    }
}
