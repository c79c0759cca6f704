//! What a whole pickled model (`torch.save(model)`) says of its layers that a state dict cannot:
//! the class of each module of its `nn.Sequential`, or of a model of its own class (an
//! activation has no tensors; a loss kept beside the layers is no layer), and the settings
//! they were made with (epsilons, slopes, group counts). Read from the metadata the
//! checkpoint reader keeps for such a file ([`nibble_io::PICKLED_MODULES_KEY`]) and turned into
//! the [`Structure`] that `--activation`, `--norm` and the epsilons would give.

use crate::error::{Error, Result};
use crate::model::{parse_activations, parse_norms, Structure};
use nibble_io::{Checkpoint, PICKLED_MODULES_KEY};
use nibble_nn::layout::ModuleLayout;
use serde_json::Value;
use std::collections::HashMap;
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
    /// Parameter-free modules of a model of named modules registered before its first layer or
    /// after its last, which may run anywhere and are not read (their paths).
    pub(crate) unread: Vec<String>,
    /// Loss modules of a model of named modules whose tensors (class weights) the state dict
    /// holds: no layers, read without them (their paths under the prefix).
    pub(crate) dropped: Vec<String>,
}

/// Whether `m` is one of PyTorch's losses (`torch.nn.modules.loss`), which a model may keep
/// beside its layers but its forward does not run on the logits.
fn is_loss(m: &Module<'_>) -> bool {
    m.class.starts_with("torch.nn.modules.loss.")
}

/// The [`Structure`] a whole pickled model gives ([`pickled_flags`]): `given` with the file's
/// gaps unless `--activation` was given, its norm kinds unless `--norm` was, and its norms'
/// epsilons unless the flag of their kind was (a given one that differs goes into
/// [`Structure::replaced_eps`], for a note). Each flag replaces only what it says:
/// `--activation relu` on a model whose BatchNorm has eps 1e-2 keeps that eps (it fell back
/// to the default, 1e-5, and the logits moved by 0.6). `Ok(None)` where the file says
/// nothing.
pub(crate) fn pickled_structure(
    file: &Checkpoint,
    prefix: &str,
    given: &Structure,
    path: &Path,
) -> Result<Option<Structure>> {
    let Some(flags) = pickled_flags(file, prefix, path, given.order.as_deref())? else {
        return Ok(None);
    };
    let mut structure = given.clone();
    structure.unread = flags.unread.clone();
    structure.dropped = flags.dropped.clone();
    if let Some(a) = flags.activation.as_deref().filter(|_| !given.gaps_given) {
        structure.gaps = parse_activations(a)?;
        structure.gaps_given = true;
    }
    if let Some(n) = flags.norm.as_deref().filter(|_| given.norms.is_none()) {
        structure.norms = Some(parse_norms(n)?);
    }
    for (arg, own, slot) in [
        (
            "--layer-norm-eps",
            flags.layer_norm_eps,
            &mut structure.layer_norm_eps,
        ),
        (
            "--batch-norm-eps",
            flags.batch_norm_eps,
            &mut structure.batch_norm_eps,
        ),
        (
            "--rms-norm-eps",
            flags.rms_norm_eps,
            &mut structure.rms_norm_eps,
        ),
    ] {
        match (own, *slot) {
            (Some(own), None) => *slot = Some(own as f32),
            (Some(own), Some(given)) if given != own as f32 => structure.replaced_eps.push(
                format!("{arg} {given} replaces the pickled model's own eps, {own}"),
            ),
            _ => {}
        }
    }
    Ok(Some(structure))
}

