#![warn(missing_docs)]
//! # nibble-tensor
//!
//! The f32 [`Tensor`], f16 weight storage ([`HalfTensor`]), elementwise ops, row-wise
//! [`layer_norm`], and a hand-written, BLIS-shaped [`gemm`](gemm::gemm) behind the linear layer's
//! three products ([`linear`], [`linear_backward_input`], [`linear_backward_weight`]).

pub mod buffer;
pub mod cpu;
pub mod error;
pub mod gemm;
pub mod group_norm;
pub mod half_tensor;
pub mod heap;
pub mod hot_team;
pub mod layernorm;
pub mod lowrank;
pub mod machine;
pub mod ops;
pub mod packed;
pub mod parallel;
pub mod rms_norm;
pub mod rng;
pub mod simd;
pub mod team;
pub mod tensor;
#[cfg(test)]
mod test_support;
pub mod weight;

pub use error::{Result, TensorError};
pub use group_norm::{group_norm, group_norm_backward};
pub use half::f16;
pub use half_tensor::HalfTensor;
pub use layernorm::{layer_norm, layer_norm_backward, LayerNormStats};
pub use packed::PackedWeight;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rng::Rng;
pub use tensor::{Tensor, TensorView};
pub use weight::{
    linear, linear_backward_input, linear_backward_weight, linear_low_rank_into, WeightMatrix,
};
