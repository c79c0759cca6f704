#![warn(missing_docs)]
//! # nibble-quant
//!
//! Quantized weight matrices for nibble, each a [`nibble_tensor::WeightMatrix`]:
//!
//! | type | format | bits / weight |
//! | --- | --- | --- |
//! | [`Q4Matrix`] | the reference's 4-bit absmax blocks of 16 (f16 norm) | 5.0 |
//! | [`Q4FlatMatrix`] | the same blocks over the flattened weight (widths not a multiple of 16) | 5.0 |
//! | [`Nf4Matrix`] | bitsandbytes' NF4, blocks of 64 (f32 absmax) | 4.5 |
//! | [`Nf4Matrix`] (double-quantized) | NF4 + 8-bit dynamic-map absmax codes | ≈ 4.127 |
//! | [`Int8Matrix`] | per-row affine int8 (f32 scale and zero point) | 8 + 64/in |
//! | [`LowerMatrix`] | mixed 3/4-bit rows, MSE-fitted scale+min per group of 128 | ≈ 3.9 |
//!
//! Every format stores its arrays in [`Bytes`] (owned, or borrowed from a shared buffer such as a
//! memory-mapped file), can be built by `quantize(&Tensor)` or from raw parts by `from_parts`,
//! and hands its raw part bytes back for writing files.
//!
//! Kernels: each format has a plain scalar `*_ref` quantize/dequantize (the ground truth), and
//! SIMD versions chosen at run time by [`cpu::kernel_path`]. A tier is a file: `src/arch/`
//! holds one module per tier (portable on [`wide`], AVX2, AVX-512 via `std::arch`), each with
//! the kernels of every format side by side; the format modules keep the layout, the
//! reference and the dispatch. The forward product is a fused GEMV straight from the packed bytes for
//! small batches, and for batches of 16 or more a [`nibble_tensor::gemm::PackB`] that
//! dequantizes only the panel the GEMM asks for; the backward product `dX = dY·W` packs panels
//! of `W` itself the same way.

#![allow(
    clippy::manual_is_multiple_of,
    clippy::needless_range_loop,
    clippy::too_many_arguments
)]

pub mod act8;
mod arch;
pub mod bytes;
pub mod cpu;
pub mod error;
pub mod int8;
mod kernels;
pub mod lower;
pub mod nf4;
#[cfg(test)]
mod panel_tests;
pub mod q4;
pub mod q4_flat;

pub use bytes::Bytes;
pub use cpu::KernelPath;
pub use int8::Int8Matrix;
pub use lower::LowerMatrix;
pub use nf4::Nf4Matrix;

pub use error::{QuantError, Result};

pub use q4::Q4Matrix;
pub use q4_flat::Q4FlatMatrix;
