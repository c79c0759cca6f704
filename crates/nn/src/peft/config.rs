//! `adapter_config.json`: what loading needs from it, and the settings nibble refuses.

use super::{adapter_error, CONFIG_FILE};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

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
    /// `lora_dropout`: the probability PEFT's training drops each input of `lora_A` with (0
    /// when absent or null; a number outside `[0, 1]` is an error, as `nn.Dropout` refuses
    /// it). Inference never drops; nibble's training does not either.
    pub dropout: f64,
    /// `use_dora`: each adapted layer is a DoRA ([`crate::linear::Dora`]), its
    /// `lora_magnitude_vector` read from the file or, where the file has none, filled in as PEFT
    /// fills it (see [`AdapterConfig::init_product_zero`]).
    pub dora: bool,
    /// `lora_bias`: each adapted layer's `lora_B` has a bias (`[out]`, in the file as
    /// `<module>.lora_B.bias`), added with the product and scaled as it is:
    /// `y = W x + b + s · (B A x + b_B)`.
    pub lora_bias: bool,
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
    /// The regexes of the keys of `rank_pattern`, compiled once by [`AdapterConfig::read`].
    rank_regexes: Arc<PatternSet>,
    /// The regexes of the keys of `alpha_pattern`, likewise.
    alpha_regexes: Arc<PatternSet>,
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

/// The subfolders of `dir` that hold an adapter config (PEFT's named adapters), sorted; at
/// most the first 8.
fn named_adapters(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join(CONFIG_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.truncate(8);
    names
}

/// The most bytes the regexes of one of `rank_pattern` / `alpha_pattern` may take compiled, all
/// of its keys together (PEFT's keys are module names or short regexes over them). Compiling
/// each key again at every look-up, under the regex crate's default limit of 10 MiB a regex,
/// let a 63 KB config of 2,000 keys such as `\w{1000}` run for minutes.
const PATTERN_SET_LIMIT: usize = 64 << 20;

/// PEFT's `get_pattern_key` regex for pattern `pattern`: the module name's last dotted
/// components (`(.*\.)?(pattern)$`).
/// Where `pattern` uses a construct that both Rust's `regex` and Python's `re` (PEFT's
/// matcher) accept but read differently, a description of it: inside a character class, a
/// `[` (a nested class or a POSIX class such as `[:digit:]` in Rust, a literal `[` in Python)
/// or a set operation `--`, `&&`, `~~` (literal characters in Python). Such a key matched
/// other modules than PEFT's, silently.
fn python_reads_differently(pattern: &str) -> Option<&'static str> {
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' if !in_class => {
                in_class = true;
                // A `^` and then a `]` first are literal in both.
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
            }
            ']' if in_class => in_class = false,
            '[' => {
                return Some(
                    "a `[` inside a character class (Rust reads a nested class or a POSIX class \
                     such as [:digit:], Python a literal `[`)",
                )
            }
            '-' | '&' | '~' if in_class && chars.peek() == Some(&c) => {
                return Some(
                    "a set operation inside a character class (`--`, `&&` or `~~`: Rust \
                     subtracts, intersects or differences two classes, Python reads the \
                     characters)",
                )
            }
            _ => {}
        }
    }
    None
}

/// An error naming setting `name` and its `key` where Python reads `key` differently from
/// nibble ([`python_reads_differently`]).
fn check_python_regex(path: &Path, name: &str, key: &str) -> Result<()> {
    match python_reads_differently(key) {
        Some(what) => Err(adapter_error(
            path,
            format!(
                "`{name}`: `{key}` uses {what}; PEFT matches it as a Python regex, so nibble \
                 would adapt other modules than PEFT's (write the class out)"
            ),
        )),
        None => Ok(()),
    }
}

fn pattern_source(pattern: &str) -> String {
    format!(r"^(?:.*\.)?(?:{pattern})$")
}

/// The keys of a `rank_pattern` / `alpha_pattern` map as one set of regexes, in the keys'
/// order, compiled once by [`AdapterConfig::read`].
#[derive(Debug, Clone, Default)]
struct PatternSet(Option<regex::RegexSet>);

