//! Opens what the user points at: a checkpoint (`.pth` or `.safetensors`, f32 or f16 state
//! dicts, or bitsandbytes' FP4 layers read as f32) or nothing (seeded init), and builds the
//! requested variant from it.

use crate::adapter::load_adapter;
use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::model::BigNet;
use crate::persist::{load_quantized, quantized_format};
use crate::source::{SeededInit, WeightSource, DEFAULT_DIM};
use crate::variant::{Variant, WeightFormat};
use nibble_tensor::Tensor;
use std::path::PathBuf;

/// Opens a BigNet checkpoint, reading a state dict saved from a wrapped model under the
/// wrapper's path: DataParallel's `module.`, `torch.compile`'s `_orig_mod.` (or both), or any
/// path that every key starts with, where `model.0.model.0.bias` itself is absent.
pub fn open_checkpoint(path: &std::path::Path) -> Result<Checkpoint> {
    const FIRST: &str = "model.0.model.0.bias";
    let file = Checkpoint::open(path)?;
    if file.contains(FIRST) {
        return Ok(file);
    }
    let prefix = file
        .keys()
        .find_map(|k| k.strip_suffix(FIRST))
        .filter(|p| p.ends_with('.'))
        .map(str::to_string);
    Ok(match prefix {
        Some(p) => file
            .without_prefix(&p)
            .unwrap_or_else(|unchanged| unchanged),
        None => file,
    })
}

/// A state dict in a checkpoint file, read tensor by tensor (f32 or f16, widened).
pub struct CheckpointSource {
    checkpoint: Checkpoint,
    dim: usize,
}

impl CheckpointSource {
    /// Wraps an open state-dict checkpoint, reading the model width from its first weight.
    pub fn new(checkpoint: Checkpoint) -> Result<Self> {
        let path = checkpoint.path().to_path_buf();
        let key = "model.0.model.0.weight";
        if nibble_io::bnb::is_bnb_4bit(&checkpoint, key) {
            // bitsandbytes' FP4 (or NF4 in blocks other than 64): read as f32 weights.
            let info = nibble_io::bnb::bnb_4bit_info(&checkpoint, key)?;
            if info.out != info.inn || info.out == 0 {
                return Err(Error::Model {
                    what: format!(
                        "{}: `{key}` should be a square [dim, dim] matrix, found [{}, {}]",
                        path.display(),
                        info.out,
                        info.inn
                    ),
                });
            }
            return Ok(CheckpointSource {
                checkpoint,
                dim: info.out,
            });
        }
        let (_, shape) = checkpoint.info(key).ok_or_else(|| {
            // The reference's low_precision / qlora state dict: biases (and adapters) without
            // the 4-bit weights, which PyTorch does not save (`persistent=False` buffers).
            let hint = if checkpoint.contains("model.0.model.0.bias") {
                if state_dict_lora_key(&checkpoint).is_some() {
                    "; it looks like the reference's qlora model saved whole, whose 4-bit weights PyTorch does not save: give the f32 state dict it was loaded from as --weights and this file as --adapter"
                } else {
                    "; it looks like the reference's low_precision model saved whole, whose 4-bit weights PyTorch does not save: give the f32 state dict it was loaded from as --weights"
                }
            } else {
                ""
            };
            Error::Model {
                what: format!(
                    "{}: no tensor `{key}`: not a BigNet state dict (keys: {}){hint}",
                    path.display(),
                    checkpoint.keys().take(5).collect::<Vec<_>>().join(", ")
                ),
            }
        })?;
        let dim = match shape {
            [o, i] if o == i && *o > 0 => *o,
            s => {
                return Err(Error::Model {
                    what: format!(
                        "{}: `{key}` should be a square [dim, dim] matrix, found shape {s:?}",
                        path.display()
                    ),
                })
            }
        };
        Ok(CheckpointSource { checkpoint, dim })
    }

    /// The open checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }
}

