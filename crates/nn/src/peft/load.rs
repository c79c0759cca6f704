//! Loading a PEFT adapter onto a model's Linears and other modules.

use super::config::{AdapterConfig, ModuleSelector};
use super::{adapter_error, weights_path, CONFIG_FILE};
use crate::error::Result;
use crate::linear::{lora_product, Dora, Linear, LoraAdapter};
use nibble_autograd::Param;
use nibble_io::Checkpoint;
use nibble_tensor::{f16, Tensor};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// A parameter of a base module that an adapter file replaces: PEFT saves
/// `base_model.model.<module>.weight` / `.bias` for its `modules_to_save`, and
/// `<module>.base_layer.bias` (a LoRA target) or `<module>.bias` (another module) for
/// `bias = "all"` / `"lora_only"`.
#[derive(Debug, Clone)]
struct Replacement {
    /// Index of the module among the Linears, or among the norms past them.
    module: usize,
    /// The bias (else the weight).
    bias: bool,
    value: Tensor,
    /// The file's key, for messages.
    key: String,
}

/// The module name and state-dict name (`weight`, `bias`, or a BatchNorm's `running_mean`,
/// `running_var`, `num_batches_tracked`) a replacement key names, if any.
fn replacement_target(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    if let Some(m) = rest.strip_suffix(".base_layer.bias") {
        return Some((m, "bias"));
    }
    let (m, param) = rest.rsplit_once('.')?;
    let m = m.strip_suffix(".modules_to_save.default").unwrap_or(m);
    [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    .contains(&param)
    .then_some((m, param))
}

/// The module whose `ModulesToSaveWrapper` holds the tensor a key names, for the keys PEFT
/// writes from inside the wrapper (`base_model.model.<m>.modules_to_save.bias`,
/// `base_model.model.<m>.original_module.weight`, ...), if the key is one.
fn wrapper_copy_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("base_model.model.")?;
    let (inner, param) = rest.rsplit_once('.')?;
    let known = [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ];
    if !known.contains(&param) {
        return None;
    }
    inner
        .strip_suffix(".modules_to_save")
        .or_else(|| inner.strip_suffix(".original_module"))
}

/// A BatchNorm of the model, whose tensors an adapter file may replace (PEFT's
/// `modules_to_save`, or its bias under `bias = "all"`): the caller rebuilds it from the
/// values [`load_adapter_into`] returns.
#[derive(Debug, Clone)]
pub struct BatchNormView {
    /// The module's path in the model (`1`, `model.bn`).
    pub name: String,
    /// Its width: every tensor is `[dim]`.
    pub dim: usize,
    /// Whether it has a weight and a bias (`affine=True`).
    pub affine: bool,
}

/// A tensor of a [`BatchNormView`] that an adapter file replaces, checked: `[dim]`, finite,
/// and a variance not negative.
#[derive(Debug, Clone)]
pub struct BatchNormUpdate {
    /// Index of the BatchNorm among those given to [`load_adapter_into`].
    pub module: usize,
    /// `weight`, `bias`, `running_mean` or `running_var`.
    pub param: &'static str,
    /// The file's values.
    pub value: Tensor,
}

/// A module beside the Linears (a LayerNorm) whose parameters an adapter file may replace
/// (PEFT's `modules_to_save`, `bias = "all"`): its name in the model and its parameters, whose
/// values are replaced in place.
#[derive(Debug, Clone)]
pub struct OtherModule<'a> {
    /// The module's path in the model (`2`, `model.1`).
    pub name: String,
    /// Its weight, `[dim]`.
    pub weight: &'a Param,
    /// Its bias, `[dim]`, if it has one.
    pub bias: Option<&'a Param>,
}

/// Loads the adapters saved in `dir` onto `layers` (see [`load_adapter_into`]); a file
/// that replaces a parameter of anything but these Linears is an error.
pub fn load_adapter<'a>(
    layers: impl IntoIterator<Item = &'a mut Linear>,
    dir: &Path,
) -> Result<()> {
    load_adapter_into(layers, &[], &[], dir).map(drop)
}

/// Loads the adapters saved in `dir` onto `layers`, whose parameters and those of `others`
/// the file may replace (see [`load_adapter_into`], which this calls with no further
/// modules).
pub fn load_adapter_with_others<'a>(
    layers: impl IntoIterator<Item = &'a mut Linear>,
    others: &[OtherModule<'_>],
    dir: &Path,
) -> Result<()> {
    load_adapter_into(layers, others, &[], dir).map(drop)
}

