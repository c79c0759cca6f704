//! The modules of a classifier's state dict, in the order the model runs them: an
//! `nn.Sequential`'s indices (`0.weight`, `3.bias`, ...; a gap in them holds parameter-free
//! layers), or the named modules of a model of its own class (`fc1.weight`, `bn1.running_mean`,
//! `head.weight`, ...), taken in the file's order (the order the model registered them, which a
//! `.pth` keeps; a safetensors file keeps them sorted by name, read in natural order, `layers.2`
//! before `layers.10`, unless nibble wrote it and recorded the order: [`MODULE_ORDER_KEY`]) with
//! a gap between every two of them, where the user says what runs.

use crate::error::{Error, Result};
use nibble_io::Checkpoint;
use std::collections::HashMap;

/// The safetensors metadata key under which nibble records the order of a model's named
/// modules (a JSON list of their paths), which a safetensors file's sorted keys lose: written
/// by [`crate::Sequential::save`] and `nibble quantize`, read by [`ModuleLayout::read`].
pub const MODULE_ORDER_KEY: &str = "nibble.module_order";

/// What a parameter key names within its module: `weight` (a weight, whole or in parts: the
/// parts of a quantized or weight-normalized weight, bitsandbytes' row scales), `bias`, or
/// `stats` (a BatchNorm's running statistics).
fn parameter_kind(rest: &str) -> Option<&'static str> {
    match rest {
        "bias" => Some("bias"),
        "weight" => Some("weight"),
        r if r.starts_with("weight.") => Some("weight"),
        // Weight normalization's two parts (see [`crate::VarBuilder::weight_norm`]).
        "parametrizations.weight.original0"
        | "parametrizations.weight.original1"
        | "weight_g"
        | "weight_v" => Some("weight"),
        // bitsandbytes' 8-bit layout: the row scales and the codes' layout beside the weight.
        "SCB" | "weight_format" => Some("weight"),
        "running_mean" | "running_var" | "num_batches_tracked" => Some("stats"),
        _ => None,
    }
}

/// The module path and parameter kind of a state-dict key: `3.weight` -> (`3`, "weight"),
/// `fc1.weight.q4.packed` -> (`fc1`, "weight"), `features.0.running_var` -> (`features.0`,
/// "stats"). The path ends at the first dot after which a parameter name follows.
pub fn split_key(key: &str) -> Option<(&str, &'static str)> {
    let mut from = 0;
    while let Some(dot) = key[from..].find('.') {
        let at = from + dot;
        if at > 0 {
            if let Some(kind) = parameter_kind(&key[at + 1..]) {
                return Some((&key[..at], kind));
            }
        }
        from = at + 1;
    }
    None
}

/// A Sequential index as PyTorch writes one (`3`, never `03`).
fn sequential_index(path: &str) -> Option<usize> {
    let canonical = path == "0" || !path.starts_with('0');
    (canonical && !path.is_empty() && path.bytes().all(|b| b.is_ascii_digit()))
        .then(|| path.parse().ok())
        .flatten()
}

/// One module of the state dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Its position: the Sequential index, or twice its place among named modules (so that a
    /// gap lies between every two).
    pub index: usize,
    /// Its path under the prefix (`3`, `fc1`, `features.0`).
    pub path: String,
    /// It has a weight (whole or in parts).
    pub weight: bool,
    /// It has a bias.
    pub bias: bool,
    /// It has BatchNorm running statistics.
    pub stats: bool,
}

/// The modules of a state dict under a prefix, in the order the model runs them.
#[derive(Debug, Clone)]
pub struct ModuleLayout {
    /// The modules, by [`ModuleEntry::index`].
    pub modules: Vec<ModuleEntry>,
    /// Named modules (a model of its own class) rather than a Sequential's indices.
    pub named: bool,
}

impl ModuleLayout {
    /// The modules of the keys of `file` under `prefix` (keys outside it are left out). A key
    /// that names no parameter a layer nibble reads has, or a file without such keys, is an
    /// [`Error::Structure`] naming it.
    pub fn read(file: &Checkpoint, prefix: &str) -> Result<Self> {
        Self::read_in_order(file, prefix, None)
    }

