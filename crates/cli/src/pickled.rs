//! What a whole pickled model (`torch.save(model)`) says of its layers that a state dict cannot:
//! the class of each module of its `nn.Sequential` (an activation has no tensors) and the
//! settings they were made with (epsilons, slopes, group counts). Read from the metadata the
//! checkpoint reader keeps for such a file ([`nibble_io::PICKLED_MODULES_KEY`]) and turned into
//! the [`Structure`] that `--activation`, `--norm` and the epsilons would give.

use crate::error::{Error, Result};
use crate::model::{parse_activations, parse_norms, Structure};
use nibble_io::{Checkpoint, PICKLED_MODULES_KEY};
use serde_json::Value;
use std::path::Path;

/// One module of the pickled model, as the reader lists it.
struct Module<'a> {
    /// Its path (in the file `without_wrappers` gives: inside DataParallel's `module.`).
    path: &'a str,
    /// `torch.nn.modules.linear.Linear`, or a class of the model's own code.
    class: &'a str,
    attrs: &'a serde_json::Map<String, Value>,
}

impl Module<'_> {
    /// The class name when it is one of PyTorch's (`Linear`), else `None`.
    fn torch_class(&self) -> Option<&str> {
        self.class
            .strip_prefix("torch.nn.modules.")
            .and_then(|rest| rest.rsplit('.').next())
    }

    fn float(&self, name: &str) -> Option<f64> {
        self.attrs.get(name).and_then(Value::as_f64)
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.attrs.get(name).and_then(Value::as_bool)
    }
}

/// Takes `eps` into `slot` (a norm kind's epsilon), an error where another module of that kind
/// has another one (one `--layer-norm-eps` serves them all).
fn take_eps(slot: &mut Option<f64>, eps: f64, m: &Module<'_>, path: &Path) -> Result<()> {
    match *slot {
        Some(prior) if prior != eps => Err(Error::Usage {
            arg: "--model",
            what: format!(
                "{}: module `{}` ({}) has eps {eps}, another of its kind {prior}; nibble \
                 takes one epsilon for all of them",
                path.display(),
                m.path,
                m.class
            ),
        }),
        _ => {
            *slot = Some(eps);
            Ok(())
        }
    }
}

/// What a whole pickled model's `nn.Sequential` says of its layers, as the flags would say it:
/// `--activation` (one entry per gap between the layers, and one in front for what comes
/// before the first; `None` where there is no gap), `--norm` (one kind per module of a 1-D
/// weight; `None` where there is none) and the norms' epsilons where it has such norms.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PickledFlags {
    pub(crate) activation: Option<String>,
    pub(crate) norm: Option<String>,
    pub(crate) layer_norm_eps: Option<f64>,
    pub(crate) batch_norm_eps: Option<f64>,
    pub(crate) rms_norm_eps: Option<f64>,
}

/// The [`Structure`] a whole pickled model gives ([`pickled_flags`]): `given` with the file's
/// gaps unless `--activation` was given, its norm kinds unless `--norm` was, and its norms'
/// epsilons. Each flag replaces only what it says: `--activation relu` on a model whose
/// BatchNorm has eps 1e-2 keeps that eps (it fell back to the default, 1e-5, and the
/// logits moved by 0.6). `Ok(None)` where the file says nothing.
pub(crate) fn pickled_structure(
    file: &Checkpoint,
    prefix: &str,
    given: &Structure,
    path: &Path,
) -> Result<Option<Structure>> {
    let Some(flags) = pickled_flags(file, prefix, path)? else {
        return Ok(None);
    };
    let mut structure = given.clone();
    if let Some(a) = flags.activation.as_deref().filter(|_| !given.gaps_given) {
        structure.gaps = parse_activations(a)?;
        structure.gaps_given = true;
    }
    if let Some(n) = flags.norm.as_deref().filter(|_| given.norms.is_none()) {
        structure.norms = Some(parse_norms(n)?);
    }
    for (eps, slot) in [
        (flags.layer_norm_eps, &mut structure.layer_norm_eps),
        (flags.batch_norm_eps, &mut structure.batch_norm_eps),
        (flags.rms_norm_eps, &mut structure.rms_norm_eps),
    ] {
        if let Some(e) = eps {
            *slot = e as f32;
        }
    }
    Ok(Some(structure))
}

