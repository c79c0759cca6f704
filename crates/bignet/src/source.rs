//! Where a model's weights come from: a checkpoint file, or PyTorch's default initialisation
//! from a seed. Both hand out tensors by PyTorch state-dict key.

use crate::error::{Error, Result};
use nibble_tensor::{Rng, Tensor};

/// Number of residual blocks in BigNet.
pub const BLOCKS: usize = 6;
/// Linear layers per block.
pub const LAYERS_PER_BLOCK: usize = 3;
/// BigNet's default width.
pub const DEFAULT_DIM: usize = 1024;

/// State-dict name of linear layer `layer` (0..3) of block `block` (0..6): `model.{2b}.model.{2l}`.
pub fn linear_key(block: usize, layer: usize) -> String {
    format!("model.{}.model.{}", 2 * block, 2 * layer)
}

/// State-dict name of the LayerNorm after block `block` (0..5): `model.{2b+1}`.
pub fn norm_key(block: usize) -> String {
    format!("model.{}", 2 * block + 1)
}

/// Every key of a BigNet state dict, in model order, with its shape at width `dim`.
pub fn state_dict_keys(dim: usize) -> Vec<(String, Vec<usize>)> {
    let mut keys = Vec::new();
    for b in 0..BLOCKS {
        for l in 0..LAYERS_PER_BLOCK {
            let k = linear_key(b, l);
            keys.push((format!("{k}.weight"), vec![dim, dim]));
            keys.push((format!("{k}.bias"), vec![dim]));
        }
        if b + 1 < BLOCKS {
            let k = norm_key(b);
            keys.push((format!("{k}.weight"), vec![dim]));
            keys.push((format!("{k}.bias"), vec![dim]));
        }
    }
    keys
}

/// A source of f32 tensors by state-dict key.
pub trait WeightSource {
    /// Model width.
    fn dim(&self) -> usize;
    /// The tensor called `key`, which must have `shape`.
    fn tensor(&self, key: &str, shape: &[usize]) -> Result<Tensor>;
    /// A short description for messages (a file path, or "seeded init (seed 0)").
    fn describe(&self) -> String;
}

/// PyTorch's default initialisation, reproducible from a seed: linear weights and biases
/// uniform in ±1/√in, LayerNorm weight 1 and bias 0. Each key draws from its own stream, so a
/// tensor does not depend on which others were asked for.
#[derive(Debug, Clone)]
pub struct SeededInit {
    /// Model width.
    pub dim: usize,
    /// The seed.
    pub seed: u64,
}

impl WeightSource for SeededInit {
    fn dim(&self) -> usize {
        self.dim
    }

    fn tensor(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let stream = state_dict_keys(self.dim)
            .iter()
            .position(|(k, _)| k == key)
            .ok_or_else(|| Error::Model {
                what: format!("seeded init has no tensor `{key}`"),
            })?;
        let is_norm = (0..BLOCKS - 1).any(|b| key.starts_with(&format!("{}.", norm_key(b))));
        if is_norm {
            let v = if key.ends_with(".weight") { 1.0 } else { 0.0 };
            return Ok(Tensor::from_fn(shape, |_| v)?);
        }
        let bound = 1.0 / (self.dim as f32).sqrt();
        let mut rng = Rng::fork(self.seed, stream as u64);
        // (`Tensor::uniform`'s values; a width beyond memory is an error, not a panic.)
        Ok(Tensor::from_fn(shape, |_| rng.uniform(-bound, bound))?)
    }

    fn describe(&self) -> String {
        format!("seeded init (seed {})", self.seed)
    }
}
