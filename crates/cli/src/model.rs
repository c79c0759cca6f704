//! The classifier the verbs work on: a [`nibble_nn::Sequential`] read from a PyTorch
//! `nn.Sequential` state dict (`{i}.weight` / `{i}.bias`: a 2-D weight is a Linear, a 1-D one a
//! LayerNorm, a gap in the indices an activation; under a module path such as `net.` when every
//! key has the same one), every Linear in one weight format, with the
//! activations given on the command line: one for every gap, or one per gap in index order,
//! each an activation or several joined by `+` (`layer_norm+relu`).

use crate::error::{Error, Result};
use nibble_autograd::{Param, Tape, Var};
use nibble_io::{Checkpoint, DType, WeightFormat, PICKLED_MODULES_KEY};
use nibble_nn::layout::{ModuleLayout, MODULE_ORDER_KEY};
use nibble_nn::{cross_entropy, Activation, Layer, NormKind, Sequential, SequentialOptions};
use nibble_tensor::Tensor;
use std::path::Path;
use std::str::FromStr;

/// Parses `--activation`: what one gap holds, or a comma-separated list with one per gap; a
/// gap's entry is one of [`Activation::NAMES`] (any case) or several joined by `+`, applied in
/// order (`layer_norm+relu` for `nn.LayerNorm(dim, elementwise_affine=False), nn.ReLU()`).
pub fn parse_activations(s: &str) -> Result<Vec<Vec<Activation>>> {
    s.split(',')
        .map(|gap| {
            gap.split('+')
                .map(|a| {
                    Activation::from_str(a).map_err(|e| Error::Usage {
                        arg: "--activation",
                        what: format!(
                            "{}{e}; several in one gap are joined by `+`, and a comma-separated \
                             list gives one per gap",
                            if gap.contains('+') {
                                format!("in `{}`: ", gap.trim())
                            } else {
                                String::new()
                            },
                        ),
                    })
                })
                .collect()
        })
        .collect()
}

/// Parses `--norm`: what every module of a 1-D weight (not a BatchNorm) is, `layer`
/// (`nn.LayerNorm`), `rms` (`nn.RMSNorm`), `group:G` (`nn.GroupNorm(G, dim)`) or `prelu`
/// (`nn.PReLU(n)`, whose slopes a state dict stores alike), any case, or a comma-separated list
/// with one per such module in index order.
pub fn parse_norms(s: &str) -> Result<Vec<NormKind>> {
    let usage = |what: String| Error::Usage {
        arg: "--norm",
        what,
    };
    s.split(',')
        .map(|k| {
            let k = k.trim().to_ascii_lowercase();
            if let Some(groups) = k
                .strip_prefix("group:")
                .or_else(|| k.strip_prefix("group_norm:"))
            {
                return match groups.trim().parse::<usize>() {
                    Ok(g) if g > 0 => Ok(NormKind::Group(g)),
                    _ => Err(usage(format!(
                        "`{k}`: the group count of a GroupNorm must be a whole number from 1 \
                         (group:4 for nn.GroupNorm(4, dim))"
                    ))),
                };
            }
            match k.as_str() {
                "layer" | "layer_norm" => Ok(NormKind::Layer),
                "rms" | "rms_norm" => Ok(NormKind::Rms),
                "prelu" => Ok(NormKind::PRelu),
                "group" | "group_norm" => Err(usage(format!(
                    "`{k}` needs its group count: group:4 for nn.GroupNorm(4, dim)"
                ))),
                _ => Err(usage(format!(
                    "`{k}`: expected layer (nn.LayerNorm), rms (nn.RMSNorm), group:G \
                     (nn.GroupNorm(G, dim)) or prelu (nn.PReLU), or a comma-separated list \
                     with one per module of a 1-D weight"
                ))),
            }
        })
        .collect()
}

