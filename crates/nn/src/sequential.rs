//! A PyTorch `nn.Sequential` of `Linear`, `LayerNorm`, `BatchNorm1d` (eval mode) and
//! parameter-free activations, read from its state dict.

use crate::activation::Activation;
use crate::batch_norm::BatchNorm;
use crate::error::{Error, Result};
use crate::layer_norm::{LayerNorm, NormKind};
use crate::layout::ModuleLayout;
use crate::linear::{Linear, LoraAdapter};
use crate::prelu::PRelu;
use crate::save::save_weights_in_order;
use crate::var_builder::VarBuilder;
use nibble_autograd::{Param, Tape, Var};
use nibble_io::{Checkpoint, WeightFormat};
use nibble_tensor::{Rng, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// One layer of a [`Sequential`].
#[derive(Debug, Clone)]
pub enum Layer {
    /// A linear layer (a 2-D weight in the state dict).
    Linear(Linear),
    /// A LayerNorm or an RMSNorm (a 1-D weight; see [`crate::NormKind`]).
    LayerNorm(LayerNorm),
    /// An `nn.BatchNorm1d` in eval mode (running statistics), frozen.
    BatchNorm(BatchNorm),
    /// An `nn.PReLU` (a 1-D weight the options name [`NormKind::PRelu`]).
    PRelu(PRelu),
    /// A parameter-free activation (a gap in the indices).
    Activation(Activation),
}

/// How [`Sequential::from_state_dict`] reads a state dict.
#[derive(Debug, Clone)]
pub struct SequentialOptions {
    /// Only keys starting with this are read, with it stripped (e.g. `"model."`); keys without
    /// it are ignored. Empty: every key must be a `Sequential` parameter.
    pub prefix: String,
    /// The format of every Linear not listed in `formats`.
    pub format: WeightFormat,
    /// Per-Linear formats, by index.
    pub formats: BTreeMap<usize, WeightFormat>,
    /// The parameter-free layers, in order, of every gap not listed in `activations` (`None`:
    /// a gap is an error; an empty list: nothing, as [`Activation::Identity`]).
    pub activation: Option<Vec<Activation>>,
    /// Per-gap parameter-free layers, keyed by the gap's first missing index.
    pub activations: BTreeMap<usize, Vec<Activation>>,
    /// The epsilon of every LayerNorm and GroupNorm, those with parameters and the parameter-free
    /// [`Activation::LayerNorm`] in gaps (a state dict does not hold it; PyTorch's default is
    /// [`LayerNorm::DEFAULT_EPS`]).
    pub layer_norm_eps: f32,
    /// The epsilon of every BatchNorm ([`BatchNorm::DEFAULT_EPS`] unless set).
    pub batch_norm_eps: f32,
    /// What every module of a 1-D weight not listed in `norms` is: a LayerNorm unless set
    /// (a state dict cannot tell an `nn.RMSNorm` from an `nn.LayerNorm(dim, bias=False)`, nor
    /// an `nn.GroupNorm` from an `nn.LayerNorm`).
    pub norm: NormKind,
    /// Per-module kinds of the modules with a 1-D weight, by index.
    pub norms: BTreeMap<usize, NormKind>,
    /// The epsilon of every RMSNorm, those with a weight and the parameter-free
    /// [`Activation::RmsNorm`] in gaps (PyTorch's `nn.RMSNorm(dim)` takes [`f32::EPSILON`]
    /// on f32, the default here).
    pub rms_norm_eps: f32,
    /// The order the named modules run in (their paths under the prefix), where the file's
    /// order is not the model's (see [`crate::layout::ModuleLayout::read_in_order`]).
    pub module_order: Option<Vec<String>>,
}

impl Default for SequentialOptions {
    fn default() -> Self {
        SequentialOptions {
            prefix: String::new(),
            format: WeightFormat::F32,
            formats: BTreeMap::new(),
            activation: None,
            activations: BTreeMap::new(),
            layer_norm_eps: LayerNorm::DEFAULT_EPS,
            batch_norm_eps: BatchNorm::DEFAULT_EPS,
            norm: NormKind::Layer,
            norms: BTreeMap::new(),
            rms_norm_eps: f32::EPSILON,
            module_order: None,
        }
    }
}

impl SequentialOptions {
    /// f32 Linears, no prefix, no activation given.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads only keys under `prefix` (e.g. `"model."`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The named modules run in `order` (their paths under the prefix), not in the file's.
    pub fn module_order(mut self, order: Vec<String>) -> Self {
        self.module_order = Some(order);
        self
    }

    /// Every Linear in `format` (unless set per layer).
    pub fn format(mut self, format: WeightFormat) -> Self {
        self.format = format;
        self
    }

    /// The Linear at `index` in `format`.
    pub fn format_at(mut self, index: usize, format: WeightFormat) -> Self {
        self.formats.insert(index, format);
        self
    }

    /// Every gap is `activation` (unless set per gap).
    pub fn activation(self, activation: Activation) -> Self {
        self.gap_layers(vec![activation])
    }

    /// Every gap holds `layers`, in order (unless set per gap): e.g. a parameter-free
    /// LayerNorm then a ReLU, `[Activation::layer_norm(1e-5), Activation::Relu]` (the
    /// epsilon is [`SequentialOptions::layer_norm_eps`]).
    pub fn gap_layers(mut self, layers: Vec<Activation>) -> Self {
        self.activation = Some(layers);
        self
    }

    /// Every LayerNorm adds `eps` to the variance (`nn.LayerNorm(dim, eps=...)`).
    pub fn layer_norm_eps(mut self, eps: f32) -> Self {
        self.layer_norm_eps = eps;
        self
    }

    /// Every BatchNorm adds `eps` to the running variance (`nn.BatchNorm1d(dim, eps=...)`).
    pub fn batch_norm_eps(mut self, eps: f32) -> Self {
        self.batch_norm_eps = eps;
        self
    }

    /// Every module of a 1-D weight is a `kind` (unless set per module).
    pub fn norm(mut self, kind: NormKind) -> Self {
        self.norm = kind;
        self
    }

    /// The module of a 1-D weight at `index` is a `kind`.
    pub fn norm_at(mut self, index: usize, kind: NormKind) -> Self {
        self.norms.insert(index, kind);
        self
    }

    /// Every RMSNorm adds `eps` to the mean square (`nn.RMSNorm(dim, eps=...)`).
    pub fn rms_norm_eps(mut self, eps: f32) -> Self {
        self.rms_norm_eps = eps;
        self
    }

    /// The gap starting at `index` is `activation`.
    pub fn activation_at(self, index: usize, activation: Activation) -> Self {
        self.gap_layers_at(index, vec![activation])
    }

    /// The gap starting at `index` holds `layers`, in order.
    pub fn gap_layers_at(mut self, index: usize, layers: Vec<Activation>) -> Self {
        self.activations.insert(index, layers);
        self
    }
}

/// Layers applied in order to `[batch, features]` inputs.
#[derive(Debug, Clone, Default)]
pub struct Sequential {
    layers: Vec<Layer>,
    /// The keys of base parameters that loaded adapters replaced (`bias = "all"` /
    /// `"lora_only"`, `modules_to_save`) or changed (`lora_bias`, folded into the layers'
    /// biases): [`Sequential::save_adapter`] cannot write them.
    adapter_base: Vec<String>,
}

/// The layers of a gap: its activations in order, a parameter-free LayerNorm, GroupNorm or
/// RMSNorm taking the model's epsilon for its kind.
fn gap_layers<'a>(
    acts: &'a [Activation],
    options: &SequentialOptions,
) -> impl Iterator<Item = Layer> + 'a {
    let (layer_eps, rms_eps) = (options.layer_norm_eps, options.rms_norm_eps);
    acts.iter().map(move |a| {
        Layer::Activation(match a {
            Activation::LayerNorm(_) => Activation::layer_norm(layer_eps),
            Activation::RmsNorm(_) => Activation::rms_norm(rms_eps),
            Activation::GroupNorm { groups, .. } => Activation::group_norm(*groups, layer_eps),
            other => *other,
        })
    })
}

