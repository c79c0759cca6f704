#![warn(missing_docs)]
//! # nibble
//!
//! A pure-Rust CPU tensor engine for low-memory inference and fine-tuning. This crate re-exports
//! the workspace's member crates:
//!
//! - [`tensor`]: the tensor type, f32/f16 storage, elementwise ops, LayerNorm, the GEMM.
//! - [`autograd`]: the tape, backward, SGD and AdamW.
//! - [`quant`]: quantized formats and fused dequant-matmul kernels.
//! - [`io`]: state dicts: safetensors and `.pth` readers, the writer, quantized checkpoints.
//! - [`nn`]: generic layers (Linear in any format with LoRA, LayerNorm, activations,
//!   Sequential) and PEFT adapters.
//! - [`bignet`]: the BigNet model in every variant, checkpoints and the `bignet` program.

pub use nibble_autograd as autograd;
pub use nibble_bignet as bignet;
pub use nibble_io as io;
pub use nibble_nn as nn;
pub use nibble_quant as quant;
pub use nibble_tensor as tensor;