impl PatternSet {
    /// The set of `keys`, setting `name` of the config at `path` (for the errors: a key that is
    /// no regex nibble reads, regexes that together take more than [`PATTERN_SET_LIMIT`]
    /// bytes).
    fn compile(path: &Path, name: &str, keys: &[&str]) -> Result<Self> {
        // The syntax alone: a size limit of 0 ends the build once the pattern is parsed. A key
        // nibble cannot read as a regex (Python-only syntax such as a lookbehind, which PEFT
        // matches) is an error: taken as a plain name it would silently match nothing.
        for k in keys {
            check_python_regex(path, name, k)?;
            if let Err(regex::Error::Syntax(e)) = regex::RegexBuilder::new(&pattern_source(k))
                .size_limit(0)
                .build()
            {
                return Err(adapter_error(
                    path,
                    format!(
                        "`{name}`: the key `{k}` is not a regex nibble reads (PEFT matches each \
                         key as a Python regex against the module names): {e}"
                    ),
                ));
            }
        }
        if keys.is_empty() {
            return Ok(PatternSet(None));
        }
        let set = regex::RegexSetBuilder::new(keys.iter().map(|k| pattern_source(k)))
            .size_limit(PATTERN_SET_LIMIT)
            .build()
            .map_err(|e| {
                adapter_error(
                    path,
                    format!(
                        "`{name}`: its {} patterns take more than nibble's limit of {} MiB \
                         compiled ({e})",
                        keys.len(),
                        PATTERN_SET_LIMIT >> 20
                    ),
                )
            })?;
        Ok(PatternSet(Some(set)))
    }

    /// The position of the first key whose regex matches `module`.
    fn first_match(&self, module: &str) -> Option<usize> {
        self.0.as_ref()?.matches(module).iter().next()
    }
}

/// The value of the first pattern, in the file's order, that names `module`, as PEFT's
/// `get_pattern_key` picks it: the first key whose regex ([`pattern_source`]) matches the name
/// (a plain module name matches itself; a whole name gets no precedence).
fn by_pattern<T: Copy>(patterns: &[(String, T)], set: &PatternSet, module: &str) -> Option<T> {
    set.first_match(module)
        .and_then(|i| patterns.get(i))
        .map(|(_, v)| *v)
}

/// The keys of `rank_pattern` and `alpha_pattern` in the order `adapter_config.json` gives
/// them (PEFT tries a module's patterns in that order; a [`Value`]'s maps are sorted). Read
/// apart from the config's [`Value`], where the file allows: a file it cannot be read from
/// keeps the sorted order, and the config's own reading reports what is wrong with it.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct PatternOrder {
    rank_pattern: KeyOrder,
    alpha_pattern: KeyOrder,
}

/// The keys of a JSON object in the file's order, each once (where it first stands, as a
/// Python `dict` keeps them); anything else than an object gives no keys.
#[derive(Default)]
struct KeyOrder(Vec<String>);

