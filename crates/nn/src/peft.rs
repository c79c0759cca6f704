//! LoRA adapters in PEFT's on-disk layout, so that PEFT can read ours and we can read PEFT's:
//! a directory holding `adapter_model.safetensors` (or, as PEFT writes without safetensors,
//! `adapter_model.bin`; keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) and
//! `adapter_config.json` (`peft_type` "LORA", `r`, `lora_alpha`, `target_modules`, ...).
//! The target modules are the [`Linear`] layers given, named by [`Linear::name`] (the module's
//! path in the PyTorch model: `model.0.model.0`, or `0`, `3` for an `nn.Sequential`).
//!
//! nibble's adapters are unscaled (`y += B A x`), so we save `lora_alpha = r`. Loading a PEFT
//! adapter with another `lora_alpha` folds PEFT's scaling `lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`) into B; settings the config leaves out take PEFT's
//! `LoraConfig` defaults ([`defaults`]: `r` 8, `lora_alpha` 8, no rsLoRA, `bias` "none").
//! Only the Linears that `target_modules` selects (less `exclude_modules` and
//! `modules_to_save`) are adapted, as PEFT adapts them; see [`load_adapter_into`].

use crate::error::{Error, Result};
use crate::linear::{lora_product, Dora, Linear, LoraAdapter};
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
/// File name of the adapter weights that PEFT writes with `safe_serialization=False` (a
/// `torch.save` state dict), read where [`WEIGHTS_FILE`] is absent.
pub const WEIGHTS_FILE_PTH: &str = "adapter_model.bin";

/// The weights file of adapter directory `dir`: [`WEIGHTS_FILE`], or [`WEIGHTS_FILE_PTH`] where
/// only that one exists (so a missing adapter is reported as the safetensors file).
pub fn weights_path(dir: &Path) -> std::path::PathBuf {
    let safetensors = dir.join(WEIGHTS_FILE);
    let pth = dir.join(WEIGHTS_FILE_PTH);
    if !safetensors.exists() && pth.is_file() {
        pth
    } else {
        safetensors
    }
}

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

/// PEFT's `LoraConfig` defaults for the settings nibble reads, used where
/// `adapter_config.json` leaves a setting out: `r = 8`, `lora_alpha = 8`, `use_rslora = false`
/// (PEFT 0.21's `LoraConfig` field defaults; an absent `bias` is its default `"none"`: no
/// base parameters beyond those the file holds).
pub mod defaults {
    /// `r` when absent.
    pub const R: usize = 8;
    /// `lora_alpha` when absent (so an adapter of rank `r` without it is scaled `8 / r`).
    pub const LORA_ALPHA: f64 = 8.0;
    /// `use_rslora` when absent.
    pub const USE_RSLORA: bool = false;
}

/// PEFT's value of `target_modules` meaning "every Linear" (matched case-insensitively).
pub const ALL_LINEAR: &str = "all-linear";
/// PEFT's placeholder `target_modules` of an adapter that targets no module (matching none is
/// then no error).
pub const DUMMY_TARGET_MODULES: &str = "dummy-target-modules";

/// Which modules `target_modules` or `exclude_modules` names, in PEFT's forms.
#[derive(Debug, Clone)]
pub enum ModuleSelector {
    /// A list of names: a module matches an entry that is its whole name or, as PEFT matches,
    /// the end of it after a dot (`"fc"` matches `model.fc`, `"0"` matches `model.0`).
    Names(Vec<String>),
    /// One regular expression (a string in the config) that the whole module name must match
    /// (Python's `re.fullmatch`); the source as written, and it compiled as `^(?:…)$`.
    Regex(String, regex::Regex),
    /// `"all-linear"` (any case): every Linear layer. PEFT leaves out the output layer only
    /// for a `transformers` `PreTrainedModel` (its output embeddings, or a sequence
    /// classifier's `score` / `classifier` head); for a plain `nn.Sequential`, which is what
    /// nibble loads, it adapts every Linear, the last one included, and so does nibble.
    AllLinear,
    /// [`DUMMY_TARGET_MODULES`]: no module.
    Dummy,
}

impl ModuleSelector {
    /// Whether module `name` is selected; `linears` are the model's Linear layers (for
    /// [`ModuleSelector::AllLinear`], which PEFT turns into the list of their names).
    pub fn matches(&self, name: &str, linears: &[&str]) -> bool {
        self.matches_in(name, linears, None)
    }

