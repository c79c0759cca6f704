//! `nibble inspect FILE`: every tensor of a state dict or quantized checkpoint with its dtype,
//! shape, storage format and bytes, and the total.

use crate::error::Result;
use nibble_io::Checkpoint;
use nibble_nn::layout::ModuleLayout;
use serde::Serialize;
use std::path::Path;

/// One tensor as `inspect` reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorInfo {
    /// The tensor's key.
    pub name: String,
    /// Its element type (`f32`, `u8`, ...).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The storage it belongs to: a quantized format (`q4`, `nf4`, `nf4_dq`, `int8`, `lower`)
    /// for the parts of a quantized weight, otherwise the dtype.
    pub format: String,
    /// Bytes of data.
    pub bytes: usize,
}

/// What `inspect` reports (also its `--json` object).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Inspection {
    /// The file.
    pub file: String,
    /// Total bytes of tensor data.
    pub bytes: usize,
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorInfo>,
}

/// The quantized format a tensor named `key` is a part of, from the part suffixes of
/// [`nibble_io::frozen`] (`K.q4.packed`, `K.nf4.absmax`, ...) or of bitsandbytes' 4-bit and
/// 8-bit layouts ([`nibble_io::bnb`]; `fp4` for an FP4 weight, which is read as f32), or `None`
/// for a plain tensor.
pub fn part_format(file: &Checkpoint, key: &str) -> Option<&'static str> {
    if let Some(info) = nibble_io::bnb::part_info(file, key) {
        return Some(match info.native_format() {
            Some(format) => format.name(),
            // Read dequantized to f32: the codebook's name.
            None => info.quant_type.name(),
        });
    }
    // bitsandbytes' 8-bit layout: `M.weight` i8 with `M.SCB` and `M.weight_format` beside it.
    let weight = match ["SCB", "weight_format"]
        .iter()
        .find_map(|s| key.strip_suffix(s))
    {
        Some(module) => format!("{module}weight"),
        None => key.to_string(),
    };
    if (weight == "weight" || weight.ends_with(".weight"))
        && nibble_io::bnb::is_bnb_8bit(file, &weight)
    {
        return Some("int8");
    }
    let (base, kind) = ["q4", "nf4", "int8", "lower"]
        .into_iter()
        .find_map(|kind| key.rfind(&format!(".{kind}.")).map(|at| (&key[..at], kind)))?;
    if kind == "nf4" && file.contains(&format!("{base}.nf4.absmax_codes")) {
        return Some("nf4_dq");
    }
    Some(kind)
}

/// Describes every tensor of `path`.
pub fn inspect(path: &Path) -> Result<Inspection> {
    Ok(describe(path, &Checkpoint::open(path)?))
}

/// Every tensor of `file`, opened from `path`.
fn describe(path: &Path, file: &Checkpoint) -> Inspection {
    let tensors: Vec<TensorInfo> = file
        .keys()
        .filter_map(|key| {
            let (dtype, shape) = file.info(key)?;
            let bytes = shape
                .iter()
                .try_fold(dtype.size_of(), |acc, &d| acc.checked_mul(d))
                .unwrap_or(usize::MAX);
            Some(TensorInfo {
                name: key.to_string(),
                dtype: dtype.name().to_string(),
                shape: shape.to_vec(),
                format: part_format(file, key)
                    .map(str::to_string)
                    .unwrap_or_else(|| dtype.name().to_string()),
                bytes,
            })
        })
        .collect();
    Inspection {
        file: path.display().to_string(),
        bytes: tensors
            .iter()
            .fold(0usize, |acc, t| acc.saturating_add(t.bytes)),
        tensors,
    }
}

/// The width of a table's name column: the longest of `names`, and at least that of the
/// header "name".
pub(crate) fn name_column_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(str::len).max().unwrap_or(0).max("name".len())
}

/// Runs `inspect`, printing a table or (with `json`) one JSON object.
pub fn run(path: &Path, json: bool) -> Result<()> {
    let file = Checkpoint::open(path)?;
    let report = describe(path, &file);
    if json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
        return Ok(());
    }
    let width = name_column_width(report.tensors.iter().map(|t| t.name.as_str()));
    println!(
        "{:<width$}  {:<5}  {:<16}  {:<7}  {:>10}",
        "name", "dtype", "shape", "format", "bytes"
    );
    for t in &report.tensors {
        println!(
            "{:<width$}  {:<5}  {:<16}  {:<7}  {:>10}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.format,
            t.bytes
        );
    }
    println!(
        "{} tensors, {} bytes ({})",
        report.tensors.len(),
        report.bytes,
        report.file
    );
    if let Some(line) = module_order(&file) {
        println!("{line}");
    }
    if let Some(line) = pickled_layers(path, file) {
        println!("{line}");
    }
    Ok(())
}

/// For a whole pickled model (`torch.save(model)`), what `eval` and `finetune` read from it
/// in place of `--activation` and `--norm` (see [`crate::pickled`]), or why they cannot run
/// it; `None` for any other file.
fn pickled_layers(path: &Path, file: Checkpoint) -> Option<String> {
    let file = crate::model::without_wrappers(file);
    let prefix = crate::model::sequential_prefix(&file);
    match crate::pickled::pickled_flags(&file, &prefix, path, None) {
        Ok(Some(flags)) => {
            let mut line = format!(
                "a whole pickled model: eval and finetune read its layers from it (--activation \
                 {}{})",
                flags
                    .activation
                    .as_deref()
                    .unwrap_or("not read: relu, its default, in each gap"),
                flags
                    .norm
                    .as_deref()
                    .map(|n| format!(", --norm {n}"))
                    .unwrap_or_default()
            );
            if !flags.dropped.is_empty() {
                line.push_str(&format!(
                    "; its loss {} is no layer and left out",
                    crate::model::backticked(&flags.dropped)
                ));
            }
            if !flags.unread.is_empty() {
                line.push_str(&format!(
                    "; {} registered outside its layers, not run",
                    crate::model::backticked(&flags.unread)
                ));
            }
            Some(line)
        }
        Ok(None) => None,
        Err(e) => Some(format!(
            "a whole pickled model that eval and finetune cannot run: {e}"
        )),
    }
}

/// For a classifier's state dict, its modules in the order `eval` and `finetune` run them and
/// the gaps `--activation` fills: what a user needs to write that list. `None` for a file
/// that is no such state dict (or a BigNet's).
fn module_order(file: &Checkpoint) -> Option<String> {
    let prefix = crate::model::sequential_prefix(file);
    let layout = ModuleLayout::read(file, &prefix)
        .ok()
        .filter(|layout| !crate::model::is_bignet(layout, &prefix))?;
    let paths: Vec<String> = layout
        .modules
        .iter()
        .map(|m| format!("{prefix}{}", m.path))
        .collect();
    let gaps = match layout.gaps().len() {
        1 => "1 gap".to_string(),
        n => format!("{n} gaps"),
    };
    Some(if layout.named {
        format!(
            "named modules, run in this order (--order changes it): {}; --activation takes one \
             entry for the {gaps} between them, or one per gap",
            paths.join(" → ")
        )
    } else {
        format!(
            "an nn.Sequential of modules {}; {gaps} between them (parameter-free layers), \
             which --activation fills",
            paths.join(", ")
        )
    })
}