impl<'de> serde::Deserialize<'de> for KeyOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<KeyOrder, A::Error> {
                let mut keys: Vec<String> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some((k, serde::de::IgnoredAny)) = map.next_entry::<String, _>()? {
                    if seen.insert(k.clone()) {
                        keys.push(k);
                    }
                }
                Ok(KeyOrder(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

impl KeyOrder {
    /// `patterns` (sorted by key) in this order; keys it does not hold keep their place after
    /// those it does.
    fn arrange<T>(&self, patterns: &mut [(String, T)]) {
        let place: std::collections::HashMap<&str, usize> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        patterns.sort_by_key(|(k, _)| place.get(k.as_str()).copied().unwrap_or(usize::MAX));
    }
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
    for p in &patterns {
        check_python_regex(path, "layers_pattern", p)?;
    }
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
        Value::String(s) => {
            check_python_regex(path, name, s)?;
            regex::Regex::new(&format!("^(?:{s})$"))
                .map(|re| ModuleSelector::Regex(s.clone(), re))
                .map_err(|e| {
                    adapter_error(
                        path,
                        format!("`{name}` = \"{s}\" is not a regex nibble reads: {e}"),
                    )
                })
        }
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
        if dir.is_file() {
            return Err(adapter_error(
                dir,
                format!(
                    "is a file; an adapter is a directory holding {CONFIG_FILE} and its weights \
                     (as PEFT's save_pretrained writes it)"
                ),
            ));
        }
        let path = dir.join(CONFIG_FILE);
        if dir.is_dir() && !path.exists() {
            // PEFT saves an adapter named other than "default" in a folder of that name.
            let named = named_adapters(dir);
            if !named.is_empty() {
                return Err(adapter_error(
                    dir,
                    format!(
                        "holds no {CONFIG_FILE}, but its subfolders {} do: PEFT saves an adapter \
                         named other than \"default\" in a folder of that name; give that folder \
                         (`{}`)",
                        named.join(", "),
                        dir.join(&named[0]).display()
                    ),
                ));
            }
        }
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
                let found = match (other, field("peft_type")) {
                    (Some(kind), _) => {
                        format!("\"{kind}\" (nibble reads LoRA and DoRA adapters only)")
                    }
                    (None, Some(v)) => format!("{v}, not a string"),
                    (None, None) => "no peft_type".to_string(),
                };
                return Err(adapter_error(
                    &path,
                    format!("peft_type must be \"LORA\", found {found}"),
                ));
            }
        }
        for (name, what) in [
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
        let dropout = match config.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => number(v)
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| {
                    adapter_error(
                        &path,
                        format!("`lora_dropout` must be a probability from 0 to 1, found {v}"),
                    )
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
        let mut rank_pattern: Vec<(String, usize)> =
            patterns("rank_pattern", &|v| rank(v).map(|r| r as f64))?
                .into_iter()
                .map(|(k, r)| (k, r as usize))
                .collect();
        let mut alpha_pattern = patterns("alpha_pattern", &number)?;
        let order: PatternOrder = serde_json::from_slice(&text).unwrap_or_default();
        order.rank_pattern.arrange(&mut rank_pattern);
        order.alpha_pattern.arrange(&mut alpha_pattern);
        let compile =
            |name: &str, keys: Vec<&str>| PatternSet::compile(&path, name, &keys).map(Arc::new);
        let rank_regexes = compile(
            "rank_pattern",
            rank_pattern.iter().map(|(k, _)| k.as_str()).collect(),
        )?;
        let alpha_regexes = compile(
            "alpha_pattern",
            alpha_pattern.iter().map(|(k, _)| k.as_str()).collect(),
        )?;
        let flag = |name: &str, default: bool| match field(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                adapter_error(&path, format!("`{name}` must be true or false, found {v}"))
            }),
        };
        let rslora = flag("use_rslora", defaults::USE_RSLORA)?;
        let dora = flag("use_dora", false)?;
        let lora_bias = flag("lora_bias", false)?;
        if dora && lora_bias {
            // LoraConfig's own check.
            return Err(adapter_error(
                &path,
                "`lora_bias` = true with `use_dora` = true: PEFT does not support a bias on \
                 lora_B for DoRA (it raises the same)",
            ));
        }
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
                        check_python_regex(&path, "modules_to_save", m)?;
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
            dropout,
            dora,
            lora_bias,
            init_product_zero,
            rank_pattern,
            alpha_pattern,
            rank_regexes,
            alpha_regexes,
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
    pub(super) fn excluded(&self, name: &str) -> bool {
        self.exclude_modules
            .as_ref()
            .is_some_and(|e| e.matches(name, &[]))
            || self.modules_to_save.iter().any(|(_, re)| re.is_match(name))
    }

    /// The rank of `module`'s adapter.
    pub fn rank(&self, module: &str) -> usize {
        by_pattern(&self.rank_pattern, &self.rank_regexes, module).unwrap_or(self.r)
    }

    /// PEFT's scaling of `module`'s `B A x`: `alpha / r` (or `alpha / √r` with `use_rslora`),
    /// each from its pattern where one names the module.
    pub fn scaling(&self, module: &str) -> f32 {
        let (r, alpha) = (
            self.rank(module) as f64,
            by_pattern(&self.alpha_pattern, &self.alpha_regexes, module).unwrap_or(self.alpha),
        );
        (if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }) as f32
    }
}
