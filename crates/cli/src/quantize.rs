//! `nibble quantize IN --format F --output OUT`: every 2-D floating-point tensor of a state dict
//! (or those whose key matches `--include`) stored in format F, everything else copied as it is.
//!
//! The output is a safetensors file in the layout of [`nibble_io::frozen`]: a quantized weight
//! `K` becomes its parts (`K.q4.packed`, `K.q4.norm`, ...), and `__metadata__` records the
//! format ([`nibble_io::FORMAT_KEY`]) and each quantized weight's `[out, in]` shape
//! ([`shape_metadata_key`]: `nibble.shape.K` = `out,in`), so that a reader can rebuild the weights without
//! re-quantizing. The input is never overwritten.
//!
//! A checkpoint that already holds quantized weights (nibble's layouts or bitsandbytes' 4-bit
//! and 8-bit ones) is refused ([`Error::AlreadyQuantized`]): its codes and scales are not
//! weights. So is a weight with a NaN or infinite value, or one the format cannot store (an
//! f16 value beyond ±65504, an int8 row or a `lower` group whose range overflows its scale and
//! minimum): [`Error::Weight`] names the key, row, column and value; nothing non-finite is
//! written.
//!
//! A weight-normalized Linear (`parametrizations.weight.original0` / `original1`, or
//! `weight_g` / `weight_v`) is one weight, `g · v / ‖v‖` ([`nibble_nn::VarBuilder::weight_norm`]):
//! it is stored as `<module>.weight` in the format (`--include` matches that key), and its two
//! parts are not written.

use crate::compare::{abs_diff, cosine};
use crate::error::{Error, Result};
use crate::inspect::name_column_width;
use crate::paths::refuse_overwrite;
use nibble_io::frozen::{shape_metadata_key, Part};
use nibble_io::{write_safetensors, Checkpoint, DType, FrozenWeight, WeightFormat, FORMAT_KEY};
use nibble_nn::layout::{ModuleLayout, MODULE_ORDER_KEY};
use regex::Regex;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// One quantized tensor in the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorReport {
    /// The tensor's key.
    pub name: String,
    /// Its `[out, in]` shape.
    pub shape: Vec<usize>,
    /// Largest |quantized - original|.
    pub max_diff: f64,
    /// Mean |quantized - original|.
    pub mean_diff: f64,
    /// Cosine similarity of the quantized tensor to the original (flattened).
    pub cosine: f64,
    /// Bytes the tensor took in the input.
    pub bytes_before: usize,
    /// Bytes its parts take in the output.
    pub bytes_after: usize,
}

/// What `quantize` reports (also its `--json` object).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuantizeReport {
    /// The format written.
    pub format: String,
    /// Bytes of tensor data in the input.
    pub bytes_before: usize,
    /// Bytes of tensor data in the output.
    pub bytes_after: usize,
    /// The quantized tensors.
    pub tensors: Vec<TensorReport>,
}

