//! Merging LoRA adapters into the base weights: `W' = W + B·A`, stored as f32, f16 or
//! re-quantized. Merging into f32 is exact up to rounding; into a quantized format it adds the
//! format's error, which [`MergeReport`] measures.

use crate::error::{Error, Result};
use crate::frozen::FrozenWeight;
use crate::layer::{FrozenBias, LinearBase};
use crate::model::BigNet;
use crate::variant::{Variant, WeightFormat};
use nibble_autograd::Param;
use nibble_tensor::f16;

/// What merging did to the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeReport {
    /// Largest |W'_stored − (W + BA)| over all weights (0 for f32).
    pub max_weight_error: f32,
    /// Mean |W'_stored − (W + BA)| over all weights.
    pub mean_weight_error: f32,
}

/// A copy of `model` whose adapters are folded into its weights, stored as `into`.
pub fn merge_adapters(model: &BigNet, into: WeightFormat) -> Result<(BigNet, MergeReport)> {
    if model.linears().all(|l| l.lora.is_none()) {
        return Err(Error::Model {
            what: format!("variant {} has no LoRA adapters to merge", model.variant()),
        });
    }
    let mut merged = model.clone();
    let (mut max_err, mut sum_err, mut count) = (0.0f32, 0.0f64, 0usize);
    for layer in merged.linears_mut() {
        let (mut w, bias) = layer.dense_weight_and_bias();
        let dora_scale = layer.dora_scale()?;
        if let Some(lora) = layer.lora.take() {
            w.add_assign(&lora.delta()?)?;
            if let Some(scale) = &dora_scale {
                // DoRA, as PEFT merges it: each row of `W + s·B·A` times its scale
                // (`magnitude / ‖W + s·B·A‖`); the bias stays.
                let inp = w.shape()[1];
                for (row, &s) in w.data_mut().chunks_exact_mut(inp.max(1)).zip(scale) {
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
        }
        let key = format!("{}.weight", layer.name);
        layer.base = match into {
            WeightFormat::F32 => LinearBase::Trainable {
                weight: Param::new(key, w, true),
                bias: bias
                    .map(|b| {
                        let t = nibble_tensor::Tensor::from_vec(&[b.len()], b)?;
                        Ok::<_, Error>(Param::new(format!("{}.bias", layer.name), t, true))
                    })
                    .transpose()?,
            },
            format => {
                let stored = FrozenWeight::quantize(format, &key, &w)?;
                let (max, mean) = stored.matrix().to_f32().abs_diff_stats(&w)?;
                max_err = max_err.max(max);
                sum_err += mean as f64 * w.numel() as f64;
                count += w.numel();
                let bias = bias.map(|b| match format {
                    WeightFormat::F16 => {
                        FrozenBias::F16(b.iter().map(|&v| f16::from_f32(v)).collect())
                    }
                    _ => FrozenBias::F32(b),
                });
                LinearBase::Frozen {
                    weight: stored,
                    bias,
                }
            }
        };
    }
    let variant = Variant::for_format(into);
    merged.set_variant(variant);
    // Independent LayerNorm parameters: training one model must not move the other.
    merged.detach_norms(variant.norms_train());
    Ok((
        merged,
        MergeReport {
            max_weight_error: max_err,
            mean_weight_error: (sum_err / count.max(1) as f64) as f32,
        },
    ))
}