impl WeightSource for CheckpointSource {
    fn dim(&self) -> usize {
        self.dim
    }
    fn tensor(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        if nibble_io::bnb::is_bnb_4bit(&self.checkpoint, key) {
            let t = nibble_io::bnb::read_bnb_4bit_f32(&self.checkpoint, key)?;
            if t.shape() != shape {
                return Err(Error::Model {
                    what: format!(
                        "{}: `{key}` is {:?} in bitsandbytes' layout, expected {shape:?}",
                        self.describe(),
                        t.shape()
                    ),
                });
            }
            return check_finite(self.checkpoint.path(), key, t);
        }
        if nibble_io::bnb::is_bnb_8bit(&self.checkpoint, key) {
            // One bitsandbytes 8-bit Linear among f32 ones (`llm_int8_skip_modules`): its
            // codes times its row scales, `K · SCB / 127`, as f32.
            let (weight, out, inn) = nibble_io::bnb::read_bnb_8bit(&self.checkpoint, key)?;
            if [out, inn] != shape {
                return Err(Error::Model {
                    what: format!(
                        "{}: `{key}` is [{out}, {inn}] in bitsandbytes' 8-bit layout, expected \
                         {shape:?}",
                        self.describe()
                    ),
                });
            }
            return check_finite(self.checkpoint.path(), key, weight.matrix().to_f32());
        }
        check_finite(
            self.checkpoint.path(),
            key,
            self.checkpoint.tensor_f32(key, Some(shape))?,
        )
    }
    fn describe(&self) -> String {
        self.checkpoint.path().display().to_string()
    }
}

/// Where to get a model from.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The variant to build.
    pub variant: Variant,
    /// A checkpoint, or None for seeded init.
    pub weights: Option<PathBuf>,
    /// Seed of the init (and of LoRA adapters).
    pub seed: u64,
    /// Width for seeded init (a checkpoint's own width wins).
    pub dim: usize,
    /// A LoRA adapter directory (PEFT layout) to load on top.
    pub adapter: Option<PathBuf>,
}

impl ModelSpec {
    /// Seeded init at the default width.
    pub fn seeded(variant: Variant, seed: u64) -> Self {
        ModelSpec {
            variant,
            weights: None,
            seed,
            dim: DEFAULT_DIM,
            adapter: None,
        }
    }

    /// Builds the model.
    pub fn build(&self) -> Result<BigNet> {
        let mut model = match &self.weights {
            None => BigNet::build(
                self.variant,
                &SeededInit {
                    dim: self.dim,
                    seed: self.seed,
                },
                self.seed,
            ),
            Some(path) => {
                let file = open_checkpoint(path)?;
                match quantized_format(&file)? {
                    Some(format) => {
                        let model = load_quantized(&file, format, self.variant, self.seed)?;
                        check_stored_floats_finite(&file)?;
                        Ok(model)
                    }
                    None => {
                        let other_adapter = self
                            .adapter
                            .as_ref()
                            .filter(|a| !crate::cli::paths::same_file(a, path));
                        if let (Some(dir), Some(key)) = (other_adapter, state_dict_lora_key(&file))
                        {
                            // Two sets of adapters for one model: loading the second would
                            // drop the file's trained ones without a word.
                            return Err(Error::Input {
                                what: format!(
                                    "--weights {} holds LoRA adapters (`{key}`) and --adapter {} \
                                     gives others: a model takes one set (leave out --adapter to \
                                     run the file's, or give --weights a state dict without them)",
                                    path.display(),
                                    dir.display()
                                ),
                            });
                        }
                        let source = CheckpointSource::new(file)?;
                        check_no_extra_keys(&source)?;
                        let mut model = BigNet::build(self.variant, &source, self.seed)?;
                        load_state_dict_lora(&mut model, source.checkpoint())?;
                        Ok(model)
                    }
                }
            }
        }?;
        if let Some(dir) = &self.adapter {
            load_adapter(&mut model, dir)?;
        }
        Ok(model)
    }
}