/// The [`PickledFlags`] of a whole pickled model, where `file` (already without its wrappers)
/// is one and its layers sit at `prefix` (`net.`, or the root): an `nn.Sequential` there (or a
/// subclass of one: a class of the model's own whose children are `0`, `1`, ...), or a model of
/// its own class of named modules (see [`named_flags`]; `order` is `--order`). `Ok(None)` for a state dict, a model of
/// another container, or one without a layer. In a Sequential, a module nibble does not
/// compute (a class of the model's own code without a 2-D weight, an `nn.Softmax`, a
/// `BatchNorm1d(track_running_stats=False)`), or an activation after the last layer that
/// changes the logits, is an error naming its path and class; see [`named_flags`] for a model
/// of named modules.
pub(crate) fn pickled_flags(
    file: &Checkpoint,
    prefix: &str,
    path: &Path,
    order: Option<&[String]>,
) -> Result<Option<PickledFlags>> {
    let Some(text) = file.metadata().get(PICKLED_MODULES_KEY) else {
        return Ok(None);
    };
    let list: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        bad_model(
            path,
            format!("the pickled model's module list is unreadable: {e}"),
        )
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
    let Some(root) = modules.iter().find(|m| m.path == container) else {
        return Ok(None);
    };
    let reader = Reader { file, prefix, path };
    // A subclass of nn.Sequential (its children `0`, `1`, ...) runs as the Sequential its
    // state dict's indices say.
    let mut children = modules
        .iter()
        .filter(|m| parent_of(m.path) == Some(container))
        .peekable();
    let indexed = children.peek().is_some()
        && children.all(|m| {
            let name = m.path.rsplit('.').next().unwrap_or(m.path);
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
        });
    match root.torch_class() {
        Some("Sequential") => sequential_flags(&reader, &modules, container),
        None if indexed => sequential_flags(&reader, &modules, container),
        None => named_flags(&reader, &modules, container, order),
        _ => Ok(None),
    }
}

/// An error naming the model file.
fn bad_model(path: &Path, what: String) -> Error {
    Error::Usage {
        arg: "--model",
        what: format!("{}: {what}", path.display()),
    }
}

/// What the flags need to classify the pickled modules: the file, its layers' prefix, its path.
struct Reader<'a> {
    file: &'a Checkpoint,
    prefix: &'a str,
    path: &'a Path,
}

/// What one module of the pickle is to the chain of layers.
enum Step {
    /// A layer with tensors in the file (a Linear, a norm with parameters, a BatchNorm1d, a
    /// PReLU, a module of the model's own class with a 2-D weight).
    Layer,
    /// A parameter-free step, as `--activation` writes it.
    Free(String),
    /// A module nibble does not compute.
    Unknown,
}

/// The norms' epsilons and each module of a 1-D weight's kind, gathered as the modules are
/// classified.
#[derive(Default)]
struct Gathered {
    eps: PickledFlags,
    norms: Vec<String>,
}

impl Reader<'_> {
    /// What module `m` (at `relative`, under the prefix) is; its epsilon and norm kind go
    /// into `gathered`. A `BatchNorm1d(track_running_stats=False)` is an error naming it.
    fn classify(&self, relative: &str, m: &Module<'_>, gathered: &mut Gathered) -> Result<Step> {
        let path = self.path;
        let weight_dims = self
            .file
            .info(&format!("{}{relative}.weight", self.prefix))
            .map(|(_, shape)| shape.len());
        let eps = &mut gathered.eps;
        let norms = &mut gathered.norms;
        let free = |step: Option<String>| Ok(step.map_or(Step::Layer, Step::Free));
        match m.torch_class().unwrap_or("") {
            "Linear" => Ok(Step::Layer),
            "BatchNorm1d" => {
                if m.bool("track_running_stats") == Some(false) {
                    return Err(bad_model(
                        path,
                        format!(
                            "module `{}` is a BatchNorm1d(track_running_stats=False), which \
                             normalizes each batch by its own statistics: nibble does not \
                             compute it",
                            m.path
                        ),
                    ));
                }
                if let Some(e) = m.float("eps") {
                    take_eps(&mut eps.batch_norm_eps, e, m, path)?;
                }
                Ok(Step::Layer)
            }
            "LayerNorm" => free(norm_step(
                m,
                &mut eps.layer_norm_eps,
                "layer",
                "layer_norm",
                norms,
                path,
            )?),
            "RMSNorm" => free(norm_step(
                m,
                &mut eps.rms_norm_eps,
                "rms",
                "rms_norm",
                norms,
                path,
            )?),
            "GroupNorm" => {
                let groups = m
                    .attrs
                    .get("num_groups")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        bad_model(path, format!("GroupNorm `{}` has no num_groups", m.path))
                    })?;
                let (with, without) = (format!("group:{groups}"), format!("group_norm:{groups}"));
                free(norm_step(
                    m,
                    &mut eps.layer_norm_eps,
                    &with,
                    &without,
                    norms,
                    path,
                )?)
            }
            "PReLU" => {
                norms.push("prelu".into());
                Ok(Step::Layer)
            }
            // A module of the model's own class with a 2-D weight (a subclass of nn.Linear):
            // a Linear, as a state dict reads it.
            _ if weight_dims == Some(2) => Ok(Step::Layer),
            _ => Ok(activation_of(m).map_or(Step::Unknown, Step::Free)),
        }
    }
}