/// The [`PickledFlags`] of a whole pickled model's `nn.Sequential`, where `file` (already
/// without its wrappers) is one and its Sequential sits at `prefix` (`net.`, or the root).
/// `Ok(None)` for a state dict, or a model whose layers are not an `nn.Sequential` at `prefix`
/// (named modules: their order is in the model's code, which a pickle does not hold), or one
/// without a layer. A module nibble does not compute (a class of the model's own code without
/// a 2-D weight, an `nn.Softmax`, a `BatchNorm1d(track_running_stats=False)`), or an
/// activation after the last layer that changes the logits, is an error naming its path and
/// class.
pub(crate) fn pickled_flags(
    file: &Checkpoint,
    prefix: &str,
    path: &Path,
) -> Result<Option<PickledFlags>> {
    let Some(text) = file.metadata().get(PICKLED_MODULES_KEY) else {
        return Ok(None);
    };
    let bad = |what: String| Error::Usage {
        arg: "--model",
        what: format!("{}: {what}", path.display()),
    };
    let list: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "the pickled model's module list is unreadable: {e}"
        ))
    })?;
    let modules: Vec<Module<'_>> = list
        .iter()
        .filter_map(|m| {
            Some(Module {
                path: m.get("path")?.as_str()?,
                class: m.get("class")?.as_str()?,
                attrs: m.get("attrs")?.as_object()?,
            })
        })
        .collect();
    let container = prefix.trim_end_matches('.');
    if !modules
        .iter()
        .any(|m| m.path == container && m.torch_class() == Some("Sequential"))
    {
        return Ok(None);
    }
    // The layers in the order the Sequential runs them: its children, a nested nn.Sequential's
    // own in its place (as a state dict's keys `0.0.weight`, `1.weight` chain them).
    let mut leaves = Vec::new();
    sequential_leaves(&modules, container, "", 0, &mut leaves);

    // The norms' epsilons as they are found (the flags' other fields are made at the end).
    let mut eps = PickledFlags::default();
    // What each gap holds, in order (the first entry what comes before the first layer), and
    // each module of a 1-D weight's kind.
    let mut gaps: Vec<Vec<String>> = vec![Vec::new()];
    let mut norms: Vec<String> = Vec::new();
    let mut layers = 0usize;
    for (relative, m) in &leaves {
        let class = m.torch_class().unwrap_or("");
        let weight_dims = file
            .info(&format!("{prefix}{relative}.weight"))
            .map(|(_, shape)| shape.len());
        let step: Option<String> = match class {
            "Linear" => None,
            "BatchNorm1d" => {
                if m.bool("track_running_stats") == Some(false) {
                    return Err(bad(format!(
                        "module `{}` is a BatchNorm1d(track_running_stats=False), which \
                         normalizes each batch by its own statistics: nibble does not compute it",
                        m.path
                    )));
                }
                if let Some(e) = m.float("eps") {
                    take_eps(&mut eps.batch_norm_eps, e, m, path)?;
                }
                None
            }
            "LayerNorm" => norm_step(
                m,
                &mut eps.layer_norm_eps,
                "layer",
                "layer_norm",
                &mut norms,
                path,
            )?,
            "RMSNorm" => norm_step(
                m,
                &mut eps.rms_norm_eps,
                "rms",
                "rms_norm",
                &mut norms,
                path,
            )?,
            "GroupNorm" => {
                let groups = m
                    .attrs
                    .get("num_groups")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad(format!("GroupNorm `{}` has no num_groups", m.path)))?;
                let (with, without) = (format!("group:{groups}"), format!("group_norm:{groups}"));
                norm_step(
                    m,
                    &mut eps.layer_norm_eps,
                    &with,
                    &without,
                    &mut norms,
                    path,
                )?
            }
            "PReLU" => {
                norms.push("prelu".into());
                None
            }
            // A module of the model's own class with a 2-D weight (a subclass of nn.Linear):
            // a Linear, as a state dict reads it.
            _ if weight_dims == Some(2) => None,
            _ => Some(activation_of(m).ok_or_else(|| {
                bad(format!(
                    "module `{}` is a {} (of the pickled model's nn.Sequential), which nibble \
                     does not compute",
                    m.path, m.class
                ))
            })?),
        };
        match step {
            Some(a) => gaps.last_mut().expect("one gap at least").push(a),
            None => {
                layers += 1;
                gaps.push(Vec::new());
            }
        }
    }
    if layers == 0 {
        return Ok(None);
    }
    // After the last layer: nothing nibble could run there may change the logits.
    let trailing = gaps.pop().unwrap_or_default();
    if let Some(a) = trailing.iter().find(|a| *a != "identity") {
        return Err(bad(format!(
            "the pickled model's nn.Sequential ends with `{a}` after its last layer, which \
             nibble does not run (its logits are the last layer's output)"
        )));
    }
    // The gaps between layers (empty ones are no gap), after what comes before the first.
    let leading = gaps.remove(0);
    let between: Vec<String> = gaps
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(|g| g.join("+"))
        .collect();
    let mut entries = Vec::new();
    if !leading.is_empty() {
        entries.push(leading.join("+"));
    }
    entries.extend(between);
    Ok(Some(PickledFlags {
        activation: (!entries.is_empty()).then(|| entries.join(",")),
        norm: (!norms.is_empty()).then(|| norms.join(",")),
        ..eps
    }))
}