/// `t`, read as `key` from `file`, if every value is finite; else an error naming the file,
/// the key, the first NaN or infinite element (`(row r, col c)` for a matrix, `index i`
/// otherwise) and its value, as `nibble` reports its models' ([`nibble_nn::Error::NonFinite`]):
/// one such value turns every output it touches into NaN. One pass over the values as they
/// are read, before the model holds them.
pub(crate) fn check_finite(file: &std::path::Path, key: &str, t: Tensor) -> Result<Tensor> {
    nibble_nn::error::check_finite(file, key, &t)?;
    Ok(t)
}

/// Every floating-point tensor a quantized checkpoint stores (biases, LayerNorms, bitsandbytes'
/// absmaxes and code maps) must be finite ([`check_finite`]); its integer codes are always
/// values of the format. The parts of nibble's own layouts (`K.q4.norm`, `K.int8.scale`, ...)
/// are not read again: `FrozenWeight::from_checkpoint` checked them as it read them.
fn check_stored_floats_finite(file: &Checkpoint) -> Result<()> {
    const CHECKED_PARTS: [&str; 4] = [
        ".weight.q4.",
        ".weight.nf4.",
        ".weight.int8.",
        ".weight.lower.",
    ];
    for key in file.keys_in_file_order() {
        // bitsandbytes' packed 4-bit codes, stored as bf16 / f16 / f32 elements where a
        // `quant_storage` asked for it (FSDP-QLoRA): bytes of codes, not floats (read as
        // floats, some pairs of codes were "NaN" and the model was refused).
        if CHECKED_PARTS.iter().any(|p| key.contains(p)) || nibble_io::bnb::is_bnb_4bit(file, key) {
            continue;
        }
        if let Some((DType::F32 | DType::F16 | DType::BF16 | DType::F64, _)) = file.info(key) {
            check_finite(file.path(), key, file.tensor_f32(key, None)?)?;
        }
    }
    Ok(())
}

/// Whether `file` holds LoRA adapters the way the reference's `LoRALinear` saves them in its
/// state dict (`<layer>.lora_a.weight`, `<layer>.lora_b.weight`): the first such key.
pub fn state_dict_lora_key(file: &Checkpoint) -> Option<&str> {
    file.keys()
        .find(|k| k.ends_with(".lora_a.weight") || k.ends_with(".lora_b.weight"))
}

