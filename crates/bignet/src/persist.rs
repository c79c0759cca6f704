//! Saving a model to safetensors and loading quantized checkpoints straight from the mapped
//! file. A file written here carries `__metadata__["nibble.format"]` naming the weights'
//! storage (`f32`, `f16`, `q4`, `nf4`, `nf4_dq`, `int8`, `lower`); f32 and f16 files are plain
//! PyTorch state dicts, the others follow the layout in [`crate::frozen`]. Biases and LayerNorms
//! keep their own names.

use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::frozen::{f32_part, write_parts, FrozenWeight, Part};
use crate::layer::{FrozenBias, Linear, LinearBase};
use crate::model::{BigNet, Norm};
use crate::source::{linear_key, norm_key, BLOCKS, LAYERS_PER_BLOCK};
use crate::variant::{Variant, WeightFormat};
use nibble_autograd::Param;
use nibble_tensor::f16;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

pub use nibble_io::FORMAT_KEY;

/// Writes the model's weights (not its LoRA adapters: see [`crate::adapter`]) to `path`.
pub fn save_model(model: &BigNet, path: &Path) -> Result<()> {
    let mut format = None;
    // f32 copies of trainable parameters and LayerNorms, alive until written
    let mut held = Vec::new();
    let mut parts: Vec<Part<'_>> = Vec::new();
    for layer in model.linears() {
        let key = &layer.name;
        match &layer.base {
            LinearBase::Trainable { weight, bias } => {
                format = Some(WeightFormat::F32);
                held.push((format!("{key}.weight"), weight.value().clone()));
                held.extend(
                    bias.as_ref()
                        .map(|b| (format!("{key}.bias"), b.value().clone())),
                );
            }
            LinearBase::Frozen { weight, bias } => {
                format = Some(weight.format());
                parts.extend(weight.parts(&format!("{key}.weight")));
                if let Some(bias) = bias {
                    let (dtype, bytes) = match bias {
                        FrozenBias::F32(b) => (DType::F32, bytemuck::cast_slice::<f32, u8>(b)),
                        FrozenBias::F16(b) => (DType::F16, bytemuck::cast_slice::<f16, u8>(b)),
                    };
                    parts.push((
                        format!("{key}.bias"),
                        dtype,
                        vec![bias.len()],
                        Cow::Borrowed(bytes),
                    ));
                }
            }
        }
    }
    for norm in model.norms() {
        for p in [&norm.weight, &norm.bias] {
            held.push((p.name().to_string(), p.value().clone()));
        }
    }
    parts.extend(held.iter().map(|(k, t)| f32_part(k.clone(), t)));
    let mut metadata = BTreeMap::new();
    let format = format.unwrap_or(WeightFormat::F32);
    metadata.insert(FORMAT_KEY.to_string(), format.name().to_string());
    metadata.insert("nibble.dim".to_string(), model.dim().to_string());
    Ok(write_parts(path, &parts, &metadata)?)
}

/// The quantized format a checkpoint declares, if any (`None` for plain state dicts, including
/// nibble's own f32 and f16 files); a state dict whose first linear weight is in
/// bitsandbytes' 4-bit layout ([`nibble_io::bnb`]) is NF4 or NF4-DQ as that weight is (FP4 or
/// other block sizes: `None`, read as f32 weights), one in its 8-bit layout int8.
pub fn quantized_format(file: &Checkpoint) -> Result<Option<WeightFormat>> {
    let Some(name) = file.metadata().get(FORMAT_KEY) else {
        return bnb_format(file);
    };
    match WeightFormat::from_name(name) {
        Some(WeightFormat::F32 | WeightFormat::F16) => Ok(None),
        Some(f) => Ok(Some(f)),
        None => Err(Error::Model {
            what: format!(
                "{}: unknown {FORMAT_KEY} `{name}` (expected q4, nf4, nf4_dq, int8, lower, f16 or f32)",
                file.path().display()
            ),
        }),
    }
}

/// The format a bitsandbytes BigNet runs from its codes: NF4 in blocks of 64 (`nf4`, or
/// `nf4_dq` double-quantized) or 8-bit (`int8`), where every one of its 18 Linears is stored
/// so. Any other file, FP4 or NF4 in other blocks, and a model whose Linears differ (some
/// quantized and some f32, as `llm_int8_skip_modules` leaves them, or NF4 with and without
/// double quantization) are read as f32 weights, as a plain state dict
/// (`loader::CheckpointSource` dequantizes each layer): `None`. Such a model was refused,
/// the error naming a key of nibble's own layout.
fn bnb_format(file: &Checkpoint) -> Result<Option<WeightFormat>> {
    let mut common: Option<WeightFormat> = None;
    for block in 0..6 {
        for layer in 0..3 {
            let key = format!("{}.weight", linear_key(block, layer));
            // The quant state alone says the format: the codes are read once, by the loader.
            let format = if nibble_io::bnb::is_bnb_4bit(file, &key) {
                match nibble_io::bnb::bnb_4bit_info(file, &key)?.native_format() {
                    Some(format) => format,
                    None => return Ok(None),
                }
            } else if nibble_io::bnb::is_bnb_8bit(file, &key) {
                WeightFormat::Int8
            } else {
                return Ok(None);
            };
            if common.is_some_and(|c| c != format) {
                return Ok(None);
            }
            common = Some(format);
        }
    }
    Ok(common)
}

