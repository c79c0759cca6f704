//! LoRA adapters in PEFT's on-disk layout, so that PEFT can read ours and we can read PEFT's:
//! a directory holding `adapter_model.safetensors` (keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) and
//! `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules`, ...).
//!
//! nibble's adapters are unscaled (`y += B A x`), so we save `lora_alpha = r`. Loading a PEFT
//! adapter with another `lora_alpha` folds PEFT's scaling `lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`) into B.

use crate::checkpoint::{write_safetensors, Checkpoint, DType};
use crate::error::{Error, Result};
use crate::model::BigNet;
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

/// Writes the model's adapters to `dir` (created if missing).
pub fn save_adapter(model: &BigNet, dir: &Path) -> Result<()> {
    let layers: Vec<_> = model
        .linears()
        .filter_map(|l| l.lora.as_ref().map(|a| (l.name.clone(), a)))
        .collect();
    let Some((_, first)) = layers.first() else {
        return Err(adapter_error(
            dir,
            format!("variant {} has no LoRA adapters to save", model.variant()),
        ));
    };
    let rank = first.rank();
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        op: "create directory",
        source,
    })?;
    let tensors: Vec<(String, nibble_tensor::Tensor)> = layers
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

/// Loads the adapters saved in `dir` into `model` (a `lora` or `qlora` model; a
/// `half_precision` or `low_precision` one gets adapters attached first). Every tensor in the
/// file must belong to one of the model's layers with the right shape.
pub fn load_adapter(model: &mut BigNet, dir: &Path) -> Result<()> {
    let (rank, scaling) = read_scaling(dir)?;
    let file = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
    if model.linears().any(|l| l.lora.is_none()) {
        model.attach_lora(0)?;
    }
    let dim = model.dim();
    let mut seen = HashSet::new();
    for layer in model.linears_mut() {
        let found_before = seen.len();
        let lora = layer.lora.as_mut().expect("attached above");
        for (suffix, shape, param, scale) in [
            ("lora_A", [rank, dim], &lora.a, 1.0f32),
            ("lora_B", [dim, rank], &lora.b, scaling),
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
            *param.value_mut() = t;
            seen.insert(key);
        }
        if seen.len() - found_before == 1 {
            return Err(adapter_error(
                dir,
                format!("layer {} has only one of lora_A and lora_B", layer.name),
            ));
        }
    }
    if let Some(extra) = file.keys().find(|k| !seen.contains(*k)) {
        return Err(adapter_error(
            dir,
            format!(
                "`{extra}` does not match any LoRA layer of this BigNet (width {dim}, rank {rank})"
            ),
        ));
    }
    if seen.is_empty() {
        return Err(adapter_error(dir, "no LoRA tensors in the adapter file"));
    }
    Ok(())
}