/// Whether `s` is a module index as PyTorch writes it (`0`, `12`; never `03`).
fn index_of(s: &str) -> Option<usize> {
    let canonical = s == "0" || !s.starts_with('0');
    (canonical && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// The model's modules that are not Linear layers, as far as `named` (the modules with
/// parameters besides the Linears, and any others the caller knows) and the Linears' names
/// tell them: those, every module containing one (`model` and `model.0` for `model.0.fc`), and
/// in a numbered container (an `nn.Sequential`) every index below its highest that holds no
/// parameter (a parameter-free layer: `1` in `Linear, ReLU, Linear`). PEFT's root module (the
/// empty name) is not among them.
fn non_linear_modules(linears: &[&str], named: &[&str]) -> Vec<String> {
    let mut all: std::collections::BTreeSet<String> =
        linears.iter().chain(named).map(|s| s.to_string()).collect();
    for name in all.clone() {
        for (i, _) in name.match_indices('.') {
            all.insert(name[..i].to_string());
        }
    }
    let mut highest: BTreeMap<String, usize> = BTreeMap::new();
    for name in &all {
        let (parent, last) = name.rsplit_once('.').unwrap_or(("", name));
        if let Some(i) = index_of(last) {
            let h = highest.entry(parent.to_string()).or_insert(i);
            *h = (*h).max(i);
        }
    }
    for (parent, h) in highest {
        for i in 0..h {
            all.insert(if parent.is_empty() {
                i.to_string()
            } else {
                format!("{parent}.{i}")
            });
        }
    }
    all.into_iter()
        .filter(|n| !n.is_empty() && !linears.contains(&n.as_str()))
        .collect()
}

/// The module a LoRA key of PEFT's adapter file belongs to (`base_model.model.<module>.lora_…`;
/// PEFT's own rule, the name before the last `.lora_`), if the key is one.
fn lora_module(key: &str) -> Option<&str> {
    key.strip_prefix("base_model.model.")?
        .rsplit_once(".lora_")
        .map(|(m, _)| m)
}

/// The key of module `module`'s LoRA matrix `part` (`lora_A` or `lora_B`) in PEFT's adapter
/// `file`, as PEFT writes it (`base_model.model.<module>.<part>.weight`, or with the adapter's
/// name `default` before `.weight`), if the file holds it.
pub fn lora_weight_key(file: &Checkpoint, module: &str, part: &str) -> Option<String> {
    lora_key(file, module, part, "weight")
}

/// The key of tensor `param` (`weight`, or `bias` under `lora_bias`) of module `module`'s LoRA
/// matrix `part` in PEFT's adapter `file` (`base_model.model.<module>.<part>.<param>`, or with
/// the adapter's name `default` before `.<param>`), if the file holds it.
fn lora_key(file: &Checkpoint, module: &str, part: &str, param: &str) -> Option<String> {
    [
        format!("base_model.model.{module}.{part}.{param}"),
        format!("base_model.model.{module}.{part}.default.{param}"),
    ]
    .into_iter()
    .find(|k| file.info(k).is_some())
}

/// Loads the adapters saved in `dir` onto `layers`, as `PeftModel.from_pretrained` loads them
/// onto the PyTorch model.
///
/// The config's `target_modules` (less `exclude_modules` and `modules_to_save`, see
/// [`AdapterConfig`]) says which Linears are adapted: matched against every module of the
/// model, the Linears (`layers`), the modules of `others` and `more_modules` (say a BatchNorm)
/// and those their names imply ([`ModuleSelector`]; the containers, the parameter-free layers
/// between numbered ones). Selecting a module that is not a Linear is an error naming the
/// setting and the module (PEFT raises "Target module ... is not supported"), and so is
/// selecting no Linear at all (PEFT's "Target modules ... not found in the base model"),
/// unless `target_modules` is [`DUMMY_TARGET_MODULES`](super::DUMMY_TARGET_MODULES).
///
/// Each targeted layer whose `base_model.model.<name>.lora_A.weight` / `lora_B.weight` pair
/// is in the file gets it (an adapter is attached, trainable, where the layer has none, and
/// that layer's base weight and bias are frozen; PEFT's `lora_alpha / r` scaling, or its
/// `rank_pattern` / `alpha_pattern` entry, is folded into B); a targeted layer the file holds
/// nothing for is left as it is (PEFT's fresh LoRA layer adds zero). LoRA tensors
/// (`….lora_*`) of a module of the model that is not targeted are ignored, as PEFT ignores
/// them (unexpected keys when it loads the file); if nothing is loaded at all, the error
/// names them. Shapes are checked against the layer (`A` `[r, in]`, `B` `[out, r]`, `r` the
/// module's rank in the config). Under `lora_bias` each loaded layer's lora_B bias
/// (`<module>.lora_B.bias`, `[out]`; none in the file is PEFT's zero), scaled as B is, is added
/// to the layer's bias (after any replacement below; a layer without a bias gets one): PEFT's
/// `W x + b + s·(B A x + b_B)` but for rounding, as its merge folds it. Base parameters the file holds (PEFT's `modules_to_save`
/// and `bias = "all"` / `"lora_only"`) replace those of `layers` and `others`: a Linear whose
/// weight is replaced becomes an f32 layer without an adapter, as PEFT's copy of the module
/// is, and its replaced values are frozen; another module's parameters get the file's values
/// in place. A tensor that belongs to no module of the model, a lone A or B, a wrong shape,
/// or NaN/Inf values (an [`Error::NonFinite`](crate::error::Error::NonFinite) naming the key, the element and its value) are
/// errors, and an error leaves every layer as it was.
pub fn load_adapter_into<'a>(
    layers: impl IntoIterator<Item = &'a mut Linear>,
    others: &[OtherModule<'_>],
    batch_norms: &[BatchNormView],
    dir: &Path,
) -> Result<Vec<BatchNormUpdate>> {
    let config = AdapterConfig::read(dir)?;
    let weights = weights_path(dir);
    let file = Checkpoint::open(&weights)?;
    let mut layers: Vec<&mut Linear> = layers.into_iter().collect();
    let finite = |key: &str, t: &Tensor| crate::error::check_finite(&weights, key, t);
    // Which Linears PEFT adapts: every module of the model, matched as PEFT matches them.
    let linear_names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let named: Vec<&str> = others
        .iter()
        .map(|o| o.name.as_str())
        .chain(batch_norms.iter().map(|b| b.name.as_str()))
        .collect();
    let non_linear = non_linear_modules(&linear_names, &named);
    let config_path = dir.join(CONFIG_FILE);
    let target = &config.target_modules;
    if let Some(m) = non_linear.iter().find(|m| config.targets(m, &linear_names)) {
        return Err(adapter_error(
            &config_path,
            format!(
                "`target_modules` = {target} selects module `{m}`, which is not a Linear layer \
                 (PEFT adapts only the Linears here and raises \"Target module ... is not supported\"; Linears: {})",
                linear_names.join(", ")
            ),
        ));
    }
    let targeted: Vec<bool> = linear_names
        .iter()
        .map(|m| config.targets(m, &linear_names))
        .collect();
    if !targeted.contains(&true) && !matches!(target, ModuleSelector::Dummy) {
        let excluded: Vec<&str> = linear_names
            .iter()
            .copied()
            .filter(|m| {
                config.excluded(m) && target.matches_in(m, &linear_names, config.layers.as_ref())
            })
            .collect();
        let why = if excluded.is_empty() {
            String::new()
        } else {
            format!(
                " once `exclude_modules` / `modules_to_save` take out {}",
                excluded.join(", ")
            )
        };
        return Err(adapter_error(
            &config_path,
            format!(
                "`target_modules` = {target} selects no Linear layer of the model{why} \
                 (PEFT: \"Target modules ... not found in the base model\"; Linears: {})",
                linear_names.join(", ")
            ),
        ));
    }
    // Every tensor is read and checked before any layer changes, so a bad file leaves the
    // model as it was.
    let mut seen = HashSet::new();
    let mut loaded = Vec::new();
    // `lora_bias`: each loaded layer's scaled lora_B bias, `s · b_B`, with its key.
    let mut lora_biases: Vec<(usize, String, Tensor)> = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        if !targeted[index] {
            continue;
        }
        let (out, inp) = layer.dims();
        let (rank, scaling) = (config.rank(&layer.name), config.scaling(&layer.name));
        let mut found = Vec::with_capacity(2);
        for (suffix, shape, scale) in [
            ("lora_A", [rank, inp], 1.0f32),
            ("lora_B", [out, rank], scaling),
        ] {
            let Some(key) = lora_weight_key(&file, &layer.name, suffix) else {
                continue;
            };
            let t = read_scaled(dir, &file, &key, &shape, scale)?;
            seen.insert(key);
            found.push(t);
        }
        match <[Tensor; 2]>::try_from(found) {
            Ok([a, b]) => {
                if config.lora_bias {
                    if let Some((key, bias)) =
                        read_lora_bias(dir, &file, &layer.name, out, scaling)?
                    {
                        seen.insert(key.clone());
                        lora_biases.push((index, key, bias));
                    }
                }
                let dora = if config.dora {
                    Some(read_dora(dir, &file, &config, layer, &a, &b, &mut seen)?)
                } else {
                    None
                };
                loaded.push((index, a, b, dora, scaling))
            }
            Err(found) if found.is_empty() => {}
            Err(_) => {
                return Err(adapter_error(
                    dir,
                    format!("layer {} has only one of lora_A and lora_B", layer.name),
                ))
            }
        }
    }
    // LoRA tensors of modules that are not targeted: PEFT loads no LoRA layer for them and
    // ignores them.
    let is_module = |m: &str| linear_names.contains(&m) || non_linear.iter().any(|n| n == m);
    let ignored: Vec<String> = file
        .keys()
        .filter(|k| !seen.contains(*k))
        .filter(|k| {
            lora_module(k).is_some_and(|m| {
                is_module(m)
                    && !linear_names
                        .iter()
                        .zip(&targeted)
                        .any(|(n, &t)| t && *n == m)
            })
        })
        .map(str::to_string)
        .collect();
    seen.extend(ignored.iter().cloned());
    // Replaced base parameters, by module name: the Linears first, then the norms.
    let names: Vec<String> = layers
        .iter()
        .map(|l| l.name.clone())
        .chain(others.iter().map(|n| n.name.clone()))
        .collect();
    // Under `bias = "all"` PEFT also saves the biases inside the wrapper of a module of
    // `modules_to_save` (`<m>.modules_to_save.bias`, `<m>.original_module.bias`) beside the
    // copy's own `<m>.bias`; its loader reads none of them (changing them changes nothing).
    let wrapped: Vec<String> = file
        .keys()
        .filter(|k| !seen.contains(*k))
        .filter(|k| {
            wrapper_copy_of(k).is_some_and(|m| {
                (names.iter().any(|n| n == m) || batch_norms.iter().any(|b| b.name == m))
                    && config
                        .modules_to_save
                        .iter()
                        .any(|(s, _)| m.ends_with(s.as_str()))
            })
        })
        .map(str::to_string)
        .collect();
    seen.extend(wrapped);
    let mut replacements: Vec<Replacement> = Vec::new();
    let mut stats: Vec<BatchNormUpdate> = Vec::new();
    for key in file.keys().filter(|k| !seen.contains(*k)) {
        let parsed = replacement_target(key);
        if let Some((b, param)) = parsed
            .and_then(|(m, param)| Some((batch_norms.iter().position(|b| b.name == m)?, param)))
        {
            // A BatchNorm's tensor (`num_batches_tracked` is read by nothing in eval mode).
            if param != "num_batches_tracked" {
                stats.push(batch_norm_update(
                    dir,
                    &file,
                    key,
                    &batch_norms[b],
                    b,
                    param,
                )?);
            }
            continue;
        }
        let target = parsed.and_then(|(m, param)| {
            let bias = match param {
                "weight" => false,
                "bias" => true,
                _ => return None,
            };
            Some((names.iter().position(|n| n == m)?, bias))
        });
        let Some((module, bias)) = target else {
            let why = if key.contains("lora_magnitude_vector") {
                if config.dora {
                    " (a DoRA magnitude)"
                } else {
                    " (a DoRA magnitude, but `use_dora` is not set)"
                }
            } else if key.contains("lora_B.bias") || key.contains("lora_B.default.bias") {
                if config.lora_bias {
                    " (a bias on lora_B)"
                } else {
                    " (a bias on lora_B, but `lora_bias` is not set)"
                }
            } else {
                ""
            };
            return Err(adapter_error(
                dir,
                format!(
                    "`{key}`{why} does not match any layer of the model (rank {}; modules: {})",
                    config.r,
                    names.join(", ")
                ),
            ));
        };
        let shape: Vec<usize> = match layers.get(module) {
            Some(l) => {
                let (out, inp) = l.dims();
                if bias {
                    vec![out]
                } else {
                    vec![out, inp]
                }
            }
            None => {
                let other = &others[module - layers.len()];
                if bias && other.bias.is_none() {
                    return Err(adapter_error(
                        dir,
                        format!("`{key}`: module {} has no bias to replace", other.name),
                    ));
                }
                vec![other.weight.value().numel()]
            }
        };
        let mut value = file.tensor_f32(key, Some(&shape))?;
        finite(key, &value)?;
        if layers.get(module).is_some_and(|l| l.is_all_f16()) {
            // PEFT copies it into the module's f16 parameter (`bias = "all"`), or into an f16
            // copy of the module (`modules_to_save`): its values rounded to f16, which kept in
            // f32 put outputs 3e-4 off PEFT's on `half_precision`. Checked in f16, where a
            // finite f32 value may overflow.
            for v in value.data_mut() {
                *v = f16::from_f32(*v).to_f32();
            }
            finite(key, &value)?;
        }
        if !bias && loaded.iter().any(|(i, ..)| *i == module) {
            return Err(adapter_error(
                dir,
                format!("`{key}` replaces the weight of a module that also has a LoRA adapter"),
            ));
        }
        // Two keys for one parameter (`<m>.bias` and `<m>.modules_to_save.default.bias`, which
        // PEFT never writes together): which one PEFT would take is not clear, so neither.
        if let Some(other) = replacements
            .iter()
            .find(|r| r.module == module && r.bias == bias)
        {
            return Err(adapter_error(
                dir,
                format!(
                    "`{}` and `{key}` both give the {} of module {}",
                    other.key,
                    if bias { "bias" } else { "weight" },
                    names[module]
                ),
            ));
        }
        replacements.push(Replacement {
            module,
            bias,
            value,
            key: key.to_string(),
        });
    }
    check_modules_to_save(
        &config,
        dir,
        &layers,
        others,
        batch_norms,
        &replacements,
        &stats,
    )?;
    if loaded.is_empty() && replacements.is_empty() && stats.is_empty() {
        let targets: Vec<&str> = linear_names
            .iter()
            .zip(&targeted)
            .filter_map(|(n, &t)| t.then_some(*n))
            .collect();
        let mut what = format!(
            "no LoRA tensors for the targeted modules ({}) in the adapter file",
            targets.join(", ")
        );
        if !ignored.is_empty() {
            let shown: Vec<String> = ignored.iter().take(4).map(|k| format!("`{k}`")).collect();
            what.push_str(&format!(
                "; it holds {}{} for modules `target_modules` = {target} does not select",
                shown.join(", "),
                if ignored.len() > 4 { ", ..." } else { "" }
            ));
        }
        return Err(adapter_error(dir, what));
    }
    // `lora_bias`: PEFT adds `s · b_B` to the layer's output beside `s · B A x`; nibble adds
    // it to the base's bias (the bias the file replaces it with, if it does), which is the same
    // sum but for rounding, and what PEFT's merge does. Computed before any layer changes.
    for (index, key, scaled) in lora_biases {
        let layer = &layers[index];
        let at = replacements
            .iter()
            .position(|r| r.module == index && r.bias);
        let mut bias = match at {
            Some(i) => replacements[i].value.data().to_vec(),
            None => layer
                .bias_values()
                .unwrap_or_else(|| vec![0.0; scaled.numel()]),
        };
        nibble_tensor::ops::add_in_place(&mut bias, scaled.data())?;
        if let Some(i) = bias.iter().position(|v| !v.is_finite()) {
            return Err(adapter_error(
                dir,
                format!(
                    "`{key}` at {i}, scaled and added to the layer's bias, is {}: beyond f32's \
                     range",
                    bias[i]
                ),
            ));
        }
        let value = Tensor::from_vec(&[bias.len()], bias)?;
        match at {
            Some(i) => replacements[i].value = value,
            None => replacements.push(Replacement {
                module: index,
                bias: true,
                value,
                key,
            }),
        }
    }
    for (index, a, b, magnitude, b_scale) in loaded {
        let layer = &mut layers[index];
        // Trains where the adapter trains, as PEFT's does.
        let dora = |magnitude: Option<Tensor>, trains: bool| {
            magnitude.map(|m| {
                let name = format!("{}.lora_magnitude_vector", layer.name);
                Dora::new(Param::new(name, m, trains))
            })
        };
        match &mut layer.lora {
            Some(lora) => {
                *lora.a.value_mut() = a;
                *lora.b.value_mut() = b;
                lora.dora = dora(magnitude, lora.a.requires_grad());
                lora.b_scale = b_scale;
            }
            None => {
                // As PEFT does: with an adapter on it, the base stops training.
                for p in layer.params() {
                    p.set_requires_grad(false);
                }
                let dora = dora(magnitude, true);
                let module = &layer.name;
                layer.lora = Some(LoraAdapter {
                    a: Param::new(format!("{module}.lora_a.weight"), a, true),
                    b: Param::new(format!("{module}.lora_b.weight"), b, true),
                    dora,
                    b_scale,
                });
            }
        }
    }
    // Weights first, so that a module's replaced bias lands on its replaced weight.
    replacements.sort_by_key(|r| r.bias);
    for r in replacements {
        match layers.get_mut(r.module) {
            Some(layer) => layer.replace_base_param(r.bias, r.value)?,
            None => {
                let other = &others[r.module - layers.len()];
                match (r.bias, other.bias) {
                    (true, Some(bias)) => *bias.value_mut() = r.value,
                    // Checked above: a bias replacement names a module with a bias.
                    (true, None) => {}
                    (false, _) => *other.weight.value_mut() = r.value,
                }
            }
        }
    }
    Ok(stats)
}

/// Module `module`'s lora_B bias under `lora_bias` (`base_model.model.<module>.lora_B.bias`,
/// or with the adapter's name `default` before `.bias`), `[out]`, finite, times the module's
/// `scaling`, with its key; `None` where the file has none (PEFT starts it at zero and
/// leaves it there, warning of the missing key).
fn read_lora_bias(
    dir: &Path,
    file: &Checkpoint,
    module: &str,
    out: usize,
    scaling: f32,
) -> Result<Option<(String, Tensor)>> {
    let Some(key) = lora_key(file, module, "lora_B", "bias") else {
        return Ok(None);
    };
    let t = read_scaled(dir, file, &key, &[out], scaling)?;
    Ok(Some((key, t)))
}

/// Tensor `key` of the adapter file, of `shape`, finite, times `scale` (the module's
/// `lora_alpha / r`); a finite value that the scaling takes past f32's range is an error
/// blaming the config's scale, not the file.
fn read_scaled(
    dir: &Path,
    file: &Checkpoint,
    key: &str,
    shape: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let mut t = file.tensor_f32(key, Some(shape))?;
    crate::error::check_finite(&weights_path(dir), key, &t)?;
    if scale != 1.0 {
        t.scale_assign(scale);
    }
    if let Some((at, value)) = t.first_non_finite() {
        return Err(adapter_error(
            dir,
            format!(
                "`{key}` at {at}, scaled by lora_alpha / r = {scale:e} (from {CONFIG_FILE}), \
                 is {value}: beyond f32's range"
            ),
        ));
    }
    Ok(t)
}

/// The DoRA magnitude of `layer` from the adapter file: its `lora_magnitude_vector` `[out]`
/// (finite), checked to give a finite scale with the layer's weight as the kernels use it and
/// the adapter's `a` and (scaled) `b` ([`Dora::row_norms`]). The key goes into `seen`. A file without the layer's magnitude
/// gets what PEFT fills in: the row norms of the weight, `‖W‖`, where `init_lora_weights` starts
/// `B·A` at zero ([`AdapterConfig::init_product_zero`]); otherwise PEFT's magnitudes come from a
/// random start, and the missing key is an error.
fn read_dora(
    dir: &Path,
    file: &Checkpoint,
    config: &AdapterConfig,
    layer: &Linear,
    a: &Tensor,
    b: &Tensor,
    seen: &mut HashSet<String>,
) -> Result<Tensor> {
    let (out, _) = layer.dims();
    let (weight, _) = layer.dense_weight_and_bias();
    let key = ["", ".weight", ".default.weight"]
        .iter()
        .map(|tail| {
            format!(
                "base_model.model.{}.lora_magnitude_vector{tail}",
                layer.name
            )
        })
        .find(|k| file.info(k).is_some());
    let magnitude = match key {
        Some(key) => {
            let magnitude = file.tensor_f32(&key, Some(&[out]))?;
            crate::error::check_finite(&weights_path(dir), &key, &magnitude)?;
            seen.insert(key);
            magnitude
        }
        None if config.init_product_zero => {
            // PEFT's `DoraLinearLayer.update_layer` at creation: ‖W + s·B₀A₀‖ with B₀A₀ = 0.
            let norms = Dora::row_norms(&layer.name, &weight, None)?;
            Tensor::from_vec(&[out], norms)?
        }
        None => {
            return Err(adapter_error(
                dir,
                format!(
                    "`use_dora` is set, but the file has no `base_model.model.{}.lora_magnitude_vector` \
                     for the layer's lora_A / lora_B, and `init_lora_weights` starts B·A at random \
                     (false or \"orthogonal\"): PEFT would fill the magnitude from that random start",
                    layer.name
                ),
            ))
        }
    };
    let norms = Dora::row_norms(&layer.name, &weight, Some(&lora_product(a, b)?))?;
    Dora::check_scale(&layer.name, magnitude.data(), &norms)?;
    Ok(magnitude)
}

/// The value of BatchNorm `view`'s tensor `param` (`weight`, `bias`, `running_mean`,
/// `running_var`) at `key` of the adapter file, checked: the module has it, `[dim]`, finite,
/// and a variance not negative.
fn batch_norm_update(
    dir: &Path,
    file: &Checkpoint,
    key: &str,
    view: &BatchNormView,
    module: usize,
    param: &str,
) -> Result<BatchNormUpdate> {
    let param: &'static str = match param {
        "weight" => "weight",
        "bias" => "bias",
        "running_mean" => "running_mean",
        _ => "running_var",
    };
    if !view.affine && (param == "weight" || param == "bias") {
        return Err(adapter_error(
            dir,
            format!(
                "`{key}`: BatchNorm {} has no {param} (affine=False)",
                view.name
            ),
        ));
    }
    let value = file.tensor_f32(key, Some(&[view.dim]))?;
    crate::error::check_finite(&weights_path(dir), key, &value)?;
    if param == "running_var" {
        if let Some(i) = value.data().iter().position(|&v| v < 0.0) {
            return Err(adapter_error(
                dir,
                format!(
                    "`{key}` element {i} is {}: a variance is not negative",
                    value.data()[i]
                ),
            ));
        }
    }
    Ok(BatchNormUpdate {
        module,
        param,
        value,
    })
}

