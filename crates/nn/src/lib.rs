#![warn(missing_docs)]
//! # nibble-nn
//!
//! Layers any model can use, built from state dicts ([`nibble_io`]): a [`Linear`] in any weight
//! format with an optional LoRA adapter, and PEFT adapters saved and loaded for any set of
//! target modules ([`peft`]).

pub mod error;
pub mod linear;
pub mod peft;

pub use error::{Error, Result};
pub use linear::{FrozenBias, Linear, LinearBase, LoraAdapter};
