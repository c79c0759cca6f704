#![warn(missing_docs)]
//! # nibble-io
//!
//! State dicts on disk, for any model: memory-mapped safetensors and PyTorch `.pth` readers
//! ([`Checkpoint`]), the safetensors writer ([`write_safetensors`]), the weight formats
//! ([`WeightFormat`]) and frozen weights in every format with their quantized-checkpoint parts
//! ([`FrozenWeight::parts`], [`FrozenWeight::from_checkpoint`]), for any key names and shapes,
//! and bitsandbytes' 4-bit layout read as NF4 ([`bnb`]).
//!
//! Every reader validates what it hands out: a hostile file gives an [`Error`] naming the file,
//! key and expected / found shape or dtype, never a panic or an allocation sized by a header.

pub mod bnb;
pub mod checkpoint;
pub mod dataset;
pub mod error;
pub mod format;
pub mod frozen;

pub use checkpoint::{
    refuse_non_regular, replace_file, write_safetensors, Checkpoint, DType, PICKLED_MODULES_KEY,
};
pub use dataset::{Dataset, Split};
pub use error::{Error, Result};
pub use format::{WeightFormat, FORMAT_KEY};
pub use frozen::FrozenWeight;