/// PEFT wraps each module whose name ends with an entry of `modules_to_save` (a plain string
/// suffix, `_set_trainable`'s rule: `"2"` wraps `12` too, `"[2]"` nothing) and loads the copy's
/// every tensor from the file (a `KeyError` where one is missing): each such module of the
/// model (a Linear, a LayerNorm, a BatchNorm) must have its weight and bias (where it has
/// them), and a BatchNorm its running statistics, in the file.
fn check_modules_to_save(
    config: &AdapterConfig,
    dir: &Path,
    layers: &[&mut Linear],
    others: &[OtherModule<'_>],
    batch_norms: &[BatchNormView],
    replacements: &[Replacement],
    stats: &[BatchNormUpdate],
) -> Result<()> {
    let saved = |name: &str| {
        config
            .modules_to_save
            .iter()
            .any(|(m, _)| name.ends_with(m))
    };
    let missing = |name: &str, param: &str| {
        adapter_error(
            dir,
            format!(
                "`modules_to_save` names module {name}, but the file has no \
                 `base_model.model.{name}.{param}` (PEFT fails with a KeyError)"
            ),
        )
    };
    let has = |module: usize, bias: bool| {
        replacements
            .iter()
            .any(|r| r.module == module && r.bias == bias)
    };
    let owned = layers.iter().map(|l| (l.name.as_str(), l.has_bias()));
    let owned = owned.chain(others.iter().map(|o| (o.name.as_str(), o.bias.is_some())));
    for (module, (name, with_bias)) in owned.enumerate() {
        if !saved(name) {
            continue;
        }
        if !has(module, false) {
            return Err(missing(name, "weight"));
        }
        if with_bias && !has(module, true) {
            return Err(missing(name, "bias"));
        }
    }
    for (b, view) in batch_norms.iter().enumerate() {
        if !saved(&view.name) {
            continue;
        }
        let params: &[&str] = if view.affine {
            &["weight", "bias", "running_mean", "running_var"]
        } else {
            &["running_mean", "running_var"]
        };
        if let Some(p) = params
            .iter()
            .find(|&&p| !stats.iter().any(|u| u.module == b && u.param == p))
        {
            return Err(missing(&view.name, p));
        }
    }
    Ok(())
}