/// Deepest nesting of nn.Sequential containers [`sequential_leaves`] expands.
const MAX_NESTING: usize = 16;

/// The modules that run, in order, in the nn.Sequential at `path` (registration order, which
/// `modules` keeps): each child, or a child nn.Sequential's own, in its place, with its path
/// relative to the outermost container (`relative` is `path`'s).
fn sequential_leaves<'m>(
    modules: &'m [Module<'m>],
    path: &str,
    relative: &str,
    depth: usize,
    out: &mut Vec<(String, &'m Module<'m>)>,
) {
    for m in modules {
        let name = if path.is_empty() {
            Some(m.path).filter(|p| !p.is_empty())
        } else {
            m.path.strip_prefix(path).and_then(|r| r.strip_prefix('.'))
        };
        let Some(name) = name.filter(|n| !n.contains('.')) else {
            continue;
        };
        let rel = if relative.is_empty() {
            name.to_string()
        } else {
            format!("{relative}.{name}")
        };
        if m.torch_class() == Some("Sequential") && depth < MAX_NESTING {
            sequential_leaves(modules, m.path, &rel, depth + 1, out);
        } else {
            out.push((rel, m));
        }
    }
}

/// A norm module `m`: its eps into `slot`; with parameters (affine, the default) a module of a
/// 1-D weight of kind `with` (pushed on `norms`, `None` returned), else the gap step `without`.
fn norm_step(
    m: &Module<'_>,
    slot: &mut Option<f64>,
    with: &str,
    without: &str,
    norms: &mut Vec<String>,
    path: &Path,
) -> Result<Option<String>> {
    if let Some(e) = m.float("eps") {
        take_eps(slot, e, m, path)?;
    }
    match m.bool("elementwise_affine").or(m.bool("affine")) {
        Some(false) => Ok(Some(without.to_string())),
        _ => {
            norms.push(with.to_string());
            Ok(None)
        }
    }
}

/// The `--activation` entry of a parameter-free PyTorch module with the settings it was made
/// with, or `None` where nibble has no such activation (or not with those settings).
fn activation_of(m: &Module<'_>) -> Option<String> {
    let coef = |name: &str, default: f64| m.float(name).unwrap_or(default);
    Some(match m.torch_class()? {
        "ReLU" => "relu".into(),
        "GELU" => match m.attrs.get("approximate").and_then(Value::as_str) {
            None | Some("none") => "gelu".into(),
            Some("tanh") => "gelu_tanh".into(),
            Some(_) => return None,
        },
        "Tanh" => "tanh".into(),
        "Sigmoid" => "sigmoid".into(),
        "SiLU" => "silu".into(),
        "LeakyReLU" => format!("leaky_relu:{}", coef("negative_slope", 0.01)),
        "ELU" => format!("elu:{}", coef("alpha", 1.0)),
        "CELU" => format!("celu:{}", coef("alpha", 1.0)),
        "Softplus" if coef("beta", 1.0) == 1.0 && coef("threshold", 20.0) == 20.0 => {
            "softplus".into()
        }
        "Mish" => "mish".into(),
        "Hardswish" => "hardswish".into(),
        "ReLU6" => "relu6".into(),
        "SELU" => "selu".into(),
        "Hardtanh" if coef("min_val", -1.0) == -1.0 && coef("max_val", 1.0) == 1.0 => {
            "hardtanh".into()
        }
        "Hardsigmoid" => "hardsigmoid".into(),
        "Softsign" => "softsign".into(),
        "LogSigmoid" => "logsigmoid".into(),
        "Tanhshrink" => "tanhshrink".into(),
        "Identity" | "Dropout" | "AlphaDropout" | "Flatten" => "identity".into(),
        _ => return None,
    })
}