/// The dtypes a weight to quantize may have.
fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// Quantizes `input` into `output` (see the module docs). `include`, if given, selects the
/// 2-D floating-point tensors to quantize by a regular-expression search in their keys.
pub fn quantize(
    input: &Path,
    format: WeightFormat,
    output: &Path,
    include: Option<&str>,
) -> Result<QuantizeReport> {
    refuse_overwrite(output, &[(input, "the input")])?;
    let include = include
        .map(Regex::new)
        .transpose()
        .map_err(|e| Error::Usage {
            arg: "--include",
            what: e.to_string(),
        })?;
    let file = Checkpoint::open(input)?;
    if let Some((key, format)) = quantized_weight(&file) {
        return Err(Error::AlreadyQuantized {
            path: input.to_path_buf(),
            key,
            format,
        });
    }
    let mut report = QuantizeReport {
        format: format.name().to_string(),
        bytes_before: 0,
        bytes_after: 0,
        tensors: Vec::new(),
    };
    let mut owned: Vec<Part<'_>> = Vec::new();
    let mut weights: Vec<(String, FrozenWeight)> = Vec::new();
    let mut metadata: BTreeMap<String, String> = file
        .metadata()
        .iter()
        .filter(|(k, _)| k.as_str() != FORMAT_KEY && !k.starts_with(&shape_metadata_key("")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let selects = |key: &str| !matches!(&include, Some(re) if !re.is_match(key));
    let norms = weight_norms(&file);
    for key in file.keys() {
        let Some((dtype, shape)) = file.info(key) else {
            continue;
        };
        // Counted without copying a strided `.pth` tensor (`bytes` keeps its copy while the
        // file is open; the weights are read through `tensor_f32`, which does not).
        let len = file.byte_len(key)?;
        report.bytes_before += len;
        // A weight-normalized Linear: its v part stands for the weight, its g part is folded in.
        let folded = norms.iter().find(|n| n.g == key || n.v == key);
        // The input bytes the weight took: a weight-normalized one's g and v parts.
        let mut bytes_before = len;
        let (key, original) = match folded {
            Some(n) if selects(&n.weight) && is_float(dtype) => {
                if n.g == key {
                    continue;
                }
                bytes_before += file.byte_len(&n.g)?;
                let vb = nibble_nn::VarBuilder::new(&file).pp(&n.module);
                // `weight_norms` found both parts, so the weight is there (or an error).
                let w = vb.weight_norm()?.ok_or_else(|| Error::Usage {
                    arg: "IN",
                    what: format!(
                        "{}: `{}` and `{}` are not a weight-normalized Linear",
                        input.display(),
                        n.g,
                        n.v
                    ),
                })?;
                (n.weight.as_str(), w)
            }
            _ if shape.len() == 2 && is_float(dtype) && selects(key) && folded.is_none() => {
                (key, file.tensor_f32(key, None)?)
            }
            _ => {
                let bytes = file.bytes(key)?;
                report.bytes_after += bytes.len();
                owned.push((key.to_string(), dtype, shape.to_vec(), Cow::Borrowed(bytes)));
                continue;
            }
        };
        let shape = original.shape().to_vec();
        let cols = shape[1];
        let weight_error = |k: usize, what: String| Error::Weight {
            path: input.to_path_buf(),
            key: key.to_string(),
            row: k / cols.max(1),
            col: k % cols.max(1),
            what,
        };
        if let Some(k) = original.data().iter().position(|v| !v.is_finite()) {
            return Err(weight_error(
                k,
                format!(
                    "{} is not a finite weight (as f32); only finite weights are quantized",
                    original.data()[k]
                ),
            ));
        }
        // The weight as f32 and its quantized parts (per-row scales and offsets at most 16
        // bytes a row): a weight wide but empty (`[2^40, 0]`, no bytes in the file) would make
        // the format's per-row parts abort the process.
        let (rows, numel) = (shape[0] as u128, original.numel() as u128);
        nibble_tensor::machine::fits(8 * numel + 16 * rows).map_err(|(need, total)| {
            Error::Usage {
                arg: "IN",
                what: format!(
                    "{}: quantizing `{key}` {shape:?} needs {need:.1} GiB; this machine has \
                     {total:.1} GiB",
                    input.display()
                ),
            }
        })?;
        let (stored, after): (Vec<f32>, usize) = if format == WeightFormat::F32 {
            let data = original.data().to_vec();
            let n = data.len() * 4;
            owned.push((
                key.to_string(),
                DType::F32,
                shape.clone(),
                Cow::Owned(bytemuck_f32(&data)),
            ));
            (data, n)
        } else {
            // A weight the format cannot hold: the library names the key, row and column;
            // the error here adds the input file.
            let weight = match FrozenWeight::quantize(format, key, &original) {
                Err(nibble_io::Error::Unstorable {
                    row, col, source, ..
                }) => return Err(weight_error(row * cols.max(1) + col, source.to_string())),
                r => r?,
            };
            let after = weight.parts(key).iter().map(|p| p.3.len()).sum();
            let stored = weight.matrix().to_f32().into_vec();
            metadata.insert(
                shape_metadata_key(key),
                format!("{},{}", shape[0], shape[1]),
            );
            weights.push((key.to_string(), weight));
            (stored, after)
        };
        let (max_diff, mean_diff) = abs_diff(&stored, original.data());
        report.bytes_after += after;
        report.tensors.push(TensorReport {
            name: key.to_string(),
            shape,
            max_diff,
            mean_diff,
            cosine: cosine(&stored, original.data()),
            bytes_before,
            bytes_after: after,
        });
    }
    if let (Some(re), true) = (&include, report.tensors.is_empty()) {
        // A file of nothing quantized is not what was asked for (a mistyped pattern).
        let weights: Vec<&str> = file
            .keys()
            .filter(|k| {
                file.info(k)
                    .is_some_and(|(d, s)| s.len() == 2 && is_float(d))
            })
            .take(6)
            .collect();
        return Err(Error::Usage {
            arg: "--include",
            what: format!(
                "`{re}` matches none of the weights of {} ({}); nothing written",
                input.display(),
                if weights.is_empty() {
                    "it has no 2-D floating-point tensor".to_string()
                } else {
                    format!("such as {}", weights.join(", "))
                }
            ),
        });
    }
    let mut entries: Vec<(String, DType, Vec<usize>, &[u8])> = owned
        .iter()
        .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_ref()))
        .collect();
    let parts: Vec<_> = weights.iter().flat_map(|(k, w)| w.parts(k)).collect();
    entries.extend(
        parts
            .iter()
            .map(|(k, d, s, b)| (k.clone(), *d, s.clone(), b.as_ref())),
    );
    metadata.insert(FORMAT_KEY.to_string(), format.name().to_string());
    // Named modules (a model of its own class) keep their order, which the output's sorted
    // keys lose.
    metadata.remove(MODULE_ORDER_KEY);
    if let Ok(layout) = ModuleLayout::read(&file, "") {
        if layout.named {
            let order: Vec<String> = layout.modules.into_iter().map(|m| m.path).collect();
            metadata.insert(
                MODULE_ORDER_KEY.to_string(),
                serde_json::Value::from(order).to_string(),
            );
        }
    }
    write_safetensors(output, &entries, &metadata)?;
    Ok(report)
}