/// The module list's entry of a module nibble does not compute, for errors: its path and
/// class, and the setting that differs from the one nibble computes where it names one.
fn not_computed(m: &Module<'_>, place: &str) -> String {
    match unsupported_setting(m) {
        Some(setting) => format!(
            "module `{}` is a {} with {setting} ({place}): nibble computes it only with \
             PyTorch's default {}",
            m.path,
            m.class,
            if setting.contains(", ") {
                "settings"
            } else {
                "setting"
            }
        ),
        None => format!(
            "module `{}` is a {} ({place}), which nibble does not compute",
            m.path, m.class
        ),
    }
}

/// The settings of an activation nibble computes only with PyTorch's defaults, where `m` has
/// others (`Softplus(beta=2)`: `beta=2`); `None` for any other module.
fn unsupported_setting(m: &Module<'_>) -> Option<String> {
    let defaults: &[(&str, f64)] = match m.torch_class()? {
        "Softplus" => &[("beta", 1.0), ("threshold", 20.0)],
        "Hardtanh" => &[("min_val", -1.0), ("max_val", 1.0)],
        "GELU" => {
            return m
                .attrs
                .get("approximate")
                .and_then(Value::as_str)
                .filter(|a| !matches!(*a, "none" | "tanh"))
                .map(|a| format!("approximate={a:?}"));
        }
        _ => return None,
    };
    let differ: Vec<String> = defaults
        .iter()
        .filter_map(|&(name, default)| {
            m.float(name)
                .filter(|v| *v != default)
                .map(|v| format!("{name}={v}"))
        })
        .collect();
    (!differ.is_empty()).then(|| differ.join(", "))
}

/// The flags of a whole pickled model's `nn.Sequential` at `container`.
fn sequential_flags(
    reader: &Reader<'_>,
    modules: &[Module<'_>],
    container: &str,
) -> Result<Option<PickledFlags>> {
    // The layers in the order the Sequential runs them: its children, a nested nn.Sequential's
    // own in its place (as a state dict's keys `0.0.weight`, `1.weight` chain them).
    let leaves = leaves(modules, container, Expand::Sequentials);

    let mut gathered = Gathered::default();
    // What each gap holds, in order (the first entry what comes before the first layer).
    let mut gaps: Vec<Vec<String>> = vec![Vec::new()];
    let mut layers = 0usize;
    for Leaf {
        relative,
        module: m,
        ..
    } in &leaves
    {
        match reader.classify(relative, m, &mut gathered)? {
            Step::Free(a) => gaps.last_mut().expect("one gap at least").push(a),
            Step::Layer => {
                layers += 1;
                gaps.push(Vec::new());
            }
            Step::Unknown => {
                return Err(bad_model(
                    reader.path,
                    not_computed(m, "of the pickled model's nn.Sequential"),
                ))
            }
        }
    }
    if layers == 0 {
        return Ok(None);
    }
    // After the last layer: nothing nibble could run there may change the logits.
    let trailing = gaps.pop().unwrap_or_default();
    if let Some(a) = trailing.iter().find(|a| *a != "identity") {
        return Err(bad_model(
            reader.path,
            format!(
                "the pickled model's nn.Sequential ends with `{a}` after its last layer, which \
                 nibble does not run (its logits are the last layer's output)"
            ),
        ));
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
        norm: (!gathered.norms.is_empty()).then(|| gathered.norms.join(",")),
        ..gathered.eps
    }))
}

