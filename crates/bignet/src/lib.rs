#![warn(missing_docs)]
//! # nibble-bignet
//!
//! BigNet (6 residual blocks of three linear layers, LayerNorms between blocks) in every
//! memory-saving form — f32, f16, LoRA, 4-bit, QLoRA, under-4-bit, NF4, int8 — with PyTorch
//! checkpoint loading (`.pth` and `.safetensors`), PEFT-layout adapters, the homework grader's
//! fit task, and the `bignet` command-line program ([`cli`]).
//!
//! ```no_run
//! use nibble_bignet::{loader::ModelSpec, Variant};
//! let model = ModelSpec::seeded(Variant::Qlora, 0).build()?;
//! let x = nibble_tensor::Tensor::zeros(&[1, 1024]);
//! let y = model.infer(&x)?;
//! assert_eq!(y.shape(), &[1, 1024]);
//! # Ok::<(), nibble_bignet::Error>(())
//! ```

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod error;
pub mod frozen;
pub mod heap;
pub mod infer;
pub mod layer;
pub mod loader;
pub mod memory;
pub mod merge;
pub mod model;
pub mod persist;
pub mod source;
pub mod train;
pub mod variant;

pub use error::{Error, Result};
pub use model::BigNet;
pub use variant::{Variant, WeightFormat};
