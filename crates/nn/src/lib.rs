#![warn(missing_docs)]
//! # nibble-nn
//!
//! Layers any model can use, built from state dicts ([`nibble_io`]). A downstream model: open
//! a PyTorch state dict, build its layers by name prefix in the format each should have, add
//! LoRA, train a step, save the adapter (PEFT loads it) and the quantized weights.
//!
//! ```
//! use nibble_autograd::{AdamW, AdamWConfig, Optimizer, Tape, Var};
//! use nibble_io::{Checkpoint, WeightFormat};
//! use nibble_nn::{cross_entropy, peft, save_weights, Activation, LayerNorm, Linear, VarBuilder};
//! use nibble_tensor::{Rng, Tensor};
//!
//! struct Classifier { fc1: Linear, norm: LayerNorm, fc2: Linear, head: Linear }
//!
//! impl Classifier {
//!     fn forward(&self, tape: &Tape, x: &Var) -> nibble_nn::Result<Var> {
//!         let h = Activation::Gelu.forward(tape, &self.fc1.forward(tape, x)?)?;
//!         let h = self.norm.forward(tape, &h)?;
//!         let h = Activation::Relu.forward(tape, &self.fc2.forward(tape, &h)?)?;
//!         self.head.forward(tape, &h)
//!     }
//! }
//!
//! let file = Checkpoint::open("../../tests/data/seq_d30.safetensors")?; // keys model.0.weight, ...
//! let vb = VarBuilder::new(&file).pp("model");
//! let mut m = Classifier {
//!     fc1: vb.pp("0").linear(WeightFormat::Int8)?, // [48, 30], 8-bit
//!     norm: vb.pp("2").layer_norm()?,
//!     fc2: vb.pp("3").linear(WeightFormat::Q4)?, // [48, 48], 4-bit
//!     head: vb.pp("5").linear(WeightFormat::F16)?,
//! };
//! for p in m.norm.params() { p.set_requires_grad(false) } // only the adapters train
//! let mut params = Vec::new();
//! for (i, layer) in [&mut m.fc1, &mut m.fc2, &mut m.head].into_iter().enumerate() {
//!     layer.add_lora(4, &mut Rng::fork(0, i as u64))?;
//!     params.extend(layer.params().into_iter().filter(|p| p.requires_grad()));
//! }
//! let mut opt = AdamW::new(params, AdamWConfig { lr: 1e-2, ..Default::default() })?;
//! let (x, labels) = (Tensor::randn(&[8, 30], &mut Rng::new(1)), [0, 1, 2, 3, 4, 0, 1, 2]);
//! let tape = Tape::new();
//! let loss = cross_entropy(&tape, &m.forward(&tape, &Var::constant(x))?, &labels)?;
//! tape.backward(&loss)?;
//! opt.step()?;
//! let dir = std::env::temp_dir().join(format!("nibble-nn-doc-{}", std::process::id()));
//! peft::save_adapter([&m.fc1, &m.fc2, &m.head], &dir.join("adapter"))?; // modules model.0, ...
//! save_weights(&dir.join("model.safetensors"), [&m.fc1, &m.fc2, &m.head], [&m.norm])?;
//! let saved = Checkpoint::open(dir.join("model.safetensors"))?;
//! assert!(saved.info("model.3.weight.q4.packed").is_some()); // read back as stored, no copy
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The pieces: a [`Linear`] in any weight format with an optional LoRA adapter,
//! [`LayerNorm`], [`Activation`]s (ReLU, exact GELU), softmax [`cross_entropy`], a
//! [`Sequential`] read whole from a PyTorch `nn.Sequential` state dict, tensors fetched by name
//! prefix ([`VarBuilder`]), weights saved with [`save_weights`], and PEFT adapters saved and
//! loaded for any set of target modules ([`peft`]).

pub mod activation;
pub mod batch_norm;
pub mod error;
pub mod layer_norm;
pub mod layout;
pub mod linear;
pub mod loss;
pub mod peft;
pub mod prelu;
pub mod save;
pub mod sequential;
pub mod var_builder;

pub use activation::Activation;
pub use batch_norm::BatchNorm;
pub use error::{Error, Result};
pub use layer_norm::{LayerNorm, NormKind};
pub use linear::{Dora, FrozenBias, Linear, LinearBase, LoraAdapter};
pub use loss::cross_entropy;
pub use prelu::PRelu;
pub use save::{save_weights, save_weights_with};
pub use sequential::{Layer, Sequential, SequentialOptions};
pub use var_builder::VarBuilder;