/// The flags of a whole pickled model of its own class at `container`, whose `forward` (not in
/// the pickle) runs its named modules. Its layers run in the order the pickle registers them,
/// as the state dict keeps them (the chain `eval` runs without `--order`); every boundary
/// between two is a gap. What the pickle says for certain is taken:
/// - each module of a 1-D weight's kind and each norm's epsilon;
/// - a gap's parameter-free modules registered between its two layers (`self.fc1`,
///   `self.act = nn.Tanh()`, `self.fc2`; the GELU inside `self.features = nn.Sequential(...)`);
/// - an empty gap between two layers of one nn.Sequential: nothing runs there.
///
/// A gap with nothing registered between its layers (or only a Dropout or Identity, which may
/// sit beside a functional activation) is PyTorch's usual order guessed: nothing before a norm
/// or a PReLU (`fc → bn → act`), after a PReLU, or after a norm in front of every Linear (an
/// input norm); anywhere else the one activation module registered before the first layer or
/// after the last (`self.act`, called after each hidden layer) where no gap has one of its
/// own, else relu, `--activation`'s default. Other parameter-free modules before the first
/// layer or after the last (a final Softmax) are not run, and [`PickledFlags::unread`] names
/// them. One that nibble does
/// not compute between two layers is an error naming it. Where the layers read here are not
/// the state dict's modules (a loss module with a weight, an embedding), only the epsilons are
/// taken.
fn named_flags(
    reader: &Reader<'_>,
    modules: &[Module<'_>],
    container: &str,
    order: Option<&[String]>,
) -> Result<Option<PickledFlags>> {
    let leaves = leaves(modules, container, Expand::Containers);
    let mut gathered = Gathered::default();
    let mut layers: Vec<RegisteredLayer<'_>> = Vec::new();
    let mut unread = Vec::new();
    let mut losses = Vec::new();
    for leaf in &leaves {
        if is_loss(leaf.module) {
            // A loss the model keeps (`self.criterion = nn.CrossEntropyLoss(weight=w)`): not a
            // step of its forward; its tensors, if any, are no layer's (its class weights ran
            // as a LayerNorm after the head).
            losses.push(leaf.relative.clone());
            continue;
        }
        match reader.classify(&leaf.relative, leaf.module, &mut gathered)? {
            Step::Layer => layers.push(RegisteredLayer {
                path: &leaf.relative,
                sequential: leaf.sequential,
                kind: LayerKind::of(leaf.module),
                after: Vec::new(),
            }),
            step => match layers.last_mut() {
                Some(layer) => layer.after.push((step, leaf.module)),
                None => unread.push((step, leaf.module)),
            },
        }
    }
    // What was registered after the last layer is not read either.
    if let Some(last) = layers.last_mut() {
        unread.append(&mut last.after);
    }
    let file_modules: Option<Vec<String>> = ModuleLayout::read(reader.file, reader.prefix)
        .ok()
        .map(|l| {
            l.modules
                .into_iter()
                .map(|m| m.path)
                .filter(|p| !losses.contains(p))
                .collect()
        });
    // The losses whose tensors the file holds: the model is read without them.
    let dropped: Vec<String> = losses
        .into_iter()
        .filter(|l| {
            let under = format!("{}{l}.", reader.prefix);
            reader.file.keys().any(|k| k.starts_with(&under))
        })
        .collect();
    let aligned = file_modules.is_some_and(|paths| {
        paths
            .iter()
            .map(String::as_str)
            .eq(layers.iter().map(|l| l.path))
    });
    let reordered = order.is_some_and(|o| {
        o.iter()
            .map(String::as_str)
            .ne(layers.iter().map(|l| l.path))
    });
    if layers.is_empty() {
        return Ok(None);
    }
    if !aligned || reordered {
        // Another order than the registration's, or layers the state dict does not have as
        // such: the registered neighbours say nothing of its gaps, nor the norms' kinds in
        // their order.
        return Ok(Some(PickledFlags {
            activation: None,
            norm: None,
            unread: unread.iter().map(|(_, m)| m.path.to_string()).collect(),
            dropped,
            ..gathered.eps
        }));
    }
    // One activation module registered outside the layers (`self.act = nn.GELU()` first or
    // last, called after each hidden layer): where no gap has one of its own, it is the one
    // the forward applies, in place of relu's guess.
    let mut outside: Vec<&str> = unread
        .iter()
        .filter_map(|(step, _)| match step {
            // (A sigmoid registered last is as often the output's, `sig(fc2(x))`.)
            Step::Free(a) if !matches!(a.as_str(), "identity" | "sigmoid" | "logsigmoid") => {
                Some(a.as_str())
            }
            _ => None,
        })
        .collect();
    outside.sort_unstable();
    outside.dedup();
    let registered_in_gaps = layers.iter().any(|l| {
        l.after
            .iter()
            .any(|(step, _)| matches!(step, Step::Free(a) if a != "identity"))
    });
    let shared = match outside.as_slice() {
        [one] if !registered_in_gaps => Some(one.to_string()),
        _ => None,
    };
    let mut entries = Vec::new();
    for (at, pair) in layers.windows(2).enumerate() {
        let [layer, next] = pair else {
            continue;
        };
        let mut steps = Vec::new();
        for (step, m) in &layer.after {
            match step {
                Step::Free(a) if a != "identity" => steps.push(a.clone()),
                Step::Free(_) | Step::Layer => {}
                Step::Unknown => {
                    return Err(bad_model(
                        reader.path,
                        not_computed(m, "registered between two layers of the pickled model"),
                    ))
                }
            }
        }
        let nothing = (layer.sequential.is_some() && layer.sequential == next.sequential)
            || next.kind != LayerKind::Linear
            || layer.kind == LayerKind::PRelu
            || (at == 0 && layer.kind == LayerKind::Norm);
        entries.push(if !steps.is_empty() {
            steps.join("+")
        } else if nothing {
            "identity".to_string()
        } else {
            shared.clone().unwrap_or_else(|| "relu".to_string())
        });
    }
    let used = shared.is_some() && entries.iter().any(|e| Some(e) == shared.as_ref());
    let unread = unread
        .iter()
        .filter(|(step, _)| !(used && matches!(step, Step::Free(a) if Some(a) == shared.as_ref())))
        .map(|(_, m)| m.path.to_string())
        .collect();
    Ok(Some(PickledFlags {
        activation: (!entries.is_empty()).then(|| entries.join(",")),
        norm: (!gathered.norms.is_empty()).then(|| gathered.norms.join(",")),
        unread,
        dropped,
        ..gathered.eps
    }))
}

/// What a layer of a model of named modules is, for guessing an empty gap beside it.
#[derive(Clone, Copy, PartialEq)]
enum LayerKind {
    /// A Linear (or a module of the model's own class with a 2-D weight).
    Linear,
    /// A LayerNorm, RMSNorm, GroupNorm or BatchNorm1d.
    Norm,
    /// A PReLU (itself the activation).
    PRelu,
}

impl LayerKind {
    fn of(m: &Module<'_>) -> Self {
        match m.torch_class() {
            Some("LayerNorm" | "RMSNorm" | "GroupNorm" | "BatchNorm1d") => LayerKind::Norm,
            Some("PReLU") => LayerKind::PRelu,
            _ => LayerKind::Linear,
        }
    }
}

/// A layer of a model of named modules: its path, the nn.Sequential it is a child of (if it
/// is one's), its kind, and what was registered after it up to the next layer.
struct RegisteredLayer<'m> {
    path: &'m str,
    sequential: Option<&'m str>,
    kind: LayerKind,
    after: Vec<(Step, &'m Module<'m>)>,
}