/// What a state dict cannot say about a Sequential, as the command line gives it: the layers
/// in each gap (`--activation`), the kind of each module of a 1-D weight (`--norm`) and the
/// norms' epsilons.
#[derive(Debug, Clone)]
pub struct Structure {
    /// One list for every gap, or one per gap (with one more in front for what comes before
    /// the first layer).
    pub gaps: Vec<Vec<Activation>>,
    /// Whether `--activation` was given (else `gaps` is its default, relu). Only a given one
    /// runs before the first layer of a model with no gap between its layers.
    pub gaps_given: bool,
    /// One kind for every module of a 1-D weight, or one per such module; `None` (no `--norm`):
    /// LayerNorms, and [`Classifier::notes`] names the modules so read.
    pub norms: Option<Vec<NormKind>>,
    /// `--layer-norm-eps`; `None`: a whole pickled model's own, else PyTorch's default.
    pub layer_norm_eps: Option<f32>,
    /// `--batch-norm-eps`; `None`: a whole pickled model's own, else PyTorch's default.
    pub batch_norm_eps: Option<f32>,
    /// `--rms-norm-eps`; `None`: a whole pickled model's own, else PyTorch's default.
    pub rms_norm_eps: Option<f32>,
    /// `--order`: the named modules' paths in the order they run.
    pub order: Option<Vec<String>>,
    /// What a whole pickled model holds that nibble does not run, for [`Classifier::notes`]
    /// (its modules' paths).
    pub unread: Vec<String>,
    /// Modules of a whole pickled model whose tensors are no layer's (a loss's class weights),
    /// left out of the model (their paths under the prefix).
    pub dropped: Vec<String>,
    /// The epsilons given on the command line that replace a whole pickled model's own, for
    /// [`Classifier::notes`] (`--layer-norm-eps 0.001 replaces the file's 1e-5`).
    pub replaced_eps: Vec<String>,
}

impl Structure {
    /// Parses `--activation` ([`parse_activations`]; `None`: relu) and `--norm`
    /// ([`parse_norms`]) beside the epsilons (each positive and finite, or an error naming its
    /// flag), and `--order` (comma-separated module paths).
    pub fn parse(
        activation: Option<&str>,
        norm: Option<&str>,
        layer_norm_eps: Option<f32>,
        batch_norm_eps: Option<f32>,
        rms_norm_eps: Option<f32>,
        order: Option<&str>,
    ) -> Result<Self> {
        for (arg, eps) in [
            ("--layer-norm-eps", layer_norm_eps),
            ("--batch-norm-eps", batch_norm_eps),
            ("--rms-norm-eps", rms_norm_eps),
        ] {
            let Some(eps) = eps else { continue };
            if !(eps.is_finite() && eps > 0.0) {
                return Err(Error::Usage {
                    arg,
                    what: format!("must be a positive number within f32's range, found {eps}"),
                });
            }
        }
        let order = order.map(|o| o.split(',').map(|p| p.trim().to_string()).collect());
        Ok(Structure {
            gaps: parse_activations(activation.unwrap_or("relu"))?,
            gaps_given: activation.is_some(),
            norms: norm.map(parse_norms).transpose()?,
            layer_norm_eps,
            batch_norm_eps,
            rms_norm_eps,
            order,
            unread: Vec::new(),
            dropped: Vec::new(),
            replaced_eps: Vec::new(),
        })
    }
}