/// The name and the input and output widths of a layer of weights (`None` for an activation;
/// a PReLU of one slope reports 1 for both).
fn layer_widths(layer: &Layer) -> Option<(&str, usize, usize)> {
    match layer {
        Layer::Linear(l) => {
            let (out, inp) = l.dims();
            Some((&l.name, inp, out))
        }
        Layer::LayerNorm(n) => Some((&n.name, n.dim(), n.dim())),
        Layer::BatchNorm(n) => Some((&n.name, n.dim(), n.dim())),
        Layer::PRelu(p) => Some((&p.name, p.slopes(), p.slopes())),
        Layer::Activation(_) => None,
    }
}

/// Every parameter-free GroupNorm's group count divides the width it normalizes: the output of
/// the nearest module of weights before it, or before the first one, that module's input (a
/// one-slope PReLU says nothing of the width). Otherwise the message naming the module and
/// both counts.
fn check_gap_group_norms(layers: &[Layer]) -> std::result::Result<(), String> {
    let known = |l: &&Layer| !matches!(l, Layer::PRelu(p) if p.slopes() == 1);
    for (at, layer) in layers.iter().enumerate() {
        let Layer::Activation(a @ Activation::GroupNorm { groups, .. }) = layer else {
            continue;
        };
        let after = layers[..at]
            .iter()
            .rev()
            .filter(known)
            .find_map(layer_widths)
            .map(|(name, _, out)| (format!("after module `{name}`"), out));
        let width = after.or_else(|| {
            layers[at..]
                .iter()
                .filter(known)
                .find_map(layer_widths)
                .map(|(name, inp, _)| (format!("before module `{name}`"), inp))
        });
        if let Some((place, width)) = width.filter(|(_, w)| !w.is_multiple_of(*groups)) {
            return Err(format!(
                "the parameter-free `{a}` {place} normalizes {width} features: its {groups} groups must divide them"
            ));
        }
    }
    Ok(())
}