    /// [`ModuleSelector::matches`] under PEFT's `layers_to_transform` (`layers`), which a list
    /// of names applies to the modules it selects by a dotted suffix only.
    pub fn matches_in(&self, name: &str, linears: &[&str], layers: Option<&LayerFilter>) -> bool {
        let named = |entry: &str| {
            name == entry
                || name
                    .strip_suffix(entry)
                    .is_some_and(|head| head.ends_with('.'))
        };
        match self {
            ModuleSelector::Names(list) if list.iter().any(|e| e == name) => true,
            ModuleSelector::Names(list) => {
                list.iter().any(|e| named(e)) && layers.is_none_or(|l| l.admits(name))
            }
            ModuleSelector::Regex(_, re) => re.is_match(name),
            ModuleSelector::AllLinear => linears.iter().any(|e| named(e)),
            ModuleSelector::Dummy => false,
        }
    }
}

impl std::fmt::Display for ModuleSelector {
    /// As the config spells it: a JSON list or string.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSelector::Names(list) => write!(f, "{}", json!(list)),
            ModuleSelector::Regex(source, _) => write!(f, "{}", json!(source)),
            ModuleSelector::AllLinear => write!(f, "\"{ALL_LINEAR}\""),
            ModuleSelector::Dummy => write!(f, "\"{DUMMY_TARGET_MODULES}\""),
        }
    }
}