/// `file` read as the model inside the wrappers it was saved from: DataParallel's `module.`
/// and `torch.compile`'s `_orig_mod.` (in any nesting) taken off every key where every key
/// starts with one and keeps a module path after it. Its layers are then named as PEFT names
/// them on the unwrapped model (`0`, `fc1`), so adapters fit in both directions.
pub(crate) fn without_wrappers(mut file: Checkpoint) -> Checkpoint {
    'strip: loop {
        for wrapper in ["module.", "_orig_mod."] {
            // (An empty file has no wrapper: `all` of no keys would strip forever.)
            let nested = file.keys().next().is_some()
                && file.keys().all(|k| {
                    k.strip_prefix(wrapper)
                        .is_some_and(|rest| rest.contains('.'))
                });
            if nested {
                match file.without_prefix(wrapper) {
                    Ok(inner) => {
                        // The module order nibble recorded names the wrapped paths too.
                        let order = inner.metadata().get(MODULE_ORDER_KEY).map(|text| {
                            match serde_json::from_str::<Vec<String>>(text) {
                                Ok(paths) => serde_json::Value::from(
                                    paths
                                        .iter()
                                        .map(|p| p.strip_prefix(wrapper).unwrap_or(p))
                                        .collect::<Vec<_>>(),
                                )
                                .to_string(),
                                Err(_) => text.clone(),
                            }
                        });
                        let modules = inner
                            .metadata()
                            .get(PICKLED_MODULES_KEY)
                            .map(|text| pickled_modules_inside(text, wrapper));
                        file = inner
                            .with_metadata(MODULE_ORDER_KEY, order)
                            .with_metadata(PICKLED_MODULES_KEY, modules);
                        continue 'strip;
                    }
                    Err(unchanged) => file = unchanged,
                }
            }
        }
        return file;
    }
}

/// A whole pickled model's module list ([`PICKLED_MODULES_KEY`], JSON) as seen inside
/// `wrapper` (`module.`): the modules under it, their paths without it (the wrapped module's
/// own path becomes the root, ``), the wrapper's own entry and any other gone. Text that is
/// no such list is kept as it is (the reader reports it).
fn pickled_modules_inside(text: &str, wrapper: &str) -> String {
    let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(text) else {
        return text.to_string();
    };
    let inner = wrapper.trim_end_matches('.');
    let kept: Vec<serde_json::Value> = list
        .into_iter()
        .filter_map(|mut m| {
            let path = m.get("path")?.as_str()?;
            let path = if path == inner {
                String::new()
            } else {
                path.strip_prefix(wrapper)?.to_string()
            };
            m["path"] = path.into();
            Some(m)
        })
        .collect();
    serde_json::Value::Array(kept).to_string()
}

/// The module path in front of the Sequential's indices when every key has the same one (`net.`
/// for `net.0.weight`, `net.2.bias`, ...: a model that holds its `nn.Sequential` as an
/// attribute; `module.` for one saved from `nn.DataParallel`), else empty.
pub(crate) fn sequential_prefix(file: &Checkpoint) -> String {
    let prefix_of = |key: &str| -> Option<String> {
        let parts: Vec<&str> = key.split('.').collect();
        let at = parts
            .iter()
            .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?;
        Some(parts[..at].iter().map(|p| format!("{p}.")).collect())
    };
    let mut keys = file.keys();
    let Some(first) = keys.next().and_then(prefix_of) else {
        return String::new();
    };
    if keys.all(|k| prefix_of(k).as_ref() == Some(&first)) {
        first
    } else {
        String::new()
    }
}

/// Whether `layout` (under `prefix`) is a BigNet's: modules `model.<i>.model.<j>`, its residual
/// blocks, which are no chain of layers.
pub(crate) fn is_bignet(layout: &ModuleLayout, prefix: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    layout.named
        && layout.modules.iter().any(|m| {
            let full = format!("{prefix}{}", m.path);
            let parts: Vec<&str> = full.split('.').collect();
            parts
                .windows(4)
                .any(|w| w[0] == "model" && number(w[1]) && w[2] == "model" && number(w[3]))
        })
}

/// A Sequential classifier with its input width and number of classes.
#[derive(Debug, Clone)]
pub struct Classifier {
    model: Sequential,
    features: usize,
    classes: usize,
    /// The layers as run, for a model of named modules, after where their order comes from
    /// (see [`Classifier::notes`]).
    chain: Option<String>,
    /// The first two Linears at consecutive indices, if any (see [`Classifier::notes`]).
    adjacent: Option<(String, String)>,
    /// The modules of a 1-D weight read as LayerNorms because `--norm` was not given, as
    /// [`ModuleLayout::describe`] names them (see [`Classifier::notes`]).
    default_norms: Option<String>,
    /// What runs before the first layer of a model with no gap between its layers, where
    /// `--activation`'s one entry went (see [`Classifier::notes`]).
    before_first: Option<String>,
    /// Parameter-free modules of a whole pickled model that are not run (see
    /// [`Classifier::notes`]).
    unread: Vec<String>,
    /// The given epsilons that replace a whole pickled model's own (see [`Classifier::notes`]).
    replaced_eps: Vec<String>,
}

