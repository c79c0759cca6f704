//! # nibble-bignet
pub mod error;
pub mod layer;
pub mod memory;
pub mod model;
pub mod quantize;
pub mod source;
pub mod train;
pub mod variant;
pub use error::{Error, Result};
pub use model::BigNet;
pub use variant::{Variant, WeightFormat};
