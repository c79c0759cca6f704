//! Opens what the user points at: a checkpoint (`.pth` or `.safetensors`, f32 or f16 state
//! dicts) or nothing (seeded init), and builds the requested variant from it.

use crate::adapter::load_adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::BigNet;
use crate::persist::{load_quantized, quantized_format};
use crate::source::{SeededInit, WeightSource, DEFAULT_DIM};
use crate::variant::Variant;
use nibble_tensor::Tensor;
use std::path::PathBuf;

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
        let (_, shape) = checkpoint.info(key).ok_or_else(|| Error::Model {
            what: format!(
                "{}: no tensor `{key}`: not a BigNet state dict (keys: {})",
                path.display(),
                checkpoint.keys().take(5).collect::<Vec<_>>().join(", ")
            ),
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
        Ok(self.checkpoint.tensor_f32(key, Some(shape))?)
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
                let file = Checkpoint::open(path)?;
                match quantized_format(&file)? {
                    Some(format) => load_quantized(&file, format, self.variant, self.seed),
                    None => {
                        let source = CheckpointSource::new(file)?;
                        check_no_extra_keys(&source)?;
                        BigNet::build(self.variant, &source, self.seed)
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

/// A state dict may hold LoRA keys besides the model's; anything else is an error.
fn check_no_extra_keys(source: &CheckpointSource) -> Result<()> {
    let expected: std::collections::HashSet<String> = crate::source::state_dict_keys(source.dim)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for key in source.checkpoint.keys() {
        if !expected.contains(key) && !key.contains(".lora_") {
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
