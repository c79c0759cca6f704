//! Writing layers' weights (quantized ones as their packed parts) to a safetensors file.

use crate::error::Result;
use crate::layer_norm::LayerNorm;
use crate::linear::{FrozenBias, Linear, LinearBase};
use nibble_io::frozen::{f32_part, shape_metadata_key, write_parts, Part};
use nibble_io::{DType, FrozenWeight, FORMAT_KEY};
use nibble_tensor::{Tensor, WeightMatrix};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes the weights of `linears` and `norms` (not LoRA adapters: see [`crate::peft`]) to a
/// safetensors file at `path`, under the layers' own names: f32 Linears and LayerNorms as plain
/// f32 tensors, frozen Linears as their format's parts (the layout of [`nibble_io::frozen`])
/// with their `[out, in]` in the metadata, and `__metadata__["nibble.format"]` when every Linear
/// shares one format. [`VarBuilder::linear`](crate::VarBuilder::linear) reads a weight back as
/// stored, straight from the mapped file.
pub fn save_weights<'a>(
    path: &Path,
    linears: impl IntoIterator<Item = &'a Linear>,
    norms: impl IntoIterator<Item = &'a LayerNorm>,
) -> Result<()> {
    save_weights_with(path, linears, norms, std::iter::empty())
}

/// [`save_weights`] with `extra` f32 tensors by key (a BatchNorm's running statistics, ...).
pub fn save_weights_with<'a>(
    path: &Path,
    linears: impl IntoIterator<Item = &'a Linear>,
    norms: impl IntoIterator<Item = &'a LayerNorm>,
    extra: impl IntoIterator<Item = (String, &'a Tensor)>,
) -> Result<()> {
    save_weights_in_order(path, linears, norms, extra, None)
}

/// [`save_weights_with`], recording `module_order` (the model's module paths in the order
/// they run) under [`crate::layout::MODULE_ORDER_KEY`] where given.
pub(crate) fn save_weights_in_order<'a>(
    path: &Path,
    linears: impl IntoIterator<Item = &'a Linear>,
    norms: impl IntoIterator<Item = &'a LayerNorm>,
    extra: impl IntoIterator<Item = (String, &'a Tensor)>,
    module_order: Option<Vec<String>>,
) -> Result<()> {
    let linears: Vec<&Linear> = linears.into_iter().collect();
    let mut held: Vec<(String, Tensor)> = Vec::new(); // f32 copies, alive until written
    let mut parts: Vec<Part<'_>> = Vec::new();
    let mut metadata = BTreeMap::new();
    if let Some(order) = module_order {
        metadata.insert(
            crate::layout::MODULE_ORDER_KEY.to_string(),
            serde_json::Value::from(order).to_string(),
        );
    }
    for l in &linears {
        let wkey = format!("{}.weight", l.name);
        let bkey = format!("{}.bias", l.name);
        match &l.base {
            LinearBase::Trainable { weight, bias } => {
                held.push((wkey, weight.value().clone()));
                held.extend(bias.as_ref().map(|b| (bkey, b.value().clone())));
            }
            // A weight packed for inference saves as the trainable one it came from.
            LinearBase::Frozen {
                weight: FrozenWeight::F32(w),
                bias,
            } if matches!(bias, None | Some(FrozenBias::F32(_))) => {
                held.push((wkey, w.to_f32()));
                if let Some(FrozenBias::F32(b)) = bias {
                    held.push((bkey, Tensor::from_vec(&[b.len()], b.clone())?));
                }
            }
            LinearBase::Frozen { weight, bias } => {
                let (o, i) = l.dims();
                metadata.insert(shape_metadata_key(&wkey), format!("{o},{i}"));
                parts.extend(weight.parts(&wkey));
                if let Some(bias) = bias {
                    let (dtype, bytes): (DType, &[u8]) = match bias {
                        FrozenBias::F32(b) => (DType::F32, bytemuck::cast_slice(b)),
                        FrozenBias::F16(b) => (DType::F16, bytemuck::cast_slice(b)),
                    };
                    parts.push((bkey, dtype, vec![bias.len()], Cow::Borrowed(bytes)));
                }
            }
        }
    }
    for n in norms {
        for p in std::iter::once(&n.weight).chain(&n.bias) {
            held.push((p.name().to_string(), p.value().clone()));
        }
    }
    if let Some(first) = linears.first().map(|l| l.format()) {
        if linears.iter().all(|l| l.format() == first) {
            metadata.insert(FORMAT_KEY.to_string(), first.name().to_string());
        }
    }
    parts.extend(held.iter().map(|(k, t)| f32_part(k.clone(), t)));
    parts.extend(extra.into_iter().map(|(k, t)| f32_part(k, t)));
    Ok(write_parts(path, &parts, &metadata)?)
}