impl Sequential {
    /// A model of these layers.
    pub fn new(layers: Vec<Layer>) -> Self {
        Sequential {
            layers,
            adapter_base: Vec::new(),
        }
    }

    /// Builds the model a PyTorch `nn.Sequential` state dict describes: keys
    /// `{i}.weight` / `{i}.bias` (under `options.prefix`); a 2-D weight is a Linear, a 1-D one a
    /// LayerNorm (or an RMSNorm where [`SequentialOptions::norm`] / `norm_at` say so), `{i}.running_mean` / `running_var` (with or without a weight and bias) a
    /// [`BatchNorm`] in eval mode, and a gap in the indices between two layers holds
    /// parameter-free layers (given by `options`: one activation, or several in order such as a
    /// LayerNorm without parameters then a ReLU; a dropout or identity in the gap needs no
    /// entry; parameter-free layers before the first weight, such as `nn.Flatten`, are
    /// skipped unless [`SequentialOptions::gap_layers_at`] gives some for index 0). Weights stored quantized (by [`Sequential::save`]) are used as stored.
    /// A state dict of named modules (`fc1.weight`, `bn1.running_mean`, ...: a model of its own
    /// class) is read as the chain of its modules in the file's order, module `k` at index
    /// `2k` with a gap after each ([`crate::layout::ModuleLayout`]), the layers keeping the
    /// modules' names.
    /// Keys of no layer, a bias without a weight and layers whose widths do not chain are errors
    /// naming the key and shapes. A NaN or infinite weight, bias, LayerNorm or BatchNorm
    /// parameter or running statistic (stored f32, f16 or bf16) is an [`Error::NonFinite`]
    /// naming the key, the element's (row, col) or index and its value; quantized weights
    /// have their stored scales checked likewise by the reader.
    pub fn from_state_dict(file: &Checkpoint, options: &SequentialOptions) -> Result<Self> {
        let structure = |what: String| Error::Structure {
            file: file.path().to_path_buf(),
            what,
        };
        let layout =
            ModuleLayout::read_in_order(file, &options.prefix, options.module_order.as_deref())?;
        let root = VarBuilder::new(file);
        let root = match options.prefix.strip_suffix('.') {
            Some(p) if !p.is_empty() => root.pp(p),
            _ if options.prefix.is_empty() => root,
            _ => {
                return Err(structure(format!(
                    "prefix `{}` must end with a dot",
                    options.prefix
                )))
            }
        };
        for (kind, eps) in [
            ("LayerNorm", options.layer_norm_eps),
            ("RMSNorm", options.rms_norm_eps),
        ] {
            if !(eps.is_finite() && eps > 0.0) {
                return Err(structure(format!(
                    "the {kind} epsilon must be a positive number, found {eps}"
                )));
            }
        }
        let mut layers = Vec::new();
        let mut width: Option<(usize, String)> = None; // output width and the key that set it
        let mut previous: Option<usize> = None;
        let mut previous_path = "";
        let mut gaps = Vec::new(); // first missing index of each gap
        let mut linear_indices = Vec::new();
        let mut norm_indices = Vec::new();
        for entry in &layout.modules {
            let (index, has_weight, has_stats) = (entry.index, entry.weight, entry.stats);
            let key = |name: &str| format!("{}{}.{name}", options.prefix, entry.path);
            if !has_weight && !has_stats {
                return Err(structure(format!(
                    "`{}` has no `{}`",
                    key("bias"),
                    key("weight")
                )));
            }
            if previous.is_none() && index > 0 {
                // Parameter-free layers before the first one (`nn.Flatten`, a normalising
                // activation): nothing unless an activation is given for index 0, since the
                // one for every gap is meant for the gaps between layers.
                if let Some(acts) = options.activations.get(&0) {
                    layers.extend(gap_layers(acts, options));
                    gaps.push(0);
                }
            }
            if let Some(p) = previous {
                if index > p + 1 {
                    let gap = p + 1;
                    let acts = options
                        .activations
                        .get(&gap)
                        .or(options.activation.as_ref())
                        .ok_or_else(|| {
                            let between = if layout.named {
                                format!("between modules `{}` and `{}` (named modules: what runs between any two is for the user to say)", previous_path, entry.path)
                            } else {
                                format!("indices {gap}..{index} hold no parameters")
                            };
                            structure(format!(
                                "{between}: a parameter-free activation there must be given ({})",
                                Activation::names_list()
                            ))
                        })?;
                    layers.extend(gap_layers(acts, options));
                    gaps.push(gap);
                }
            }
            previous = Some(index);
            previous_path = entry.path.as_str();
            let vb = root.pp(&entry.path);
            let plain_dims = file.info(&key("weight")).map(|(_, s)| s.len());
            let layer = match plain_dims {
                _ if has_stats => {
                    let vb = &vb;
                    let mean = vb.get_any("running_mean")?;
                    let dim = [mean.numel()];
                    Layer::BatchNorm(BatchNorm::new(
                        vb.module_name(),
                        vb.optional("weight", &dim)?,
                        vb.optional("bias", &dim)?,
                        mean,
                        vb.get("running_var", &dim)?,
                        options.batch_norm_eps,
                    )?)
                }
                Some(1) => {
                    norm_indices.push(index);
                    let mut norm = vb.layer_norm()?;
                    match options.norms.get(&index).copied().unwrap_or(options.norm) {
                        NormKind::Layer => norm.eps = options.layer_norm_eps,
                        NormKind::Group(groups) => norm = norm.into_group(groups, options.layer_norm_eps)?,
                        NormKind::Rms if norm.bias.is_some() => {
                            return Err(structure(format!(
                                "index {index} is given as an RMSNorm, but `{}` exists: an RMSNorm has no bias (a LayerNorm has)",
                                key("bias")
                            )))
                        }
                        NormKind::Rms => norm = norm.into_rms(options.rms_norm_eps)?,
                        NormKind::PRelu if norm.bias.is_some() => {
                            return Err(structure(format!(
                                "index {index} is given as a PReLU, but `{}` exists: a PReLU has no bias",
                                key("bias")
                            )))
                        }
                        NormKind::PRelu => {
                            let slopes = norm.dim();
                            if let Some((w, from)) = width.as_ref().filter(|(w, _)| slopes != 1 && *w != slopes) {
                                return Err(structure(format!(
                                    "`{}` holds {slopes} PReLU slopes but `{from}` gives {w} features (a PReLU has one slope or one per feature)",
                                    key("weight")
                                )));
                            }
                            // A PReLU of one slope per feature in front sets the width the next
                            // layer must take (it was never checked: a model that could not run).
                            if width.is_none() && slopes != 1 {
                                width = Some((slopes, key("weight")));
                            }
                            let weight = norm.weight.clone();
                            layers.push(Layer::PRelu(PRelu { name: norm.name, weight }));
                            continue;
                        }
                    }
                    Layer::LayerNorm(norm)
                }
                Some(2) | None => {
                    let format = options
                        .formats
                        .get(&index)
                        .copied()
                        .unwrap_or(options.format);
                    linear_indices.push(index);
                    Layer::Linear(vb.linear(format)?)
                }
                Some(_) => {
                    let shape = file.info(&key("weight")).map(|(_, s)| s.to_vec());
                    return Err(structure(format!(
                        "`{}` has shape {:?}: only Linear (2-D) and LayerNorm (1-D) weights are supported",
                        key("weight"),
                        shape.unwrap_or_default()
                    )));
                }
            };
            // Only layers of weights are read here (activations come from gaps).
            let Some((_, inp, out)) = layer_widths(&layer) else {
                return Err(structure(format!("index {index} holds no weights")));
            };
            if let Some((w, from)) = &width {
                if *w != inp {
                    let order = if layout.named {
                        " (named modules run in the order the file keeps them: a .pth keeps the \
                         model's, a safetensors file sorts them by name, numbers as numbers)"
                    } else {
                        ""
                    };
                    return Err(structure(format!(
                        "`{}` takes {inp} features but `{from}` gives {w}: the layers do not chain{order}",
                        key("weight")
                    )));
                }
            }
            width = Some((out, key("weight")));
            layers.push(layer);
        }
        if let Some(index) = options.formats.keys().find(|i| !linear_indices.contains(i)) {
            return Err(structure(format!(
                "a format is given for index {index}, which holds no Linear (Linears at {linear_indices:?})"
            )));
        }
        if let Some(index) = options.norms.keys().find(|i| !norm_indices.contains(i)) {
            return Err(structure(format!(
                "a norm kind is given for index {index}, which holds no module of a 1-D weight (those are at {norm_indices:?})"
            )));
        }
        if let Some(index) = options.activations.keys().find(|i| !gaps.contains(i)) {
            return Err(structure(format!(
                "an activation is given for index {index}, which starts no gap between layers (gaps at {gaps:?})"
            )));
        }
        check_gap_group_norms(&layers).map_err(structure)?;
        Ok(Sequential::new(layers))
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Width of the input (of the first layer with weights).
    pub fn in_features(&self) -> Option<usize> {
        self.layers.iter().find_map(|l| match l {
            Layer::Linear(l) => Some(l.dims().1),
            Layer::LayerNorm(n) => Some(n.dim()),
            Layer::BatchNorm(n) => Some(n.dim()),
            // One slope for all features says nothing of the width.
            Layer::PRelu(p) => Some(p.slopes()).filter(|&n| n > 1),
            Layer::Activation(_) => None,
        })
    }

    /// Forward on a tape: `x` `[batch, in_features]`.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        match (x.shape(), self.in_features()) {
            (&[_, f], Some(want)) if f == want => {}
            (s, want) => {
                return Err(Error::Layer {
                    layer: "Sequential".to_string(),
                    what: format!(
                        "takes input [batch, {}], got shape {s:?}",
                        want.map_or("?".to_string(), |w| w.to_string())
                    ),
                })
            }
        }
        let mut h = x.clone();
        for layer in &self.layers {
            h = match layer {
                Layer::Linear(l) => l.forward(tape, &h)?,
                Layer::LayerNorm(n) => n.forward(tape, &h)?,
                Layer::BatchNorm(n) => n.forward(tape, &h)?,
                Layer::PRelu(p) => p.forward(tape, &h)?,
                Layer::Activation(a) => a.forward(tape, &h)?,
            };
        }
        Ok(h)
    }

    /// Inference: the model's output for `x`, recording nothing.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        if rayon::current_thread_index().is_none() {
            // Outside any pool: run as a job of the global pool, so that each kernel's parallel
            // loop starts from a worker instead of injecting a job and sleeping (as BigNet's
            // `infer` does).
            return nibble_tensor::parallel::on_pool_worker(|| self.infer(x));
        }
        let tape = Tape::new();
        let y = tape.no_grad(|| self.forward(&tape, &Var::constant(x.clone())))?;
        Ok(y.into_tensor())
    }

    /// Every Linear, in order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().filter_map(|l| match l {
            Layer::Linear(l) => Some(l),
            _ => None,
        })
    }

    /// Packs every trainable f32 Linear for inference ([`Linear::pack_for_inference`]): the
    /// GEMM then reads its weight in place instead of packing it per call, in the same memory (plus zero lanes rounding each
    /// layer's outputs up to 16).
    /// Those layers stop training (the LayerNorms and any adapters still train); outputs keep
    /// their bits for batches above 16 rows and differ by f32 rounding below; the model saves
    /// as before. Frozen (f16, quantized) Linears are left as they are.
    pub fn pack_for_inference(&mut self) -> Result<()> {
        for layer in self.linears_mut() {
            layer.pack_for_inference()?;
        }
        Ok(())
    }

    /// Every Linear, mutable (to attach or load adapters).
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().filter_map(|l| match l {
            Layer::Linear(l) => Some(l),
            _ => None,
        })
    }

    /// Attaches a fresh rank-`rank` LoRA adapter to every Linear (PEFT's init; each layer's
    /// A drawn from its own stream of `seed`) and freezes everything else, as PEFT does. A
    /// rank [`crate::linear::check_lora_rank`] refuses is an [`Error::Layer`], and leaves the
    /// model as it was.
    pub fn add_lora(&mut self, rank: usize, seed: u64) -> Result<()> {
        // Every adapter is built (and the rank checked) before the model changes, so that an
        // error leaves it as it was.
        let adapters = self
            .linears()
            .enumerate()
            .map(|(i, linear)| {
                let (out, inp) = linear.dims();
                LoraAdapter::init(&linear.name, out, inp, rank, &mut Rng::fork(seed, i as u64))
            })
            .collect::<Result<Vec<_>>>()?;
        for p in self.params() {
            p.set_requires_grad(false);
        }
        for (linear, adapter) in self.linears_mut().zip(adapters) {
            linear.lora = Some(adapter);
        }
        Ok(())
    }

    /// Makes the Linears' LoRA adapters DoRA ones (PEFT's `use_dora`; see
    /// [`Linear::enable_dora`]): outputs unchanged, the magnitudes training with the adapters.
    /// A model without adapters is an error, and so is a Linear whose weight has a zero row;
    /// an error leaves the model as it was.
    pub fn enable_dora(&mut self) -> Result<()> {
        crate::linear::enable_dora(self.linears_mut())
    }

    /// Saves the Linears' LoRA adapters to `dir` in PEFT's layout (target modules: the
    /// Linears' names, `0`, `3`, ... for an unprefixed state dict); see [`crate::peft`].
    ///
    /// A model that a loaded adapter gave base parameters (PEFT's `bias = "all"` /
    /// `"lora_only"`, `modules_to_save`, or lora_B biases folded into the layers' biases) is an
    /// error naming them, and nothing is written: the file holds the LoRA tensors only, so the
    /// saved adapter on the original base would run without them.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        if !self.adapter_base.is_empty() {
            let shown: Vec<&str> = self
                .adapter_base
                .iter()
                .take(4)
                .map(String::as_str)
                .collect();
            let more = self.adapter_base.len().saturating_sub(shown.len());
            return Err(crate::peft::adapter_error(
                dir,
                format!(
                    "the model holds base parameters that a loaded adapter replaced ({}{}: \
                     PEFT's bias = \"all\" / \"lora_only\", modules_to_save or lora_bias); an \
                     adapter file holds the LoRA tensors only, so they would be lost; nothing \
                     was written",
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        crate::peft::save_adapter(self.linears(), dir)
    }

    /// Rebuilds each BatchNorm that `updates` (checked by [`crate::peft::load_adapter_into`])
    /// gives new tensors, with those tensors.
    fn replace_batch_norm_tensors(
        &mut self,
        updates: Vec<crate::peft::BatchNormUpdate>,
    ) -> Result<()> {
        // The views were made from the BatchNorms in layer order: update `module` is the
        // `module`-th BatchNorm.
        let norms = self.layers.iter_mut().filter_map(|l| match l {
            Layer::BatchNorm(n) => Some(n),
            _ => None,
        });
        for (b, n) in norms.enumerate() {
            let new = |param: &str| {
                updates
                    .iter()
                    .find(|u| u.module == b && u.param == param)
                    .map(|u| u.value.clone())
            };
            if !updates.iter().any(|u| u.module == b) {
                continue;
            }
            n.set_tensors(
                new("weight").or_else(|| n.weight().cloned()),
                new("bias").or_else(|| n.bias().cloned()),
                new("running_mean").unwrap_or_else(|| n.running_mean().clone()),
                new("running_var").unwrap_or_else(|| n.running_var().clone()),
            )?;
        }
        Ok(())
    }

    /// Loads a PEFT adapter directory onto the Linears and freezes everything but the
    /// adapters (as [`Sequential::add_lora`] does); see [`crate::peft::load_adapter_into`]:
    /// only the Linears the config's `target_modules` selects (less `exclude_modules`) are
    /// adapted, and a target that is a LayerNorm, a BatchNorm or an activation (an index in a
    /// gap) is an error. A bad adapter leaves the model as it was.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        // The LayerNorms through clones of their parameter handles (a clone shares the value
        // it replaces), so that the Linears can be borrowed mutably beside them.
        let norms: Vec<(String, Param, Option<Param>)> = self
            .layers
            .iter()
            .filter_map(|l| match l {
                Layer::LayerNorm(n) => Some((n.name.clone(), n.weight.clone(), n.bias.clone())),
                // A PReLU's slopes are a module's one weight, which `modules_to_save` may
                // replace.
                Layer::PRelu(p) => Some((p.name.clone(), p.weight.clone(), None)),
                _ => None,
            })
            .collect();
        let views: Vec<crate::peft::OtherModule<'_>> = norms
            .iter()
            .map(|(name, weight, bias)| crate::peft::OtherModule {
                name: name.clone(),
                weight,
                bias: bias.as_ref(),
            })
            .collect();
        // The BatchNorms, which a target must not select (the activations between numbered
        // layers follow from the indices) and whose tensors the file may replace.
        let batch_norms: Vec<crate::peft::BatchNormView> = self
            .layers
            .iter()
            .filter_map(|l| match l {
                Layer::BatchNorm(n) => Some(crate::peft::BatchNormView {
                    name: n.name.clone(),
                    dim: n.dim(),
                    affine: n.weight().is_some(),
                }),
                _ => None,
            })
            .collect();
        let updates =
            crate::peft::load_adapter_into(self.linears_mut(), &views, &batch_norms, dir)?;
        self.replace_batch_norm_tensors(updates)?;
        // What the load put into the base (its file read without error just now): base
        // parameters, and lora_B biases folded into the layers' biases.
        let file = nibble_io::Checkpoint::open(crate::peft::weights_path(dir))?;
        for key in file.keys() {
            let lora_bias = key.contains(".lora_B") && key.ends_with(".bias");
            if (!key.contains(".lora_") || lora_bias) && !self.adapter_base.iter().any(|k| k == key)
            {
                self.adapter_base.push(key.to_string());
            }
        }
        for p in self.params() {
            p.set_requires_grad(false);
        }
        for l in self.linears() {
            for p in l.lora.iter().flat_map(crate::LoraAdapter::params) {
                p.set_requires_grad(true);
            }
        }
        Ok(())
    }

    /// Every parameter, named by its state-dict key (LoRA ones `<module>.lora_a.weight` /
    /// `lora_b.weight`), trainable or not.
    pub fn params(&self) -> Vec<Param> {
        self.layers
            .iter()
            .flat_map(|l| match l {
                Layer::Linear(l) => l.params(),
                Layer::LayerNorm(n) => n.params(),
                Layer::PRelu(p) => vec![p.weight.clone()],
                Layer::BatchNorm(_) => Vec::new(),
                Layer::Activation(_) => Vec::new(),
            })
            .collect()
    }

    /// The parameters that train (for an optimizer).
    pub fn trainable_params(&self) -> Vec<Param> {
        self.params()
            .into_iter()
            .filter(|p| p.requires_grad())
            .collect()
    }

    /// Bytes of every weight as stored: packed or f16 weights at their size, f32 ones (and
    /// LoRA adapters) at 4 bytes an element.
    pub fn model_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Linear(l) => l.stored_bytes(),
                Layer::LayerNorm(n) => 4 * n.dim() * (1 + usize::from(n.bias.is_some())),
                Layer::PRelu(p) => 4 * p.slopes(),
                Layer::BatchNorm(n) => {
                    4 * n.tensors().iter().map(|(_, t)| t.numel()).sum::<usize>()
                }
                Layer::Activation(_) => 0,
            })
            .sum()
    }

    /// Writes the model's weights (not its LoRA adapters: see [`crate::peft`]) to a safetensors
    /// file at `path` as [`crate::save_weights_with`] writes them (BatchNorms' tensors
    /// included), with the modules' order recorded ([`crate::layout::MODULE_ORDER_KEY`]);
    /// [`Sequential::from_state_dict`] reads it back (same prefix).
    pub fn save(&self, path: &Path) -> Result<()> {
        let norms = self.layers.iter().filter_map(|l| match l {
            Layer::LayerNorm(n) => Some(n),
            _ => None,
        });
        // PReLU slopes by value (a parameter's value is behind a lock).
        let slopes: Vec<(String, Tensor)> = self
            .layers
            .iter()
            .filter_map(|l| match l {
                Layer::PRelu(p) => Some((format!("{}.weight", p.name), p.weight.value().clone())),
                _ => None,
            })
            .collect();
        let extra = self
            .layers
            .iter()
            .flat_map(|l| match l {
                Layer::BatchNorm(n) => n.tensors(),
                _ => Vec::new(),
            })
            .chain(slopes.iter().map(|(k, t)| (k.clone(), t)));
        // The modules in the order they run: a reader of named modules needs it (safetensors
        // sorts the keys), and an index-keyed Sequential's order is the same.
        let order = self
            .layers
            .iter()
            .filter_map(|l| layer_widths(l).map(|(name, ..)| name.to_string()))
            .collect();
        save_weights_in_order(path, self.linears(), norms, extra, Some(order))
    }
}
