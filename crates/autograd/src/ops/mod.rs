//! Ops with gradients. Each file holds forwards (methods on [`Tape`](crate::Tape)) next to the
//! small structs that hold their backwards.

pub mod checkpoint;
pub mod cross_entropy;
pub mod elementwise;
pub mod gelu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod prelu;
pub mod rms_norm;
pub mod scale_shift;
pub mod unary;

pub use linear::Bias;
pub use unary::{Coef, UnaryFn};