/// The adapters of a state dict saved from the reference's `lora` or `qlora` model
/// (`torch.save(net.state_dict())` after training: `<layer>.lora_a.weight` `[r, dim]` and
/// `<layer>.lora_b.weight` `[dim, r]` beside each layer's weight and bias) replace `model`'s
/// seeded ones, at the file's rank; a layer the file gives no adapter keeps its own. Both
/// halves of each adapter with one rank, finite values, and a variant with adapters
/// ([`Variant::has_lora`]) are required: anything else is an error naming the key, and an error
/// leaves `model` as it was.
pub fn load_state_dict_lora(model: &mut BigNet, file: &Checkpoint) -> Result<()> {
    let Some(first) = state_dict_lora_key(file) else {
        return Ok(());
    };
    let bad = |what: String| Error::Model {
        what: format!("{}: {what}", file.path().display()),
    };
    // A model given adapters (`--adapter` attaches them on any variant, as for a PEFT
    // directory) takes them; a variant without any has no place for them.
    if !model.variant().has_lora() && model.linears().any(|l| l.lora.is_none()) {
        return Err(bad(format!(
            "the state dict holds LoRA adapters (`{first}`) that variant {} has no place for; load it as lora or qlora",
            model.variant()
        )));
    }
    let dim = model.dim();
    let mut loaded = Vec::new();
    let mut known = std::collections::HashSet::new();
    for layer in model.linears() {
        let (ka, kb) = (
            format!("{}.lora_a.weight", layer.name),
            format!("{}.lora_b.weight", layer.name),
        );
        known.insert(ka.clone());
        known.insert(kb.clone());
        let (a, b) = match (file.info(&ka), file.info(&kb)) {
            (None, None) => {
                loaded.push(None);
                continue;
            }
            (Some((_, sa)), Some((_, sb))) => (sa.to_vec(), sb.to_vec()),
            (None, Some(_)) => return Err(bad(format!("`{kb}` without `{ka}`"))),
            (Some(_), None) => return Err(bad(format!("`{ka}` without `{kb}`"))),
        };
        let rank = match (&a[..], &b[..]) {
            (&[r, i], &[o, rb]) if i == dim && o == dim && r == rb && r > 0 => r,
            _ => {
                return Err(bad(format!(
                    "`{ka}` {a:?} and `{kb}` {b:?} are not a LoRA pair for a [{dim}, {dim}] layer ([r, {dim}] and [{dim}, r], r > 0)"
                )))
            }
        };
        let mut halves = Vec::with_capacity(2);
        for (key, shape) in [(&ka, [rank, dim]), (&kb, [dim, rank])] {
            let t = file.tensor_f32(key, Some(&shape))?;
            if let Some(i) = t.data().iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("`{key}` element {i} is {}", t.data()[i])));
            }
            halves.push(t);
        }
        let b = halves.pop().expect("two halves");
        let a = halves.pop().expect("two halves");
        loaded.push(Some((a, b)));
    }
    if let Some(stray) = file.keys().find(|k| {
        (k.ends_with(".lora_a.weight") || k.ends_with(".lora_b.weight")) && !known.contains(*k)
    }) {
        return Err(bad(format!(
            "`{stray}` is an adapter of no layer of the model"
        )));
    }
    for (layer, adapter) in model.linears_mut().zip(loaded) {
        if let (Some((a, b)), Some(lora)) = (adapter, layer.lora.as_mut()) {
            let trainable = lora.a.requires_grad();
            lora.a = nibble_autograd::Param::new(lora.a.name(), a, trainable);
            lora.b = nibble_autograd::Param::new(lora.b.name(), b, trainable);
        }
    }
    Ok(())
}