/// A weight-normalized Linear's parts in a state dict: g and v, the module they belong to and
/// the key of the weight they make.
struct WeightNorm {
    g: String,
    v: String,
    module: String,
    weight: String,
}

/// The weight-normalized Linears of `file`: each pair of `<m>.parametrizations.weight.original0`
/// / `original1` or `<m>.weight_g` / `weight_v` keys.
fn weight_norms(file: &Checkpoint) -> Vec<WeightNorm> {
    let pairs = [
        (
            ".parametrizations.weight.original0",
            ".parametrizations.weight.original1",
        ),
        (".weight_g", ".weight_v"),
    ];
    file.keys()
        .filter_map(|key| {
            pairs.iter().find_map(|(g, v)| {
                let module = key.strip_suffix(v)?;
                let g = format!("{module}{g}");
                file.info(&g).is_some().then(|| WeightNorm {
                    g,
                    v: key.to_string(),
                    module: module.to_string(),
                    weight: format!("{module}.weight"),
                })
            })
        })
        .collect()
}

/// The first weight of `file` already stored quantized, and its format: nibble's layouts
/// (parts `K.q4.packed`, `K.int8.codes`, ...; see [`nibble_io::frozen`]) and bitsandbytes'
/// 4-bit (`K.quant_state.bitsandbytes__nf4` / `__fp4` beside the codes) and 8-bit (`K` int8,
/// or `SCB` beside it) layouts, as the model reader tells them.
fn quantized_weight(file: &Checkpoint) -> Option<(String, String)> {
    /// Every part suffix of nibble's own layouts, with the format it belongs to.
    const PARTS: [(&str, WeightFormat); 14] = [
        ("q4.packed", WeightFormat::Q4),
        ("q4.norm", WeightFormat::Q4),
        ("nf4.packed", WeightFormat::Nf4),
        ("nf4.absmax", WeightFormat::Nf4),
        ("nf4.absmax_codes", WeightFormat::Nf4Dq),
        ("nf4.absmax_offset", WeightFormat::Nf4Dq),
        ("nf4.absmax_scale", WeightFormat::Nf4Dq),
        ("int8.codes", WeightFormat::Int8),
        ("int8.scale", WeightFormat::Int8),
        ("int8.min", WeightFormat::Int8),
        ("lower.bits", WeightFormat::Lower),
        ("lower.codes", WeightFormat::Lower),
        ("lower.scale", WeightFormat::Lower),
        ("lower.min", WeightFormat::Lower),
    ];
    const BNB_4BIT: [&str; 2] = [
        nibble_io::bnb::QUANT_STATE_NF4,
        "quant_state.bitsandbytes__fp4",
    ];
    for key in file.keys() {
        for (suffix, format) in PARTS {
            if let Some(base) = key.strip_suffix(suffix).and_then(|b| b.strip_suffix('.')) {
                let stored = FrozenWeight::stored_format(file, base).unwrap_or(format);
                return Some((base.to_string(), stored.name().to_string()));
            }
        }
        for suffix in BNB_4BIT {
            if let Some(base) = key.strip_suffix(suffix).and_then(|b| b.strip_suffix('.')) {
                let what = match nibble_io::bnb::bnb_4bit_info(file, base) {
                    Ok(info) => info.describe(),
                    Err(_) => "bitsandbytes 4-bit".to_string(),
                };
                return Some((base.to_string(), what));
            }
        }
        let is_weight = key == "weight" || key.ends_with(".weight");
        if is_weight && nibble_io::bnb::is_bnb_8bit(file, key) {
            return Some((key.to_string(), "bitsandbytes int8".to_string()));
        }
    }
    None
}

fn bytemuck_f32(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Runs `quantize`, printing a summary, the per-tensor table (`report`) or one JSON object.
pub fn run(
    input: &Path,
    format: WeightFormat,
    output: &Path,
    include: Option<&str>,
    report: bool,
    json: bool,
) -> Result<()> {
    let r = quantize(input, format, output, include)?;
    if json {
        println!("{}", serde_json::to_string(&r).expect("serializable"));
        return Ok(());
    }
    if report {
        let width = name_column_width(r.tensors.iter().map(|t| t.name.as_str()));
        println!(
            "{:<width$}  {:<12}  {:>10}  {:>10}  {:>9}  {:>10}  {:>10}",
            "name", "shape", "max |d|", "mean |d|", "cosine", "bytes", "after"
        );
        for t in &r.tensors {
            println!(
                "{:<width$}  {:<12}  {:>10.3e}  {:>10.3e}  {:>9.6}  {:>10}  {:>10}",
                t.name,
                format!("{:?}", t.shape),
                t.max_diff,
                t.mean_diff,
                t.cosine,
                t.bytes_before,
                t.bytes_after
            );
        }
    }
    println!(
        "wrote {}: {} tensors in {}, {} -> {} bytes ({:.1}%)",
        output.display(),
        r.tensors.len(),
        r.format,
        r.bytes_before,
        r.bytes_after,
        100.0 * r.bytes_after as f64 / r.bytes_before.max(1) as f64
    );
    Ok(())
}
