//! # nibble-bignet
//!
//! BigNet checkpoints and models. [`checkpoint`] reads safetensors files and PyTorch `.pth`
//! archives (memory-mapped, validated against hostile input) and writes safetensors.

pub mod checkpoint;
pub mod error;
pub use error::{Error, Result};
