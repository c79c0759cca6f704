//! LayerNorm over each row (PyTorch's `group_norm(x, 1, weight, bias, eps)` on `[m, c]`).

use crate::error::Result;
use crate::param::Param;
use crate::tape::{Op, Tape, Var};
use nibble_tensor::{layer_norm, layer_norm_backward, LayerNormStats, Tensor};
use std::sync::Arc;

/// Backward of [`Tape::layer_norm`]. Saves the input (shared with the op that produced it)
/// and two floats per row.
struct LayerNormOp {
    x: Arc<Tensor>,
    stats: LayerNormStats,
    weight: Param,
    bias: Param,
    x_tracked: bool,
}

impl Op for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn backward(self: Box<Self>, d_y: Tensor) -> Result<Vec<Option<Tensor>>> {
        // d_y, x: [m, c]; weight, bias: [c]
        let (d_x, d_weight, d_bias) = {
            let w = self.weight.value();
            layer_norm_backward(&d_y, &self.x, w.data(), &self.stats)?
        };
        self.weight.accumulate_vec_grad(d_weight)?;
        self.bias.accumulate_vec_grad(d_bias)?;
        Ok(vec![self.x_tracked.then_some(d_x)])
    }
}

impl Tape {
    /// Normalizes each row of `x` `[m, c]` over its `c` channels (biased variance), then
    /// applies the affine `weight`, `bias` `[c]`.
    pub fn layer_norm(&self, x: &Var, weight: &Param, bias: &Param, eps: f32) -> Result<Var> {
        let (y, stats) = {
            let (w, b) = (weight.value(), bias.value());
            layer_norm(x.value(), w.data(), b.data(), eps)?
        };
        let trains = weight.requires_grad() || bias.requires_grad();
        self.record("layer_norm", &[x], y, trains, || {
            Box::new(LayerNormOp {
                x: x.shared(),
                stats,
                weight: weight.clone(),
                bias: bias.clone(),
                x_tracked: x.is_tracked(),
            })
        })
    }
}