/// A module that runs, as [`leaves`] lists them.
struct Leaf<'m> {
    /// Its path relative to the container's.
    relative: String,
    module: &'m Module<'m>,
    /// The path of the nn.Sequential it is a child of, if it is one's.
    sequential: Option<&'m str>,
}

/// Which child modules [`leaves`] lists in their place by their own children.
#[derive(Clone, Copy, PartialEq)]
enum Expand {
    /// nn.Sequentials (the chain of a Sequential: a nested one runs in its place).
    Sequentials,
    /// Any module with children (a model of named modules: its own classes, Sequentials and
    /// ModuleLists, in the order the pickle registers them).
    Containers,
}

/// Deepest nesting of containers [`leaves`] expands.
const MAX_NESTING: usize = 16;

/// The leaf modules under `container`, in registration order (which `modules` keeps): each
/// child, or the children of a child that `expand` names in its place, with its path relative
/// to `container`. One pass over the modules to index them by parent, then one visit each.
fn leaves<'m>(modules: &'m [Module<'m>], container: &'m str, expand: Expand) -> Vec<Leaf<'m>> {
    let mut children: HashMap<&str, Vec<&'m Module<'m>>> = HashMap::new();
    for m in modules {
        if let Some(parent) = parent_of(m.path) {
            children.entry(parent).or_default().push(m);
        }
    }
    let mut out = Vec::new();
    // (container's path, its relative path, its Sequential-ness, depth), depth first.
    fn visit<'m>(
        children: &HashMap<&str, Vec<&'m Module<'m>>>,
        path: &'m str,
        relative: &str,
        sequential: Option<&'m str>,
        depth: usize,
        expand: Expand,
        out: &mut Vec<Leaf<'m>>,
    ) {
        for &m in children.get(path).map(Vec::as_slice).unwrap_or_default() {
            let name = m.path.rsplit('.').next().unwrap_or(m.path);
            let rel = if relative.is_empty() {
                name.to_string()
            } else {
                format!("{relative}.{name}")
            };
            let is_sequential = m.torch_class() == Some("Sequential");
            let expands = match expand {
                Expand::Sequentials => is_sequential,
                Expand::Containers => children.contains_key(m.path),
            };
            if expands && depth < MAX_NESTING {
                let own = is_sequential.then_some(m.path);
                visit(children, m.path, &rel, own, depth + 1, expand, out);
            } else {
                out.push(Leaf {
                    relative: rel,
                    module: m,
                    sequential,
                });
            }
        }
    }
    let top = modules
        .iter()
        .find(|m| m.path == container)
        .filter(|m| m.torch_class() == Some("Sequential"))
        .map(|m| m.path);
    visit(&children, container, "", top, 0, expand, &mut out);
    out
}

/// The path of the module that holds `path` (`net` of `net.fc1`, the root `` of `fc1`); `None`
/// for the root itself.
fn parent_of(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    Some(path.rsplit_once('.').map_or("", |(parent, _)| parent))
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
        // ReLU6 is this Hardtanh (its subclass in PyTorch).
        "Hardtanh" if coef("min_val", -1.0) == 0.0 && coef("max_val", 1.0) == 6.0 => "relu6".into(),
        "Hardsigmoid" => "hardsigmoid".into(),
        "Softsign" => "softsign".into(),
        "LogSigmoid" => "logsigmoid".into(),
        "Tanhshrink" => "tanhshrink".into(),
        // Every dropout is the identity in eval mode.
        "Identity"
        | "Dropout"
        | "Dropout1d"
        | "Dropout2d"
        | "Dropout3d"
        | "AlphaDropout"
        | "FeatureAlphaDropout"
        | "Flatten" => "identity".into(),
        _ => return None,
    })
}
