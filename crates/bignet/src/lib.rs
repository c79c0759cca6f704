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

#[path = "bignet_adapter.rs"]
pub mod adapter;
pub mod cli;
pub mod error;
/// The allocator settings of the programs (`nibble_tensor::heap`; re-exported for callers of
/// `nibble_bignet::heap`).
pub use nibble_tensor::heap;
pub mod infer;
pub mod loader;
pub mod memory;
pub mod merge;
pub mod model;
pub mod persist;
pub mod source;
pub mod train;
pub mod variant;

/// Checkpoint files: safetensors and PyTorch `.pth`. The readers and the writer live in
/// [`nibble_io::checkpoint`]; this module keeps their old paths.
pub mod checkpoint {
    pub use nibble_io::checkpoint::*;
}

/// Frozen weights in every storage format and their quantized-checkpoint layout. They live in
/// [`nibble_io::frozen`]; this module keeps their old paths.
pub mod frozen {
    pub use nibble_io::frozen::*;
}

/// BigNet's linear layer in every variant: the generic [`nibble_nn::Linear`] (trainable f32, or
/// a frozen weight of any storage, with an optional LoRA adapter). This is the only place
/// variants differ; the layer lives in [`nibble_nn::linear`], and this module keeps its old
/// paths.
pub mod layer {
    pub use nibble_nn::linear::*;
}

pub use error::{Error, Result};
pub use model::BigNet;
pub use variant::{Variant, WeightFormat};
