//! A classifier read from a PyTorch `nn.Sequential` state dict, in any weight format, with
//! optional LoRA adapters on its Linear layers.
//!
//! The structure comes from the keys: `{i}.weight` / `{i}.bias`; a 2-D weight is a `Linear`
//! (`[out, in]`, bias optional), a 1-D one a `LayerNorm` (eps 1e-5, bias required), and each
//! run of missing indices a parameter-free activation (ReLU or GELU, given by the caller: one
//! for every gap, or one per gap). Anything else — other key names, other ranks, widths that do
//! not chain — is an error naming the file, the key and the shapes.

use crate::error::{Error, Result};
use nibble_autograd::{Param, Tape, Var};
use nibble_io::{Checkpoint, FrozenWeight, WeightFormat};
use nibble_nn::{FrozenBias, Linear, LinearBase, LoraAdapter};
use nibble_tensor::{Rng, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::ops::Activation;

/// LayerNorm's epsilon (PyTorch's default).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Parses `--activation`: `relu`, `gelu`, or a comma-separated list of them (one per gap).
pub fn parse_activations(s: &str) -> Result<Vec<Activation>> {
    s.split(',')
        .map(|a| match a.trim().to_ascii_lowercase().as_str() {
            "relu" => Ok(Activation::Relu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(Error::Usage {
                arg: "--activation",
                what: format!("`{other}`: expected relu or gelu (or a comma-separated list)"),
            }),
        })
        .collect()
}

/// One layer of the Sequential.
#[derive(Debug, Clone)]
enum Layer {
    Linear(Linear),
    Norm { weight: Param, bias: Param },
    Act(Activation),
}

/// A Sequential classifier (see the module docs).
#[derive(Debug, Clone)]
pub struct Classifier {
    path: PathBuf,
    layers: Vec<Layer>,
    features: usize,
    classes: usize,
}

fn structure(path: &Path, what: String) -> Error {
    Error::Nn(nibble_nn::Error::Structure {
        file: path.to_path_buf(),
        what,
    })
}

impl Classifier {
    /// Reads the Sequential in `path`, its Linear weights stored in `format` (f32 weights are
    /// kept, frozen), with `activations` in the gaps.
    pub fn open(path: &Path, activations: &[Activation], format: WeightFormat) -> Result<Self> {
        let file = Checkpoint::open(path)?;
        let mut by_index: BTreeMap<usize, (Option<&str>, Option<&str>)> = BTreeMap::new();
        for key in file.keys() {
            let parsed = key.split_once('.').and_then(|(i, field)| {
                let index = (!i.starts_with('+')).then(|| i.parse::<usize>().ok())??;
                matches!(field, "weight" | "bias").then_some((index, field))
            });
            let Some((index, field)) = parsed else {
                return Err(structure(
                    path,
                    format!(
                        "key `{key}` is not `<index>.weight` or `<index>.bias` of an nn.Sequential \
                         of Linear and LayerNorm layers"
                    ),
                ));
            };
            let slot = by_index.entry(index).or_default();
            if field == "weight" {
                slot.0 = Some(key);
            } else {
                slot.1 = Some(key);
            }
        }
        let Some(&last) = by_index.keys().next_back() else {
            return Err(structure(
                path,
                "no tensors: not a Sequential state dict".into(),
            ));
        };
        let gaps: Vec<usize> = (0..last)
            .filter(|i| !by_index.contains_key(i) && (*i == 0 || by_index.contains_key(&(i - 1))))
            .collect();
        let activation_for = match (activations.len(), gaps.len()) {
            (1, _) => vec![activations[0]; gaps.len()],
            (n, g) if n == g => activations.to_vec(),
            (n, g) => {
                return Err(Error::Usage {
                    arg: "--activation",
                    what: format!(
                        "{n} activations given for the {g} gaps of {} (at indices {gaps:?}): \
                         give one for all or one per gap",
                        path.display()
                    ),
                })
            }
        };
        let mut layers = Vec::new();
        let mut width: Option<usize> = None;
        let mut features = 0;
        let mut next_gap = 0;
        for i in 0..=last {
            let Some(&(weight, bias)) = by_index.get(&i) else {
                if gaps.get(next_gap) == Some(&i) {
                    layers.push(Layer::Act(activation_for[next_gap]));
                    next_gap += 1;
                }
                continue;
            };
            let Some(wkey) = weight else {
                return Err(structure(path, format!("`{i}.bias` has no `{i}.weight`")));
            };
            let (_, shape) = file.info(wkey).expect("listed key");
            let shape = shape.to_vec();
            let input = match shape.as_slice() {
                [out, inp] => {
                    let w = file.tensor_f32(wkey, None)?;
                    let b = match bias {
                        Some(bkey) => file.tensor_f32(bkey, Some(&[*out]))?.into_vec(),
                        None => vec![0.0; *out],
                    };
                    let name = i.to_string();
                    let base = if format == WeightFormat::F32 {
                        LinearBase::Trainable {
                            weight: Param::new(wkey, w, false),
                            bias: Param::new(
                                format!("{i}.bias"),
                                Tensor::from_vec(&[*out], b)?,
                                false,
                            ),
                        }
                    } else {
                        LinearBase::Frozen {
                            weight: FrozenWeight::quantize(format, wkey, &w)?,
                            bias: FrozenBias::F32(b),
                        }
                    };
                    layers.push(Layer::Linear(Linear {
                        name,
                        base,
                        lora: None,
                    }));
                    (*inp, *out)
                }
                [dim] => {
                    let Some(bkey) = bias else {
                        return Err(structure(
                            path,
                            format!("LayerNorm `{wkey}` [{dim}] has no `{i}.bias`"),
                        ));
                    };
                    let w = file.tensor_f32(wkey, None)?;
                    let b = file.tensor_f32(bkey, Some(&[*dim]))?;
                    layers.push(Layer::Norm {
                        weight: Param::new(wkey, w, false),
                        bias: Param::new(bkey, b, false),
                    });
                    (*dim, *dim)
                }
                _ => {
                    return Err(structure(
                        path,
                        format!(
                            "`{wkey}` has shape {shape:?}: a Sequential of Linear ([out, in]) and \
                             LayerNorm ([dim]) layers only"
                        ),
                    ))
                }
            };
            match width {
                None => features = input.0,
                Some(w) if w != input.0 => {
                    return Err(structure(
                        path,
                        format!(
                            "`{wkey}` has shape {shape:?}: its input width {} does not match the \
                             previous layer's output width {w}",
                            input.0
                        ),
                    ))
                }
                Some(_) => {}
            }
            width = Some(input.1);
        }
        if !layers.iter().any(|l| matches!(l, Layer::Linear(_))) {
            return Err(structure(
                path,
                "no Linear layer (2-D `<index>.weight`)".into(),
            ));
        }
        Ok(Classifier {
            path: path.to_path_buf(),
            layers,
            features,
            classes: width.unwrap_or(0),
        })
    }

    /// The file the model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Input width.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Number of classes (the last layer's width).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The Linear layers, in order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().filter_map(|l| match l {
            Layer::Linear(l) => Some(l),
            _ => None,
        })
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().filter_map(|l| match l {
            Layer::Linear(l) => Some(l),
            _ => None,
        })
    }

    /// Bytes of the base model: every Linear's weight and bias in its storage, LayerNorms in
    /// f32 (LoRA adapters not included).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Linear(linear) => match &linear.base {
                    LinearBase::Trainable { weight, bias } => 4 * (weight.numel() + bias.numel()),
                    LinearBase::Frozen { .. } => linear.frozen_storage().1,
                },
                Layer::Norm { weight, bias } => 4 * (weight.numel() + bias.numel()),
                Layer::Act(_) => 0,
            })
            .sum()
    }

    /// The forward pass on `x` `[rows, features]`, recorded on `tape` where something trains.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = match layer {
                Layer::Linear(l) => l.forward(tape, &h)?,
                Layer::Norm { weight, bias } => {
                    tape.layer_norm(&h, weight, bias, LAYER_NORM_EPS)?
                }
                Layer::Act(a) => a.forward(tape, &h)?,
            };
        }
        Ok(h)
    }

    /// The logits `[rows, classes]` of `x` `[rows, features]`, row-major, without recording.
    pub fn logits(&self, x: &Tensor) -> Result<Vec<f32>> {
        let tape = Tape::new();
        let x = Var::constant(x.clone());
        let y = tape.no_grad(|| self.forward(&tape, &x))?;
        Ok(y.into_tensor().into_vec())
    }

    /// Puts a fresh rank-`rank` LoRA adapter (A uniform, B zero) on every Linear, drawn from
    /// `seed`.
    pub fn add_lora(&mut self, rank: usize, seed: u64) -> Result<()> {
        let mut rng = Rng::fork(seed, 0x10AA);
        for l in self.linears_mut() {
            let (out, inp) = l.dims();
            l.lora = Some(LoraAdapter::init(&l.name, out, inp, rank, &mut rng));
        }
        Ok(())
    }

    /// The parameters that train: the LoRA adapters.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.linears()
            .filter_map(|l| l.lora.as_ref())
            .flat_map(|a| [a.a.clone(), a.b.clone()])
            .collect()
    }

    /// One training pass on a mini-batch: forward, mean softmax cross-entropy against `labels`,
    /// backward (gradients accumulate into the adapters); returns the loss.
    pub fn train_loss(&self, tape: &Tape, x: Tensor, labels: &[usize]) -> Result<f32> {
        let logits = self.forward(tape, &Var::constant(x))?;
        let loss = crate::ops::cross_entropy(tape, &logits, labels)?;
        let value = loss.value().item()?;
        drop(logits);
        tape.backward(&loss)?;
        Ok(value)
    }

    /// Loads a PEFT adapter directory onto the Linear layers (named by index).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        nibble_nn::peft::load_adapter(self.linears_mut(), dir)?;
        Ok(())
    }

    /// Saves the Linear layers' adapters in PEFT's layout.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        nibble_nn::peft::save_adapter(self.linears(), dir)?;
        Ok(())
    }
}
