//! Writing LoRA adapters in PEFT's layout.

use super::{adapter_error, CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::linear::Linear;
use nibble_io::{refuse_non_regular, replace_file, write_safetensors, DType};
use nibble_tensor::Tensor;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Whether [`save_adapter`] could write to `dir`, checked before the work that makes the
/// adapter (a fit's minutes are not lost to a bad path): `dir` missing or a directory, and
/// neither [`WEIGHTS_FILE`] nor [`CONFIG_FILE`] in it anything but a regular file (a link, a
/// FIFO, a directory), which the write would replace; the error names the path.
pub fn check_destination(dir: &Path) -> Result<()> {
    if std::fs::symlink_metadata(dir).is_ok_and(|m| !m.is_dir()) && !dir.is_dir() {
        return Err(adapter_error(
            dir,
            "exists and is not a directory (an adapter is saved as a directory in PEFT's layout)",
        ));
    }
    refuse_non_regular(&dir.join(WEIGHTS_FILE))?;
    refuse_non_regular(&dir.join(CONFIG_FILE))?;
    Ok(())
}

/// Writes the adapters of `layers` (those that have one) to `dir` (created if missing). All
/// adapters must share one rank; at least one layer must have an adapter.
///
/// Each file ([`WEIGHTS_FILE`], [`CONFIG_FILE`]) is written to a temporary file and renamed
/// over its name, so an existing regular file is replaced atomically. If either name exists in
/// `dir` as anything else — a symbolic link (even to a regular file), a directory, a device, a
/// FIFO or a socket — nothing is written and the error names it and what it is.
pub fn save_adapter<'a>(layers: impl IntoIterator<Item = &'a Linear>, dir: &Path) -> Result<()> {
    let layers: Vec<_> = layers
        .into_iter()
        .filter_map(|l| l.lora.as_ref().map(|a| (l.name.clone(), a)))
        .collect();
    let Some((_, first)) = layers.first() else {
        return Err(adapter_error(dir, "no layer has a LoRA adapter to save"));
    };
    if let Some((name, _)) = layers.iter().find(|(_, a)| a.dora.is_some()) {
        return Err(adapter_error(
            dir,
            format!("layer {name} has a DoRA adapter (loaded from PEFT's): saving DoRA is not supported"),
        ));
    }
    let rank = first.rank();
    if let Some((name, a)) = layers.iter().find(|(_, a)| a.rank() != rank) {
        return Err(adapter_error(
            dir,
            format!(
                "layer {name} has rank {}, others rank {rank}: one adapter file holds one rank",
                a.rank()
            ),
        ));
    }
    // Both files are checked before either is written, so a refusal leaves nothing half-saved.
    check_destination(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    let config_path = dir.join(CONFIG_FILE);
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        op: "create directory",
        source,
    })?;
    let tensors: Vec<(String, Tensor)> = layers
        .iter()
        .flat_map(|(name, a)| {
            [
                (
                    format!("base_model.model.{name}.lora_A.weight"),
                    a.a.value().clone(),
                ),
                (
                    format!("base_model.model.{name}.lora_B.weight"),
                    a.b.value().clone(),
                ),
            ]
        })
        .collect();
    let entries: Vec<(String, DType, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                DType::F32,
                t.shape().to_vec(),
                bytemuck::cast_slice::<f32, u8>(t.data()),
            )
        })
        .collect();
    write_safetensors(&weights, &entries, &BTreeMap::new())?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "modules_to_save": null,
        "target_modules": target_modules(&layers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()),
    });
    let text = serde_json::to_string_pretty(&config).expect("json value");
    Ok(replace_file(&config_path, |w| {
        w.write_all(text.as_bytes())
    })?)
}

/// `target_modules` that makes PEFT adapt exactly the modules `names`. PEFT selects a module by
/// a list entry that is its whole name *or the end of it after a dot*, so where the Linears sit
/// at different depths (`nn.Sequential(block(64, 32), block(32, 16), nn.Linear(16, 10))`, each
/// block a `Sequential(Linear, BatchNorm1d, ReLU)`: Linears `0.0`, `1.0`, `2`) the entry `2`
/// also names the blocks' ReLUs `0.2` and `1.2`, which a state dict does not show, and
/// `PeftModel.from_pretrained` refused the adapter ("Target module ReLU() is not supported").
/// There the names are written as one regex of the whole names (`^(0\.0|1\.0|2)$`), which
/// PEFT matches with `re.fullmatch`; Linears all at one depth (an `nn.Sequential`'s `0`, `3`,
/// `5`, a wrapped `net.0`, BigNet's `model.0.model.0`) keep the plain list.
fn target_modules(names: &[&str]) -> serde_json::Value {
    let depth = |n: &&str| n.matches('.').count();
    if names.iter().map(depth).min() == names.iter().map(depth).max() {
        return json!(names);
    }
    let alternatives: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
    json!(format!("^({})$", alternatives.join("|")))
}