impl Classifier {
    /// Reads the Sequential in `path` with every Linear in `format` and what `structure`
    /// says of its gaps, its modules of a 1-D weight and its norms' epsilons.
    pub fn open(path: &Path, structure: &Structure, format: WeightFormat) -> Result<Self> {
        let file = without_wrappers(Checkpoint::open(path)?);
        let prefix = sequential_prefix(&file);
        // A whole pickled model says what its layers are (unless the flags say it).
        let pickled = crate::pickled::pickled_structure(&file, &prefix, structure, path)?;
        let structure = pickled.as_ref().unwrap_or(structure);
        let file = if structure.dropped.is_empty() {
            file
        } else {
            let under: Vec<String> = structure
                .dropped
                .iter()
                .map(|m| format!("{prefix}{m}."))
                .collect();
            file.without_keys(|k| under.iter().any(|u| k.starts_with(u.as_str())))
        };
        let layout = ModuleLayout::read_in_order(&file, &prefix, structure.order.as_deref())?;
        if is_bignet(&layout, &prefix) {
            return Err(Error::Usage {
                arg: "--model",
                what: format!(
                    "{} is a BigNet checkpoint (`model.0.model.0.weight`, ...: residual blocks, \
                     not a chain of layers); run it with the `bignet` program",
                    path.display()
                ),
            });
        }
        let gaps = layout.gaps();
        let mut options = SequentialOptions::new()
            .format(format)
            .prefix(prefix.clone());
        if let Some(eps) = structure.layer_norm_eps {
            options = options.layer_norm_eps(eps);
        }
        if let Some(eps) = structure.batch_norm_eps {
            options = options.batch_norm_eps(eps);
        }
        if let Some(eps) = structure.rms_norm_eps {
            options = options.rms_norm_eps(eps);
        }
        if let Some(order) = &structure.order {
            options = options.module_order(order.clone());
        }
        // nibble's f16 files (`quantize --format f16`, `nibble.format` f16) run as `--format
        // f16` runs them where no other format is asked: their f16 weights stay f16 (read as
        // f32 they were reported as f32 models of twice the bytes, on the f32 kernels).
        if format == WeightFormat::F32
            && WeightFormat::declared_by(&file)? == Some(WeightFormat::F16)
        {
            for m in &layout.modules {
                let key = format!("{prefix}{}.weight", m.path);
                if matches!(file.info(&key), Some((DType::F16, shape)) if shape.len() == 2) {
                    options = options.format_at(m.index, WeightFormat::F16);
                }
            }
        }
        let norms = layout.norm_indices(&file, &prefix);
        let default_norms = (structure.norms.is_none() && !norms.is_empty())
            .then(|| layout.describe(&norms, false));
        match structure.norms.as_deref().unwrap_or(&[NormKind::Layer]) {
            [one] => options = options.norm(*one),
            list if list.len() == norms.len() => {
                for (index, kind) in norms.iter().zip(list) {
                    options = options.norm_at(*index, *kind);
                }
            }
            list => {
                return Err(Error::Usage {
                    arg: "--norm",
                    what: format!(
                        "{} kinds given for the {} modules of a 1-D weight of {} ({}): give one \
                         for all or one per module",
                        list.len(),
                        norms.len(),
                        path.display(),
                        layout.describe(&norms, false)
                    ),
                })
            }
        }
        let activations = structure.gaps.as_slice();
        // A list one longer than the gaps between layers names, first, what comes before the
        // first layer (when the indices do not start at 0).
        let leading = layout.leading_gap();
        let mut before_first = None;
        if structure.gaps_given && gaps.is_empty() && !leading && layout.modules.len() > 1 {
            // It was ignored without a word: a model of Linears at consecutive indices (an
            // nn.ModuleList run in a loop) ran them back to back whatever --activation said.
            return Err(Error::Usage {
                arg: "--activation",
                what: format!(
                    "{} has no gap between its layers ({}: consecutive indices, run back to back \
                     as an nn.Sequential runs them), so --activation has nowhere to go; an \
                     nn.ModuleList applied in a loop with an activation between its layers is \
                     not a chain its state dict shows",
                    path.display(),
                    layout
                        .modules
                        .iter()
                        .map(|m| format!("{prefix}{}", m.path))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        match activations {
            // No gap between the layers: a given entry is the one more the rule asks for, what
            // runs before the first layer (`nn.Sequential(nn.ReLU(), nn.Linear(..))`).
            [one] if gaps.is_empty() && leading && structure.gaps_given => {
                options = options.gap_layers_at(0, one.clone());
                before_first = Some(
                    one.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join("+"),
                );
            }
            [one] => options = options.gap_layers(one.clone()),
            list if list.len() == gaps.len() => {
                for (gap, a) in gaps.iter().zip(list) {
                    options = options.gap_layers_at(*gap, a.clone());
                }
            }
            [first, rest @ ..] if leading && rest.len() == gaps.len() => {
                options = options.gap_layers_at(0, first.clone());
                for (gap, a) in gaps.iter().zip(rest) {
                    options = options.gap_layers_at(*gap, a.clone());
                }
            }
            list => {
                return Err(Error::Usage {
                    arg: "--activation",
                    what: format!(
                        "{} activations given for the {} gaps of {} ({}): give one for all gaps \
                         or one per gap{}",
                        list.len(),
                        gaps.len(),
                        path.display(),
                        layout.describe(&gaps, true),
                        if leading {
                            ", with one more in front for what comes before the first layer"
                        } else {
                            ""
                        }
                    ),
                })
            }
        }
        let model = Sequential::from_state_dict(&file, &options)?;
        let features = model.in_features().unwrap_or(0);
        let classes = model
            .layers()
            .iter()
            .rev()
            .find_map(|l| match l {
                Layer::Linear(l) => Some(l.dims().0),
                Layer::LayerNorm(n) => Some(n.dim()),
                Layer::BatchNorm(n) => Some(n.dim()),
                // A PReLU keeps the width; one slope for all says nothing of it.
                Layer::PRelu(p) => Some(p.slopes()).filter(|&n| n > 1),
                Layer::Activation(_) => None,
            })
            .unwrap_or(0);
        if classes == 0 {
            // Said of the model, not of the data (its labels were then "not in 0..0"). A model
            // of 0 input features is one (its logits are its biases), and the data says so.
            return Err(Error::Usage {
                arg: "--model",
                what: format!(
                    "{}: the model gives 0 outputs: a classifier has at least one logit",
                    path.display()
                ),
            });
        }
        let chain = layout.named.then(|| {
            model
                .layers()
                .iter()
                .filter_map(|l| match l {
                    Layer::Activation(Activation::Identity) => None,
                    Layer::Activation(a) => Some(a.to_string()),
                    Layer::Linear(l) => Some(l.name.clone()),
                    Layer::LayerNorm(n) => Some(n.name.clone()),
                    Layer::BatchNorm(n) => Some(n.name.clone()),
                    Layer::PRelu(p) => Some(p.name.clone()),
                })
                .collect::<Vec<_>>()
                .join(" → ")
        });
        let order_source = if structure.order.is_some() {
            "--order gives"
        } else {
            "the file keeps them"
        };
        let chain = chain.map(|c| format!("in the order {order_source}: {c}"));
        // Two Linears at consecutive indices: an nn.Sequential runs nothing between them, but
        // an nn.ModuleList run in a loop (`layers.0`, `layers.1`, ...) may apply an activation
        // there that its state dict cannot show.
        let adjacent = if layout.named {
            None
        } else {
            model.layers().windows(2).find_map(|w| match w {
                [Layer::Linear(a), Layer::Linear(b)] => Some((a.name.clone(), b.name.clone())),
                _ => None,
            })
        };
        Ok(Classifier {
            model,
            features,
            classes,
            chain,
            adjacent,
            default_norms,
            before_first,
            unread: structure.unread.clone(),
            replaced_eps: structure.replaced_eps.clone(),
        })
    }

    /// What the state dict cannot say and `nibble` assumed, to show the user: for a model of
    /// named modules (not an `nn.Sequential`), the chain it runs; for Linears at consecutive
    /// indices, that nothing runs between them; without `--norm`, which modules of a 1-D
    /// weight were read as LayerNorms; where `--activation`'s one entry runs before the first
    /// layer.
    pub fn notes(&self, path: &Path) -> Vec<String> {
        let chain = self.chain.as_ref().map(|chain| {
            format!(
                "{} holds named modules, run as one chain {chain} (a model whose forward differs, with residual connections, branches or \
                 another order, computes something else)",
                path.display()
            )
        });
        let adjacent = self.adjacent.as_ref().map(|(a, b)| {
            format!(
                "in {}, the Linears `{a}` and `{b}` are at consecutive indices, so nothing runs \
                 between them (as in an nn.Sequential); a model that applies an activation there \
                 (an nn.ModuleList run in a loop) computes something else",
                path.display()
            )
        });
        let norms = self.default_norms.as_ref().map(|modules| {
            format!(
                "in {}, the modules of a 1-D weight {modules} are read as LayerNorms (--norm's \
                 default): a state dict cannot tell a LayerNorm from a GroupNorm, an RMSNorm, \
                 a PReLU or a BatchNorm1d(track_running_stats=False) (which nibble does not \
                 read); --norm says what they are",
                path.display()
            )
        });
        let before_first = self.before_first.as_ref().map(|a| {
            format!(
                "{} has no gap between its layers but parameter-free ones in front of the \
                 first (its indices start above 0): --activation's {a} runs there, on the input",
                path.display()
            )
        });
        let unread = (!self.unread.is_empty()).then(|| {
            format!(
                "{}: the pickled model's {} {} registered before its first layer or after its \
                 last, and not run (its forward may apply {} anywhere: --activation says where)",
                path.display(),
                backticked(&self.unread),
                if self.unread.len() == 1 { "is" } else { "are" },
                if self.unread.len() == 1 { "it" } else { "them" }
            )
        });
        let replaced = self
            .replaced_eps
            .iter()
            .map(|r| format!("in {}, {r}", path.display()));
        chain
            .into_iter()
            .chain(adjacent)
            .chain(norms)
            .chain(before_first)
            .chain(unread)
            .chain(replaced)
            .collect()
    }

    /// Input width.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Number of classes (the last layer's width).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// An error naming `arg` where `rows` rows through the model cannot fit in this machine's
    /// memory: an inference holds the input and about three buffers of the widest layer, a
    /// training pass (`training`) every layer's input and output with their gradients. A file
    /// whose layers are wide but empty (`[2^40, 0]`, no bytes on disk) fails here, not in an
    /// allocation that aborts the process.
    pub fn check_rows_fit(&self, arg: &'static str, rows: usize, training: bool) -> Result<()> {
        let shapes: Vec<(usize, usize)> = self.model.linears().map(|l| l.dims()).collect();
        let widest = shapes
            .iter()
            .flat_map(|&(o, i)| [o, i])
            .chain([self.features, self.classes])
            .max()
            .unwrap_or(0) as u128;
        let per_row = if training {
            3 * shapes
                .iter()
                .map(|&(o, i)| o as u128 + i as u128)
                .sum::<u128>()
                + 4 * widest
        } else {
            self.features as u128 + 3 * widest
        };
        let bytes = 4 * rows as u128 * per_row;
        nibble_tensor::machine::fits(bytes).map_err(|(need, total)| Error::Usage {
            arg,
            what: format!(
                "{} {rows} row{} through layers up to {widest} wide needs {need:.1} GiB; this \
                 machine has {total:.1} GiB",
                if training {
                    "training on"
                } else {
                    "a forward of"
                },
                if rows == 1 { "" } else { "s" }
            ),
        })
    }

    /// Whether the model has a Linear layer (the only layers the weight formats store).
    pub fn has_linear(&self) -> bool {
        self.model.linears().next().is_some()
    }

    /// Each Linear's name and `(out, in)`, in order.
    pub fn linear_shapes(&self) -> Vec<(String, (usize, usize))> {
        self.model
            .linears()
            .map(|l| (l.name.clone(), l.dims()))
            .collect()
    }

    /// The storage format of the Linear weights as a file declares it (`nibble.format`): the
    /// first Linear's format other than f32, as `quantize --include` declares a file it
    /// quantized in part, or f32 where every Linear is f32 (or there is none).
    pub fn format(&self) -> WeightFormat {
        self.model
            .linears()
            .map(|l| l.format())
            .find(|&f| f != WeightFormat::F32)
            .unwrap_or(WeightFormat::F32)
    }

    /// The storage formats of the Linear weights, as a label: the one format, or where the
    /// Linears differ (a file that `quantize --include` quantized in part) each format in the
    /// order of the first Linear holding it, joined by `+` (`f32+nf4`).
    pub fn format_label(&self) -> String {
        let mut names: Vec<&'static str> = Vec::new();
        for l in self.model.linears() {
            let name = l.format().name();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if names.is_empty() {
            WeightFormat::F32.name().to_string()
        } else {
            names.join("+")
        }
    }

    /// Bytes of the model as stored (weights in their format, LoRA adapters included).
    pub fn bytes(&self) -> usize {
        self.model.model_bytes()
    }

    /// The logits `[rows, classes]` of `x` `[rows, features]`, row-major.
    pub fn logits(&self, x: &Tensor) -> Result<Vec<f32>> {
        Ok(self.model.infer(x)?.into_vec())
    }

    /// Puts a fresh rank-`rank` LoRA adapter on every Linear (A from `seed`, B zero) and
    /// freezes everything else.
    pub fn add_lora(&mut self, rank: usize, seed: u64) -> Result<()> {
        Ok(self.model.add_lora(rank, seed)?)
    }

    /// Makes the adapters DoRA ones ([`Sequential::enable_dora`]).
    pub fn enable_dora(&mut self) -> Result<()> {
        Ok(self.model.enable_dora()?)
    }

    /// The parameters that train.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.model.trainable_params()
    }

    /// The labels the data may hold: the classes, or 2 for a binary classifier (one logit).
    pub fn label_count(&self) -> usize {
        if self.classes == 1 {
            2
        } else {
            self.classes
        }
    }

    /// One training pass on a mini-batch: forward, mean softmax cross-entropy against `labels`
    /// (for a binary classifier's one logit, binary cross-entropy with logits against labels 0
    /// and 1, PyTorch's `BCEWithLogitsLoss`), backward (gradients accumulate into the trainable
    /// parameters); returns the loss.
    pub fn train_loss(&self, tape: &Tape, x: Tensor, labels: &[usize]) -> Result<f32> {
        let logits = self.model.forward(tape, &Var::constant(x))?;
        let loss = if self.classes == 1 {
            let targets: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
            tape.bce_with_logits(&logits, &Tensor::from_vec(&[labels.len()], targets)?)?
        } else {
            cross_entropy(tape, &logits, labels)?
        };
        let value = loss.value().item()?;
        drop(logits);
        tape.backward(&loss)?;
        Ok(value)
    }

    /// Loads a PEFT adapter directory onto the Linear layers (target modules named by index);
    /// a bad adapter is an error naming the file, key and shapes.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        Ok(self.model.load_adapter(dir)?)
    }

    /// Saves the Linear layers' adapters in PEFT's layout.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        Ok(self.model.save_adapter(dir)?)
    }
}

/// Module paths for messages: `` `a`, `b` ``.
pub(crate) fn backticked(paths: &[String]) -> String {
    paths
        .iter()
        .map(|m| format!("`{m}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