    /// [`ModuleLayout::read`], the modules run in `order` where given (their paths under
    /// `prefix`, each once: the order the model's `forward` runs them, which the file may not
    /// keep). An order over a Sequential's indices, or one that leaves out a module of the file
    /// or names one it does not have, is an [`Error::Structure`] naming them.
    pub fn read_in_order(
        file: &Checkpoint,
        prefix: &str,
        order: Option<&[String]>,
    ) -> Result<Self> {
        let structure = |what: String| Error::Structure {
            file: file.path().to_path_buf(),
            what,
        };
        let mut modules: Vec<ModuleEntry> = Vec::new();
        let mut place: HashMap<String, usize> = HashMap::new();
        for key in file.keys_in_file_order() {
            let Some(local) = key.strip_prefix(prefix) else {
                continue;
            };
            let (path, kind) = split_key(local).ok_or_else(|| {
                structure(format!(
                    "`{key}` is not a parameter of a Linear, LayerNorm, BatchNorm1d or other layer nibble reads (expected `{prefix}<module>.weight`, `.bias` or a BatchNorm's `.running_mean` / `.running_var`)"
                ))
            })?;
            let at = *place.entry(path.to_string()).or_insert_with(|| {
                modules.push(ModuleEntry {
                    index: 0,
                    path: path.to_string(),
                    weight: false,
                    bias: false,
                    stats: false,
                });
                modules.len() - 1
            });
            let entry = &mut modules[at];
            match kind {
                "weight" => entry.weight = true,
                "stats" => entry.stats = true,
                _ => entry.bias = true,
            }
        }
        if modules.is_empty() {
            return Err(structure(format!(
                "no `{prefix}<module>.weight` tensors: not a classifier's state dict"
            )));
        }
        let indices: Option<Vec<usize>> =
            modules.iter().map(|m| sequential_index(&m.path)).collect();
        let named = indices.is_none();
        if let Some(order) = order {
            let paths = || {
                modules
                    .iter()
                    .map(|m| m.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !named {
                return Err(structure(format!(
                    "a module order is given, but the modules are an nn.Sequential's indices ({}), which say their order",
                    paths()
                )));
            }
            // Each path's first place in the order, looked up once per module: the sort below
            // asks for it O(n log n) times, which a scan of the order made quadratic and worse.
            let mut places: HashMap<&str, usize> = HashMap::with_capacity(order.len());
            for (i, p) in order.iter().enumerate() {
                places.entry(p.as_str()).or_insert(i);
            }
            let position = |m: &ModuleEntry| places.get(m.path.as_str()).copied();
            let paths_of_file: std::collections::HashSet<&str> =
                modules.iter().map(|m| m.path.as_str()).collect();
            if let Some(unknown) = order.iter().find(|p| !paths_of_file.contains(p.as_str())) {
                return Err(structure(format!(
                    "the module order names `{unknown}`, which is no module of the file (its modules: {})",
                    paths()
                )));
            }
            let mut seen = std::collections::HashSet::with_capacity(order.len());
            if let Some(twice) = order.iter().find(|p| !seen.insert(p.as_str())) {
                return Err(structure(format!(
                    "the module order names `{twice}` twice (the file's modules: {})",
                    paths()
                )));
            }
            if let Some(missing) = modules.iter().find(|m| position(m).is_none()) {
                return Err(structure(format!(
                    "the module order leaves out `{}` (the file's modules: {})",
                    missing.path,
                    paths()
                )));
            }
            // Each entry once, each a module of the file, none left out: a permutation.
            modules.sort_by_key(|m| position(m));
            for (place, m) in modules.iter_mut().enumerate() {
                m.index = 2 * place;
            }
            return Ok(ModuleLayout { modules, named });
        }
        match indices {
            Some(indices) => {
                for (m, i) in modules.iter_mut().zip(indices) {
                    m.index = i;
                }
                modules.sort_by_key(|m| m.index);
            }
            None => {
                // A recorded order of exactly these modules replaces the file's; one that names
                // other modules is an error, not a silent fall back to the file's order.
                let recorded: Option<Vec<String>> = match file.metadata().get(MODULE_ORDER_KEY) {
                    None => None,
                    Some(text) => Some(serde_json::from_str(text).map_err(|e| {
                        structure(format!(
                            "its metadata `{MODULE_ORDER_KEY}` is not a list of module paths \
                             ({e})"
                        ))
                    })?),
                };
                // Each module path's first place in the recorded order (paths under `prefix`),
                // built once: a scan of the order per module, and per comparison of the sort,
                // took minutes on a file of 10,000 modules.
                let places: Option<HashMap<&str, usize>> = recorded.as_ref().map(|order| {
                    let mut places = HashMap::with_capacity(order.len());
                    for (i, p) in order.iter().enumerate() {
                        if let Some(path) = p.strip_prefix(prefix) {
                            places.entry(path).or_insert(i);
                        }
                    }
                    places
                });
                if let (Some(order), Some(places)) = (&recorded, &places) {
                    let fits = order.len() == modules.len()
                        && modules.iter().all(|m| places.contains_key(m.path.as_str()));
                    if !fits {
                        let paths: Vec<&str> = modules.iter().map(|m| m.path.as_str()).collect();
                        return Err(structure(format!(
                            "its metadata `{MODULE_ORDER_KEY}` records the module order {order:?}, \
                             which is not an order of its modules under `{prefix}` ({}); \
                             `--order` gives one",
                            paths.join(", ")
                        )));
                    }
                }
                if let Some(places) = &places {
                    modules.sort_by_key(|m| places.get(m.path.as_str()).copied());
                }
                for (place, m) in modules.iter_mut().enumerate() {
                    m.index = 2 * place;
                }
            }
        }
        Ok(ModuleLayout { modules, named })
    }

    /// The first index of each gap between two modules (every boundary between named modules).
    pub fn gaps(&self) -> Vec<usize> {
        self.modules
            .windows(2)
            .filter(|w| w[1].index > w[0].index + 1)
            .map(|w| w[0].index + 1)
            .collect()
    }

    /// Whether parameter-free layers come before the first module: a Sequential whose indices
    /// start above 0.
    pub fn leading_gap(&self) -> bool {
        !self.named && self.modules.first().is_some_and(|m| m.index > 0)
    }

    /// Where `indices` lie, for messages: `at indices [1, 4]` for a Sequential, `at modules
    /// fc1, bn1` for named modules; with `after`, each index is the gap after a module (`after
    /// modules fc1, bn1`).
    pub fn describe(&self, indices: &[usize], after: bool) -> String {
        if !self.named {
            return format!("at indices {indices:?}");
        }
        let paths: Vec<&str> = indices
            .iter()
            .filter_map(|&i| {
                let wanted = if after { i.checked_sub(1)? } else { i };
                self.modules
                    .iter()
                    .find(|m| m.index == wanted)
                    .map(|m| m.path.as_str())
            })
            .collect();
        format!(
            "{} modules {}",
            if after { "after" } else { "at" },
            paths.join(", ")
        )
    }

    /// The indices of the modules of a 1-D weight without BatchNorm statistics (LayerNorms,
    /// RMSNorms, GroupNorms, PReLUs), by the rank of `<prefix><path>.weight` in `file`.
    pub fn norm_indices(&self, file: &Checkpoint, prefix: &str) -> Vec<usize> {
        self.modules
            .iter()
            .filter(|m| !m.stats)
            .filter(|m| {
                file.info(&format!("{prefix}{}.weight", m.path))
                    .is_some_and(|(_, shape)| shape.len() == 1)
            })
            .map(|m| m.index)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_their_parameter() {
        for (key, want) in [
            ("3.weight", Some(("3", "weight"))),
            ("fc1.weight.q4.packed", Some(("fc1", "weight"))),
            ("features.0.running_var", Some(("features.0", "stats"))),
            (
                "a.b.parametrizations.weight.original1",
                Some(("a.b", "weight")),
            ),
            ("weight.weight", Some(("weight", "weight"))),
            ("head.bias", Some(("head", "bias"))),
            ("weight", None),
            (".weight", None),
            ("fc1.scale", None),
        ] {
            assert_eq!(split_key(key), want, "{key}");
        }
        assert_eq!(sequential_index("03"), None);
        assert_eq!(sequential_index("0"), Some(0));
        assert_eq!(sequential_index("12"), Some(12));
        assert_eq!(sequential_index("fc1"), None);
    }

    /// A file of many named modules with a recorded order (or an `--order`) is laid out as
    /// the order says (the order is looked up in a map: it was scanned once per module and once
    /// per comparison of the sort, and 10,000 modules in reverse order took minutes).
    #[test]
    fn a_long_module_order_is_laid_out_in_its_order() {
        use std::sync::Arc;
        let n = 20_000;
        let mut header = String::from("{");
        let order: Vec<String> = (0..n).rev().map(|i| format!("m{i}")).collect();
        let meta = serde_json::to_string(&serde_json::to_string(&order).unwrap()).unwrap();
        header.push_str(&format!(
            "\"__metadata__\":{{\"{MODULE_ORDER_KEY}\":{meta}}}"
        ));
        for i in 0..n {
            header.push_str(&format!(
                ",\"m{i}.weight\":{{\"dtype\":\"F32\",\"shape\":[0,0],\"data_offsets\":[0,0]}}"
            ));
        }
        header.push('}');
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let file = Checkpoint::from_bytes("many.safetensors", Arc::new(bytes)).unwrap();
        let layout = ModuleLayout::read(&file, "").unwrap();
        let paths: Vec<&str> = layout.modules.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths.len(), n);
        assert_eq!((paths[0], paths[n - 1]), ("m19999", "m0"));
        let given: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let layout = ModuleLayout::read_in_order(&file, "", Some(&given)).unwrap();
        assert_eq!(layout.modules[0].path, "m0");
        assert_eq!(layout.modules[n - 1].path, format!("m{}", n - 1));
    }
}