/// The adapters of a state-dict file given as `--adapter` (instead of a PEFT directory): what
/// `torch.save(net.state_dict())` writes for the reference's trained `qlora` model, whose 4-bit
/// buffers PyTorch does not save (`persistent=False`), so its base comes from `--weights`. The
/// file's `<layer>.lora_a.weight` / `lora_b.weight` replace `model`'s adapters (see
/// [`load_state_dict_lora`]; `model` must have adapters); every other tensor it holds must be a
/// parameter of `model` with the value `model` has (the frozen biases and LayerNorms a qlora
/// state dict repeats; a weight compared as the model computes with it), else it is an error
/// naming the key: an adapter file may not change the base. An error leaves `model` as it was.
pub fn load_state_dict_adapters(model: &mut BigNet, file: &Checkpoint) -> Result<()> {
    let bad = |what: String| Error::Model {
        what: format!("{}: {what}", file.path().display()),
    };
    if state_dict_lora_key(file).is_none() {
        return Err(bad(
            "no `<layer>.lora_a.weight` / `lora_b.weight` tensors: not a LoRA state dict (a PEFT adapter is a directory)".into(),
        ));
    }
    let is_adapter = |k: &str| k.ends_with(".lora_a.weight") || k.ends_with(".lora_b.weight");
    // The model's value of a state-dict key, computed only for the keys the file holds (a
    // weight is dequantized for the comparison only where the file repeats it), and whether
    // the model holds it in f16 (the f16 base of half_precision and lora: weights and biases).
    // Also the format of a quantized weight (its value dequantized, not what --weights holds).
    let value_of = |key: &str| -> Result<Option<(Tensor, bool, Option<WeightFormat>)>> {
        let Some((module, name)) = key.rsplit_once('.') else {
            return Ok(None);
        };
        if let Some(layer) = model.linears().find(|l| l.name == module) {
            let format = layer.format();
            let f16 = format == WeightFormat::F16;
            let quantized =
                (!matches!(format, WeightFormat::F32 | WeightFormat::F16)).then_some(format);
            return Ok(match name {
                "weight" => Some((layer.dense_weight_and_bias().0, f16, quantized)),
                "bias" => match layer.bias_values() {
                    Some(b) => Some((Tensor::from_vec(&[b.len()], b)?, f16, None)),
                    None => None,
                },
                _ => None,
            });
        }
        let norm = (0..model.norms().len()).find(|&i| crate::source::norm_key(i) == module);
        Ok(norm.and_then(|i| match name {
            "weight" => Some((model.norms()[i].weight.value().clone(), false, None)),
            "bias" => Some((model.norms()[i].bias.value().clone(), false, None)),
            _ => None,
        }))
    };
    for key in file.keys().filter(|k| !is_adapter(k)) {
        let Some((mine, in_f16, quantized)) = value_of(key)? else {
            return Err(bad(format!(
                "`{key}` is not a parameter of a BigNet of width {}",
                model.dim()
            )));
        };
        let theirs = file.tensor_f32(key, Some(mine.shape()))?;
        // Values are compared at the narrower of the two precisions: a value the model holds
        // in f16 as the model would hold the file's (the reference's qlora state dict repeats
        // the f32 biases of --weights, which the f16 base of lora and half_precision rounds),
        // and a value the file holds in f16 as the file would hold the model's (the
        // reference's lora state dict, f16 biases, over a qlora model's f32 ones).
        let file_f16 = file.info(key).is_some_and(|(d, _)| d == DType::F16);
        let round = |v: f32| half::f16::from_f32(v).to_f32();
        let same = |a: f32, b: f32| match (in_f16, file_f16) {
            (true, _) => round(a).to_bits() == b.to_bits(),
            (false, true) => a.to_bits() == round(b).to_bits(),
            (false, false) => a.to_bits() == b.to_bits(),
        };
        if let Some(i) = theirs
            .data()
            .iter()
            .zip(mine.data())
            .position(|(&a, &b)| !same(a, b))
        {
            let how = if in_f16 {
                " (rounded to f16 as the model holds it)"
            } else if file_f16 {
                " (an f16 value, compared with the model's rounded to f16)"
            } else {
                ""
            };
            let model_has = match quantized {
                Some(format) => format!(
                    "the model computes with {} (its {format} weight dequantized: a file that \
                     repeats a float base can never match a quantized one; load it as \
                     --weights of a quantized variant instead)",
                    mine.data()[i]
                ),
                None => format!("the model (--weights) has {}", mine.data()[i]),
            };
            return Err(bad(format!(
                "`{key}` element {i} is {}{how} where {model_has}: an adapter file may only add LoRA adapters",
                theirs.data()[i]
            )));
        }
    }
    load_state_dict_lora(model, file)
}

/// A state dict may hold LoRA keys besides the model's ([`load_state_dict_lora`] reads them);
/// anything else is an error.
fn check_no_extra_keys(source: &CheckpointSource) -> Result<()> {
    let expected: std::collections::HashSet<String> = crate::source::state_dict_keys(source.dim)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for key in source.checkpoint.keys() {
        let adapter = key.ends_with(".lora_a.weight") || key.ends_with(".lora_b.weight");
        // The parts of a weight in bitsandbytes' 4-bit layout (read through its `weight` key),
        // and an 8-bit one's row scales and layout flag.
        let bnb_part = nibble_io::bnb::part_info(&source.checkpoint, key).is_some()
            || [".SCB", ".weight_format"].iter().any(|part| {
                key.strip_suffix(part).is_some_and(|module| {
                    nibble_io::bnb::is_bnb_8bit(&source.checkpoint, &format!("{module}.weight"))
                })
            });
        if !expected.contains(key) && !adapter && !bnb_part {
            return Err(Error::Model {
                what: format!(
                    "{}: unexpected tensor `{key}` (not part of a BigNet of width {})",
                    source.describe(),
                    source.dim
                ),
            });
        }
    }
    Ok(())
}
