#![warn(missing_docs)]
//! # nibble-nn
//!
//! Layers any model can use, built from state dicts ([`nibble_io`]): a [`Linear`] in any weight
//! format with an optional LoRA adapter, [`LayerNorm`], [`Activation`]s (ReLU, exact GELU),
//! softmax [`cross_entropy`], a [`Sequential`] read from a PyTorch `nn.Sequential` state dict,
//! tensors fetched by name prefix ([`VarBuilder`]) and PEFT adapters saved and loaded for any
//! set of target modules ([`peft`]).

pub mod activation;
pub mod error;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod peft;
pub mod sequential;
pub mod var_builder;

pub use activation::Activation;
pub use error::{Error, Result};
pub use layer_norm::LayerNorm;
pub use linear::{FrozenBias, Linear, LinearBase, LoraAdapter};
pub use loss::cross_entropy;
pub use sequential::{Layer, Sequential, SequentialOptions};
pub use var_builder::VarBuilder;
