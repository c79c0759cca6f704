//! LoRA adapters in PEFT's on-disk layout, so that PEFT can read ours and we can read PEFT's:
//! a directory holding `adapter_model.safetensors` (keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) and
//! `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules`, ...).
//! The target modules are the [`Linear`] layers given, named by [`Linear::name`] (the module's
//! path in the PyTorch model: `model.0.model.0`, or `0`, `3` for an `nn.Sequential`).
//!
//! nibble's adapters are unscaled (`y += B A x`), so we save `lora_alpha = r`. Loading a PEFT
//! adapter with another `lora_alpha` folds PEFT's scaling `lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`) into B.

use crate::error::{Error, Result};
use crate::linear::{Linear, LoraAdapter};
use nibble_autograd::Param;
use nibble_io::{write_safetensors, Checkpoint, DType};
use nibble_tensor::Tensor;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// File name of the adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter config inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

fn adapter_error(dir: &Path, what: impl Into<String>) -> Error {
    Error::Adapter {
        path: dir.to_path_buf(),
        what: what.into(),
    }
}

/// Writes the adapters of `layers` (those that have one) to `dir` (created if missing). All
/// adapters must share one rank; at least one layer must have an adapter.
pub fn save_adapter<'a>(layers: impl IntoIterator<Item = &'a Linear>, dir: &Path) -> Result<()> {
    let layers: Vec<_> = layers
        .into_iter()
        .filter_map(|l| l.lora.as_ref().map(|a| (l.name.clone(), a)))
        .collect();
    let Some((_, first)) = layers.first() else {
        return Err(adapter_error(dir, "no layer has a LoRA adapter to save"));
    };
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
    write_safetensors(&dir.join(WEIGHTS_FILE), &entries, &BTreeMap::new())?;
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
        "target_modules": layers.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&config).expect("json value");
    let path = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|source| Error::Io {
            path,
            op: "write",
            source,
        })
}

/// PEFT's scaling of `B A x`, read from the config.
fn read_scaling(dir: &Path) -> Result<(usize, f32)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read(&path).map_err(|source| Error::Io {
        path: path.clone(),
        op: "read",
        source,
    })?;
    if text.len() > 1 << 20 {
        return Err(adapter_error(
            &path,
            "adapter_config.json is larger than 1 MiB",
        ));
    }
    let config: Value = serde_json::from_slice(&text)
        .map_err(|e| adapter_error(&path, format!("invalid JSON: {e}")))?;
    let field = |name: &str| config.get(name);
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(adapter_error(
                &path,
                format!("peft_type must be \"LORA\", found {other:?}"),
            ))
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0 && r <= 1 << 16)
        .ok_or_else(|| {
            adapter_error(
                &path,
                format!("`r` must be a positive integer, found {:?}", field("r")),
            )
        })? as usize;
    let alpha = match field("lora_alpha") {
        None | Some(Value::Null) => r as f64,
        Some(v) => v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
            adapter_error(&path, format!("`lora_alpha` must be a number, found {v}"))
        })?,
    };
    match field("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(b) => {
            return Err(adapter_error(
                &path,
                format!("bias = \"{b}\" is not supported (only \"none\")"),
            ))
        }
    }
    let rslora = field("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let scaling = if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    };
    Ok((r, scaling as f32))
}

/// Loads the adapters saved in `dir` onto `layers`: each layer whose
/// `base_model.model.<name>.lora_A.weight` / `lora_B.weight` pair is in the file gets it (an
/// adapter is attached, trainable, where the layer has none, and that layer's base weight and
/// bias are frozen; PEFT's `lora_alpha / r` scaling is folded into B). Shapes are checked against the layer (`A` `[r, in]`, `B` `[out, r]`); a tensor that
/// belongs to none of `layers`, a lone A or B, or NaN/Inf values are errors.
pub fn load_adapter<'a>(
    layers: impl IntoIterator<Item = &'a mut Linear>,
    dir: &Path,
) -> Result<()> {
    let (rank, scaling) = read_scaling(dir)?;
    let file = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
    let mut layers: Vec<&mut Linear> = layers.into_iter().collect();
    // Every tensor is read and checked before any layer changes, so a bad file leaves the
    // model as it was.
    let mut seen = HashSet::new();
    let mut loaded = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        let (out, inp) = layer.dims();
        let mut found = Vec::with_capacity(2);
        for (suffix, shape, scale) in [
            ("lora_A", [rank, inp], 1.0f32),
            ("lora_B", [out, rank], scaling),
        ] {
            let key = [
                format!("base_model.model.{}.{suffix}.weight", layer.name),
                format!("base_model.model.{}.{suffix}.default.weight", layer.name),
            ]
            .into_iter()
            .find(|k| file.info(k).is_some());
            let Some(key) = key else { continue };
            let mut t = file.tensor_f32(&key, Some(&shape))?;
            if scale != 1.0 {
                t.scale_assign(scale);
            }
            if t.data().iter().any(|v| !v.is_finite()) {
                return Err(adapter_error(dir, format!("`{key}` holds NaN or Inf")));
            }
            seen.insert(key);
            found.push(t);
        }
        match <[Tensor; 2]>::try_from(found) {
            Ok([a, b]) => loaded.push((index, a, b)),
            Err(found) if found.is_empty() => {}
            Err(_) => {
                return Err(adapter_error(
                    dir,
                    format!("layer {} has only one of lora_A and lora_B", layer.name),
                ))
            }
        }
    }
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    if let Some(extra) = file.keys().find(|k| !seen.contains(*k)) {
        return Err(adapter_error(
            dir,
            format!(
                "`{extra}` does not match any LoRA layer of the model (rank {rank}; modules: {})",
                names.join(", ")
            ),
        ));
    }
    if seen.is_empty() {
        return Err(adapter_error(dir, "no LoRA tensors in the adapter file"));
    }
    for (index, a, b) in loaded {
        let layer = &mut layers[index];
        match &layer.lora {
            Some(lora) => {
                *lora.a.value_mut() = a;
                *lora.b.value_mut() = b;
            }
            None => {
                // As PEFT does: with an adapter on it, the base stops training.
                for p in layer.params() {
                    p.set_requires_grad(false);
                }
                let module = &layer.name;
                layer.lora = Some(LoraAdapter {
                    a: Param::new(format!("{module}.lora_a.weight"), a, true),
                    b: Param::new(format!("{module}.lora_b.weight"), b, true),
                });
            }
        }
    }
    Ok(())
}