/// What loading needs from `adapter_config.json`: the rank and scaling of each module's
/// `B A x`, and which modules carry one.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// `r`: the rank of every module that `rank_pattern` does not name ([`defaults::R`] when
    /// absent).
    pub r: usize,
    /// `lora_alpha` ([`defaults::LORA_ALPHA`], PEFT's default 8, when absent).
    pub alpha: f64,
    /// `use_rslora`: the scaling is `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    /// `use_dora`: each adapted layer is a DoRA ([`crate::linear::Dora`]), its
    /// `lora_magnitude_vector` read from the file or, where the file has none, filled in as PEFT
    /// fills it (see [`AdapterConfig::init_product_zero`]).
    pub dora: bool,
    /// Whether `init_lora_weights` starts the adapter's product `B·A` at exactly zero: `true`
    /// (the default), `"gaussian"` and `"eva"` zero `B`, `"mica"` zeroes `A`; `false` and
    /// `"orthogonal"` start both at random. PEFT computes each DoRA magnitude from that start,
    /// `‖W + s·B₀A₀‖` per row, and keeps it where the file has none: with a zero start that is
    /// the base weight's row norm, which nibble then uses too.
    pub init_product_zero: bool,
    /// `rank_pattern`: per-module ranks, keyed by PEFT's module patterns.
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`: per-module alphas, keyed likewise.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `target_modules`: the modules PEFT puts a LoRA layer on (required).
    pub target_modules: ModuleSelector,
    /// `exclude_modules`: modules taken out of `target_modules` (`None`: none).
    pub exclude_modules: Option<ModuleSelector>,
    /// `modules_to_save`: modules PEFT copies whole instead of adapting; as PEFT, a module
    /// matching one (`(^|.*\.)<entry>($|\..*)`, the entry a regex) gets no LoRA layer, and
    /// the file must hold the module's tensors.
    pub modules_to_save: Vec<(String, regex::Regex)>,
    /// `layers_to_transform` / `layers_pattern` (`None` where not set).
    pub layers: Option<LayerFilter>,
}

/// PEFT's `layers_to_transform` with its `layers_pattern`: a module that a *list*
/// `target_modules` selects by a dotted suffix of its name (not by its whole name) is adapted
/// only if the layer index in its name is one of `indexes`. The index is the number after the
/// first `<pattern>.` (`layers.3.` in `model.layers.3.mlp.fc`), or with no pattern after the
/// first two dotted components (PEFT's `.*?\.[^.]*\.(\d+)\.`); a name without one is not
/// adapted. Names selected whole (every Linear of an `nn.Sequential`: `0`, `3`) are not
/// filtered, as in PEFT.
#[derive(Debug, Clone)]
pub struct LayerFilter {
    /// The layer indexes to adapt.
    pub indexes: Vec<i64>,
    /// The regexes that find the index (PEFT's `re.match` of each in turn).
    pub patterns: Vec<regex::Regex>,
}

impl LayerFilter {
    /// Whether module `name`'s layer index is one of [`LayerFilter::indexes`].
    pub fn admits(&self, name: &str) -> bool {
        let index = self.patterns.iter().find_map(|re| {
            re.captures(name)
                .and_then(|c| c.name("idx"))
                .and_then(|m| m.as_str().parse::<i64>().ok())
        });
        index.is_some_and(|i| self.indexes.contains(&i))
    }
}

/// Whether PEFT's pattern `pattern` (a key of `rank_pattern` / `alpha_pattern`) names the module
/// `module`: the whole name, or, as PEFT's `get_pattern_key` matches, a regex matching the
/// name's last dotted components (`(.*\.)?(pattern)$`).
fn pattern_names(pattern: &str, module: &str) -> bool {
    pattern == module
        || regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
            .is_ok_and(|re| re.is_match(module))
}

/// The value of the first pattern naming `module`, exact names first.
fn by_pattern<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(p, _)| p == module)
        .or_else(|| patterns.iter().find(|(p, _)| pattern_names(p, module)))
        .map(|(_, v)| *v)
}

/// PEFT's `layers_to_transform` (an integer or a list of them; an empty list is no filter)
/// and `layers_pattern` (a regex or a list of them; empty: the default rule), as
/// [`LayerFilter`] reads them; a pattern without indexes is an error, as in PEFT.
fn layer_filter(
    path: &Path,
    indexes: Option<&Value>,
    patterns: Option<&Value>,
) -> Result<Option<LayerFilter>> {
    let bad = |name: &str, v: &Value, what: &str| {
        adapter_error(path, format!("`{name}` must be {what}, found {v}"))
    };
    let patterns: Vec<String> = match patterns {
        None => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(v @ Value::Array(list)) => list
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("layers_pattern", v, "a string or a list of strings"))?,
        Some(v) => return Err(bad("layers_pattern", v, "a string or a list of strings")),
    };
    let indexes_absent = indexes.is_none();
    let indexes: Vec<i64> = match indexes {
        None => Vec::new(),
        Some(v @ Value::Number(_)) => {
            vec![v
                .as_i64()
                .ok_or_else(|| bad("layers_to_transform", v, "an integer"))?]
        }
        Some(v @ Value::Array(list)) => list
            .iter()
            .map(Value::as_i64)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("layers_to_transform", v, "an integer or a list of them"))?,
        Some(v) => {
            return Err(bad(
                "layers_to_transform",
                v,
                "an integer or a list of them",
            ))
        }
    };
    if indexes_absent && !patterns.is_empty() {
        return Err(adapter_error(
            path,
            "`layers_pattern` is set without `layers_to_transform` (PEFT: \"When \
             `layers_pattern` is specified, `layers_to_transform` must also be specified\")",
        ));
    }
    if indexes.is_empty() {
        return Ok(None);
    }
    let sources: Vec<String> = if patterns.is_empty() {
        vec![r"^.*?\.[^.]*\.(?P<idx>\d+)\.".to_string()]
    } else {
        patterns
            .iter()
            .map(|p| format!(r"^(?:^|.*?\.)(?:{p})\.(?P<idx>\d+)\."))
            .collect()
    };
    let patterns = sources
        .iter()
        .map(|src| {
            regex::Regex::new(src).map_err(|e| {
                adapter_error(
                    path,
                    format!("`layers_pattern` gives a regex nibble does not read ({src}): {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(LayerFilter { indexes, patterns }))
}

/// Parses setting `name` (`target_modules` or `exclude_modules`) as PEFT reads it: a list of
/// names, or a string that is a regex (or, for targets, `"all-linear"` or
/// [`DUMMY_TARGET_MODULES`]).
fn selector(path: &Path, name: &str, v: &Value, target: bool) -> Result<ModuleSelector> {
    match v {
        Value::String(s) if target && s.to_lowercase() == ALL_LINEAR => {
            Ok(ModuleSelector::AllLinear)
        }
        Value::String(s) if target && s == DUMMY_TARGET_MODULES => Ok(ModuleSelector::Dummy),
        Value::String(s) => regex::Regex::new(&format!("^(?:{s})$"))
            .map(|re| ModuleSelector::Regex(s.clone(), re))
            .map_err(|e| {
                adapter_error(
                    path,
                    format!("`{name}` = \"{s}\" is not a regex nibble reads: {e}"),
                )
            }),
        Value::Array(list) => list
            .iter()
            .map(|e| e.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(ModuleSelector::Names)
            .ok_or_else(|| {
                adapter_error(
                    path,
                    format!("`{name}` must be a list of module names or a regex, found {v}"),
                )
            }),
        _ => Err(adapter_error(
            path,
            format!("`{name}` must be a list of module names or a regex, found {v}"),
        )),
    }
}

impl AdapterConfig {
    /// Reads `dir/adapter_config.json`. Settings that change what the adapter computes beyond
    /// `B A x` (a bias on `lora_B`, `fan_in_fan_out`, layer replication, QA-LoRA, adapters
    /// on parameters) are errors naming the field, but DoRA (`use_dora`, see
    /// [`crate::linear::Dora`]); `bias` `"all"` / `"lora_only"` and
    /// `modules_to_save` only add tensors to the file, which [`crate::Sequential::load_adapter`]
    /// applies.
    pub fn read(dir: &Path) -> Result<Self> {
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
        let field = |name: &str| config.get(name).filter(|v| !v.is_null());
        match field("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(adapter_error(
                    &path,
                    format!("peft_type must be \"LORA\", found {other:?}"),
                ))
            }
        }
        for (name, what) in [
            ("lora_bias", "a bias on lora_B (`lora_bias`)"),
            (
                "fan_in_fan_out",
                "`fan_in_fan_out` (transposed base weights)",
            ),
            ("use_qalora", "QA-LoRA (`use_qalora`)"),
        ] {
            if field(name).and_then(Value::as_bool) == Some(true) {
                return Err(adapter_error(&path, format!("{what} is not supported")));
            }
        }
        // Initializations PEFT re-runs when it loads the adapter, subtracting them from the
        // base weights (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA): the file's A and B then apply to
        // a residual base that nibble does not compute.
        if let Some(init) = field("init_lora_weights").and_then(Value::as_str) {
            let lower = init.to_ascii_lowercase();
            let mutates = ["pissa", "corda"].iter().any(|p| lower.starts_with(p))
                || ["olora", "loftq", "lora_ga"].contains(&lower.as_str());
            if mutates {
                return Err(adapter_error(
                    &path,
                    format!(
                        "`init_lora_weights` = {init:?}: PEFT redoes this initialization when it \
                         loads the adapter and subtracts it from the base weights, which nibble \
                         does not; save the adapter as plain LoRA with PEFT first \
                         (`save_pretrained(dir, path_initial_model_for_weight_conversion=...)`)"
                    ),
                ));
            }
        }
        // LoRA variants whose forward is not `B A x` (PEFT 0.21's aLoRA, Arrow, VeLoRA,
        // MonteCLoRA, BD-LoRA, KaSA) and trainable tokens: set (not null, false or empty),
        // PEFT computes what nibble does not.
        for name in [
            "alora_invocation_tokens",
            "arrow_config",
            "velora_config",
            "monteclora_config",
            "use_bdlora",
            "kasa_config",
            "trainable_token_indices",
        ] {
            let set = field(name).is_some_and(|v| match v {
                Value::Bool(b) => *b,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            });
            if set {
                return Err(adapter_error(
                    &path,
                    format!("`{name}` is set: a LoRA variant nibble does not compute"),
                ));
            }
        }
        for name in ["layer_replication", "target_parameters"] {
            if field(name).is_some_and(|v| !v.as_array().is_some_and(|a| a.is_empty())) {
                return Err(adapter_error(&path, format!("`{name}` is not supported")));
            }
        }
        let rank = |v: &Value| {
            v.as_u64()
                .filter(|&r| r > 0 && r <= 1 << 16)
                .map(|r| r as usize)
        };
        // Absent settings take PEFT's `LoraConfig` defaults; an explicit null is no value.
        let r = match config.get("r") {
            None => defaults::R,
            Some(v) => rank(v).ok_or_else(|| {
                adapter_error(&path, format!("`r` must be a positive integer, found {v}"))
            })?,
        };
        let number = |v: &Value| v.as_f64().filter(|a| a.is_finite());
        let alpha = match config.get("lora_alpha") {
            None => defaults::LORA_ALPHA,
            Some(v) => number(v).ok_or_else(|| {
                adapter_error(&path, format!("`lora_alpha` must be a number, found {v}"))
            })?,
        };
        match field("bias") {
            None => {}
            Some(Value::String(b)) if ["none", "all", "lora_only"].contains(&b.as_str()) => {}
            Some(b) => {
                return Err(adapter_error(
                    &path,
                    format!("`bias` = {b} is not one of \"none\", \"all\", \"lora_only\""),
                ))
            }
        }
        let patterns =
            |name: &str, parse: &dyn Fn(&Value) -> Option<f64>| -> Result<Vec<(String, f64)>> {
                let Some(map) = field(name) else {
                    return Ok(Vec::new());
                };
                let map = map.as_object().ok_or_else(|| {
                    adapter_error(&path, format!("`{name}` must be an object, found {map}"))
                })?;
                map.iter()
                    .map(|(k, v)| {
                        parse(v).map(|x| (k.clone(), x)).ok_or_else(|| {
                            adapter_error(&path, format!("`{name}`: `{k}` has the bad value {v}"))
                        })
                    })
                    .collect()
            };
        let rank_pattern = patterns("rank_pattern", &|v| rank(v).map(|r| r as f64))?
            .into_iter()
            .map(|(k, r)| (k, r as usize))
            .collect();
        let alpha_pattern = patterns("alpha_pattern", &number)?;
        let flag = |name: &str, default: bool| match field(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                adapter_error(&path, format!("`{name}` must be true or false, found {v}"))
            }),
        };
        let rslora = flag("use_rslora", defaults::USE_RSLORA)?;
        let dora = flag("use_dora", false)?;
        let layers_to_transform = field("layers_to_transform");
        let layers_pattern = field("layers_pattern");
        let target_is_str = field("target_modules").is_some_and(Value::is_string);
        for (name, v) in [
            ("layers_to_transform", layers_to_transform),
            ("layers_pattern", layers_pattern),
        ] {
            if let (true, Some(v)) = (target_is_str, v) {
                // LoraConfig's own check.
                return Err(adapter_error(
                    &path,
                    format!(
                        "`{name}` = {v} cannot be used when `target_modules` is a string \
                         (PEFT raises the same)"
                    ),
                ));
            }
        }
        let layers = layer_filter(&path, layers_to_transform, layers_pattern)?;
        let target_modules = match field("target_modules") {
            None => {
                return Err(adapter_error(
                    &path,
                    "`target_modules` is missing: PEFT needs it for a model it has no default \
                     targets for (any nn.Sequential), and so does nibble",
                ))
            }
            Some(v) => selector(&path, "target_modules", v, true)?,
        };
        let exclude_modules = match field("exclude_modules") {
            // PEFT skips an empty list or string.
            Some(v) if !(v.as_array().is_some_and(|a| a.is_empty()) || v.as_str() == Some("")) => {
                Some(selector(&path, "exclude_modules", v, false)?)
            }
            _ => None,
        };
        let modules_to_save = match field("modules_to_save") {
            None => Vec::new(),
            Some(v) => {
                let bad = || {
                    adapter_error(
                        &path,
                        format!("`modules_to_save` must be a list of module names, found {v}"),
                    )
                };
                let list = v.as_array().ok_or_else(bad)?;
                list.iter()
                    .map(|m| {
                        let m = m.as_str().ok_or_else(bad)?;
                        // PEFT: `re.match(rf"(^|.*\.){m}($|\..*)", key)`.
                        let re = regex::Regex::new(&format!(r"^(?:(^|.*\.){m}($|\..*))"))
                            .map_err(|e| {
                                adapter_error(
                                    &path,
                                    format!("`modules_to_save` entry \"{m}\" is not a regex nibble reads: {e}"),
                                )
                            })?;
                        Ok((m.to_string(), re))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let init_product_zero = match field("init_lora_weights") {
            None | Some(Value::Null) | Some(Value::Bool(true)) => true,
            Some(Value::String(init)) => {
                ["gaussian", "eva", "mica"].contains(&init.to_ascii_lowercase().as_str())
            }
            Some(_) => false,
        };
        Ok(AdapterConfig {
            r,
            alpha,
            rslora,
            dora,
            init_product_zero,
            rank_pattern,
            alpha_pattern,
            target_modules,
            exclude_modules,
            modules_to_save,
            layers,
        })
    }

    /// Whether PEFT puts a LoRA layer on module `name` (a Linear): `target_modules` selects it
    /// (under `layers_to_transform`) and neither `exclude_modules` nor `modules_to_save`
    /// names it.
    pub fn targets(&self, name: &str, linears: &[&str]) -> bool {
        !self.excluded(name)
            && self
                .target_modules
                .matches_in(name, linears, self.layers.as_ref())
    }

    /// Whether PEFT keeps module `name` out of LoRA: `exclude_modules` or `modules_to_save`
    /// names it.
    fn excluded(&self, name: &str) -> bool {
        self.exclude_modules
            .as_ref()
            .is_some_and(|e| e.matches(name, &[]))
            || self.modules_to_save.iter().any(|(_, re)| re.is_match(name))
    }

    /// The rank of `module`'s adapter.
    pub fn rank(&self, module: &str) -> usize {
        by_pattern(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// PEFT's scaling of `module`'s `B A x`: `alpha / r` (or `alpha / √r` with `use_rslora`),
    /// each from its pattern where one names the module.
    pub fn scaling(&self, module: &str) -> f32 {
        let (r, alpha) = (
            self.rank(module) as f64,
            by_pattern(&self.alpha_pattern, module).unwrap_or(self.alpha),
        );
        (if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }) as f32
    }
}

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
/// unless `target_modules` is [`DUMMY_TARGET_MODULES`].
///
/// Each targeted layer whose `base_model.model.<name>.lora_A.weight` / `lora_B.weight` pair
/// is in the file gets it (an adapter is attached, trainable, where the layer has none, and
/// that layer's base weight and bias are frozen; PEFT's `lora_alpha / r` scaling, or its
/// `rank_pattern` / `alpha_pattern` entry, is folded into B); a targeted layer the file holds
/// nothing for is left as it is (PEFT's fresh LoRA layer adds zero). LoRA tensors
/// (`….lora_*`) of a module of the model that is not targeted are ignored, as PEFT ignores
/// them (unexpected keys when it loads the file); if nothing is loaded at all, the error
/// names them. Shapes are checked against the layer (`A` `[r, in]`, `B` `[out, r]`, `r` the
/// module's rank in the config). Base parameters the file holds (PEFT's `modules_to_save`
/// and `bias = "all"` / `"lora_only"`) replace those of `layers` and `others`: a Linear whose
/// weight is replaced becomes an f32 layer without an adapter, as PEFT's copy of the module
/// is, and its replaced values are frozen; another module's parameters get the file's values
/// in place. A tensor that belongs to no module of the model, a lone A or B, a wrong shape,
/// or NaN/Inf values (an [`Error::NonFinite`] naming the key, the element and its value) are
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
            let key = [
                format!("base_model.model.{}.{suffix}.weight", layer.name),
                format!("base_model.model.{}.{suffix}.default.weight", layer.name),
            ]
            .into_iter()
            .find(|k| file.info(k).is_some());
            let Some(key) = key else { continue };
            let mut t = file.tensor_f32(&key, Some(&shape))?;
            finite(&key, &t)?;
            if scale != 1.0 {
                t.scale_assign(scale);
            }
            // A finite value that the scaling takes past f32's range.
            finite(&key, &t)?;
            seen.insert(key);
            found.push(t);
        }
        match <[Tensor; 2]>::try_from(found) {
            Ok([a, b]) => {
                let dora = if config.dora {
                    Some(read_dora(dir, &file, &config, layer, &a, &b, &mut seen)?)
                } else {
                    None
                };
                loaded.push((index, a, b, dora))
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
                " (a bias on lora_B)"
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
        let value = file.tensor_f32(key, Some(&shape))?;
        finite(key, &value)?;
        if !bias && loaded.iter().any(|(i, ..)| *i == module) {
            return Err(adapter_error(
                dir,
                format!("`{key}` replaces the weight of a module that also has a LoRA adapter"),
            ));
        }
        replacements.push(Replacement {
            module,
            bias,
            value,
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
    for (index, a, b, dora) in loaded {
        let layer = &mut layers[index];
        match &mut layer.lora {
            Some(lora) => {
                *lora.a.value_mut() = a;
                *lora.b.value_mut() = b;
                lora.dora = dora;
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
                    dora,
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

/// The DoRA of `layer` from the adapter file: its `lora_magnitude_vector` `[out]` (finite) and
/// the scale it gives with the layer's weight as the kernels use it and the adapter's `a` and
/// (scaled) `b` ([`Dora::new`]). The key goes into `seen`. A file without the layer's magnitude
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
) -> Result<Dora> {
    let (out, inp) = layer.dims();
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
            let norms = weight
                .data()
                .chunks(inp.max(1))
                .take(out)
                .map(|row| row.iter().map(|&w| w as f64 * w as f64).sum::<f64>().sqrt() as f32)
                .collect::<Vec<f32>>();
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
    Dora::new(&layer.name, &weight, &lora_product(a, b)?, magnitude)
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