fn f32_param(file: &Checkpoint, key: &str, dim: usize, train: bool) -> Result<Param> {
    Ok(Param::new(key, file.tensor_f32(key, Some(&[dim]))?, train))
}

/// Builds the model a quantized checkpoint holds, mapping its packed weights with no copy.
/// `variant` must be the format's own variant, or `qlora` over a Q4 file (adapters are then
/// attached, seeded from `lora_seed`).
pub fn load_quantized(
    file: &Checkpoint,
    format: WeightFormat,
    variant: Variant,
    lora_seed: u64,
) -> Result<BigNet> {
    let implied = Variant::for_format(format);
    let wants_lora = variant == Variant::Qlora && implied == Variant::LowPrecision;
    if variant != implied && !wants_lora {
        return Err(Error::Model {
            what: format!(
                "{}: the file holds {} weights (variant {implied}); it cannot be loaded as {variant}",
                file.path().display(),
                format.name()
            ),
        });
    }
    let dim = match file.info(&format!("{}.bias", linear_key(0, 0))) {
        Some((_, [d])) if *d > 0 => *d,
        _ => {
            return Err(Error::Model {
                what: format!(
                    "{}: no `{}.bias` [dim]: cannot tell the model width",
                    file.path().display(),
                    linear_key(0, 0)
                ),
            })
        }
    };
    let mut expected: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut blocks = Vec::with_capacity(BLOCKS);
    for b in 0..BLOCKS {
        let mut layers = Vec::with_capacity(LAYERS_PER_BLOCK);
        for l in 0..LAYERS_PER_BLOCK {
            let name = linear_key(b, l);
            let wkey = format!("{name}.weight");
            let weight = if nibble_io::bnb::is_bnb_4bit(file, &wkey) {
                let (weight, stored, out, inn) = nibble_io::bnb::read_bnb_4bit(file, &wkey)?;
                if (stored, out, inn) != (format, dim, dim) {
                    return Err(Error::Model {
                        what: format!(
                            "{}: `{wkey}` is {} [{out}, {inn}] in bitsandbytes' layout where the model's first layer is {} [{dim}, {dim}]",
                            file.path().display(),
                            stored.name(),
                            format.name()
                        ),
                    });
                }
                expected.extend(nibble_io::bnb::part_keys(&wkey));
                weight
            } else if nibble_io::bnb::is_bnb_8bit(file, &wkey) {
                let (weight, out, inn) = nibble_io::bnb::read_bnb_8bit(file, &wkey)?;
                if (format, out, inn) != (WeightFormat::Int8, dim, dim) {
                    return Err(Error::Model {
                        what: format!(
                            "{}: `{wkey}` is bitsandbytes 8-bit [{out}, {inn}] where the model's first layer is {} [{dim}, {dim}]",
                            file.path().display(),
                            format.name()
                        ),
                    });
                }
                expected.extend([
                    wkey.clone(),
                    format!("{name}.SCB"),
                    format!("{name}.weight_format"),
                ]);
                weight
            } else {
                let weight = FrozenWeight::from_checkpoint(file, format, &wkey, dim, dim)?;
                for (k, ..) in weight.parts(&wkey) {
                    expected.insert(k);
                }
                weight
            };
            let bkey = format!("{name}.bias");
            let bias = FrozenBias::F32(file.tensor_f32(&bkey, Some(&[dim]))?.into_vec());
            expected.insert(bkey);
            layers.push(Linear {
                name,
                base: LinearBase::Frozen {
                    weight,
                    bias: Some(bias),
                },
                lora: None,
            });
        }
        blocks.push(layers.try_into().expect("three layers"));
    }
    let mut norms = Vec::with_capacity(BLOCKS - 1);
    for b in 0..BLOCKS - 1 {
        let name = norm_key(b);
        let (wk, bk) = (format!("{name}.weight"), format!("{name}.bias"));
        norms.push(Norm {
            weight: f32_param(file, &wk, dim, false)?,
            bias: f32_param(file, &bk, dim, false)?,
        });
        expected.insert(wk);
        expected.insert(bk);
    }
    if let Some(extra) = file.keys().find(|k| !expected.contains(*k)) {
        return Err(Error::Model {
            what: format!(
                "{}: unexpected tensor `{extra}` in a {} checkpoint of width {dim}",
                file.path().display(),
                format.name()
            ),
        });
    }
    let mut model = BigNet::from_parts(implied, dim, blocks, norms)?;
    if wants_lora {
        model.attach_lora(lora_seed)?;
    }
    Ok(model)
}
