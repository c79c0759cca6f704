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

/// Writes the adapters of `layers` (those that have one) to `dir` (created if missing); at
/// least one layer must have an adapter. Each layer's B is written as PEFT holds it, without
/// the scaling a loaded PEFT adapter has folded in ([`crate::LoraAdapter::b_scale`] `s`: B
/// divided by it), and its `lora_alpha` is `s · r`, so that PEFT's scaling `alpha / r` is `s`:
/// the same outputs, and PEFT training on from the file takes the steps it would have taken
/// on the adapter it came from (a B saved with `s` in it and alpha `r` gave the same outputs,
/// but Adam's steps on it were `1 / s` of PEFT's). nibble's own adapters have `s = 1`: alpha
/// `r`. Layers of other ranks or alphas than the most common ones go into `rank_pattern` /
/// `alpha_pattern`, keyed by their whole names with the dots escaped; where the layers sit at
/// different depths such a key could also name another layer (PEFT matches keys against the
/// ends of names), and a pattern is an error. DoRA adapters are written as PEFT writes them (each layer's
/// `lora_magnitude_vector` beside its `lora_A` and `lora_B`, `use_dora` in the config); a file
/// holds DoRA on every layer or on none, as PEFT's one `use_dora` flag does.
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
    let dora = first.dora.is_some();
    if let Some((name, _)) = layers.iter().find(|(_, a)| a.dora.is_some() != dora) {
        let (with, without) = if dora {
            (&layers[0].0, name)
        } else {
            (name, &layers[0].0)
        };
        return Err(adapter_error(
            dir,
            format!(
                "layer {with} has a DoRA adapter and layer {without} a plain LoRA one: PEFT's \
                 `use_dora` holds for every layer of a file"
            ),
        ));
    }
    let names: Vec<&str> = layers.iter().map(|(n, _)| n.as_str()).collect();
    let ranks: Vec<usize> = layers.iter().map(|(_, a)| a.rank()).collect();
    if let Some((name, a)) = layers.iter().find(|(_, a)| !scale_unfolds(a.b_scale)) {
        return Err(adapter_error(
            dir,
            format!(
                "layer {name}'s adapter holds the scaling {} folded into its B, which cannot be                  taken out again: PEFT's alpha / r must be finite and nonzero",
                a.b_scale
            ),
        ));
    }
    let alphas: Vec<f64> = layers
        .iter()
        .map(|(_, a)| f64::from(a.b_scale) * a.rank() as f64)
        .collect();
    let (rank, alpha, patterned) = patterns(dir, &names, &ranks, &alphas)?;
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
                    unscaled(&a.b.value(), a.b_scale),
                ),
            ]
            .into_iter()
            .chain(a.dora.as_ref().map(|d| {
                (
                    format!("base_model.model.{name}.lora_magnitude_vector"),
                    d.magnitude.value().clone(),
                )
            }))
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
    let mut config = json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "r": rank,
        "lora_alpha": alpha_json(alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "modules_to_save": null,
        "target_modules": target_modules(&names),
    });
    let ranks_of: serde_json::Map<_, _> = patterned
        .iter()
        .filter(|&&i| ranks[i] != rank)
        .map(|&i| (regex::escape(names[i]), json!(ranks[i])))
        .collect();
    let alphas_of: serde_json::Map<_, _> = patterned
        .iter()
        .filter(|&&i| alphas[i] != alpha)
        .map(|&i| (regex::escape(names[i]), alpha_json(alphas[i])))
        .collect();
    if !ranks_of.is_empty() {
        config["rank_pattern"] = json!(ranks_of);
    }
    if !alphas_of.is_empty() {
        config["alpha_pattern"] = json!(alphas_of);
    }
    if dora {
        // Only where it is set: PEFT before 0.9 knows no `use_dora` and refuses the key.
        config["use_dora"] = json!(true);
    }
    let text = serde_json::to_string_pretty(&config).expect("json value");
    Ok(replace_file(&config_path, |w| {
        w.write_all(text.as_bytes())
    })?)
}

/// Whether B's folded scaling `s` can be divided out of it again: finite and nonzero.
fn scale_unfolds(s: f32) -> bool {
    s.is_finite() && s != 0.0
}

/// `b / s` (the B PEFT holds, where `b` holds its scaling `s` folded in); `b` itself for `s = 1`.
fn unscaled(b: &Tensor, s: f32) -> Tensor {
    if s == 1.0 {
        return b.clone();
    }
    let data: Vec<f32> = b.data().iter().map(|v| v / s).collect();
    Tensor::from_vec(b.shape(), data).expect("the shape of b")
}

/// An alpha as JSON: a whole number as an integer (`32`, as PEFT writes its default), any
/// other as a float.
fn alpha_json(alpha: f64) -> serde_json::Value {
    if alpha.fract() == 0.0 && alpha.abs() < 2f64.powi(53) {
        json!(alpha as i64)
    } else {
        json!(alpha)
    }
}

/// The most common of `values` (of those as common, the first layer's).
fn most_common<T: PartialEq + Copy>(values: &[T]) -> Option<T> {
    let count = |v: T| values.iter().filter(|&&q| q == v).count();
    values.iter().copied().fold(None, |best, v| match best {
        Some(b) if count(b) >= count(v) => Some(b),
        _ => Some(v),
    })
}

/// The rank and alpha written as `r` and `lora_alpha` (the most common of `ranks` and of
/// `alphas`, `ranks[i]` and `alphas[i]` being `names[i]`'s) and the indices of the layers that
/// differ in either, for `rank_pattern` / `alpha_pattern`: each keyed by the layer's whole
/// name as a regex (dots escaped), which PEFT's `get_pattern_key` matches against the end of a
/// module's name after a dot (`(.*\.)?(key)$`). Where the layers sit at one depth no name is
/// another's dotted tail, so each key names its layer alone; patterned layers at different
/// depths are an error naming `dir` (the key `0` would also name `1.0`).
fn patterns(
    dir: &Path,
    names: &[&str],
    ranks: &[usize],
    alphas: &[f64],
) -> Result<(usize, f64, Vec<usize>)> {
    let rank = most_common(ranks).unwrap_or(0);
    let alpha = most_common(alphas).unwrap_or(0.0);
    let patterned: Vec<usize> = (0..names.len())
        .filter(|&i| ranks[i] != rank || alphas[i] != alpha)
        .collect();
    let depth = |n: &&str| n.matches('.').count();
    if !patterned.is_empty() && names.iter().map(depth).min() != names.iter().map(depth).max() {
        let list = |v: Vec<String>| {
            v.into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(adapter_error(
            dir,
            format!(
                "the layers have ranks {} and alphas {} and sit at different depths ({}): \
                 PEFT's `rank_pattern` / `alpha_pattern` keys match the ends of module names, \
                 so one layer's key could also name another; nothing was written",
                list(ranks.iter().map(|r| r.to_string()).collect()),
                list(alphas.iter().map(|a| a.to_string()).collect()),
                names.join(", ")
            ),
        ));
    }
    Ok((rank, alpha, patterned))
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
