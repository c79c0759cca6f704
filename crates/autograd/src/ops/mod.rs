//! Ops with gradients. Each file holds forwards (methods on [`Tape`](crate::Tape)) next to the
//! small structs that hold their backwards.

pub mod cross_entropy;
pub mod elementwise;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
pub mod loss;

pub use linear::Bias;
