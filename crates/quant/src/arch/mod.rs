//! The kernel tiers, one module each: a tier implements the kernels of every format side by
//! side (as ggml keeps `ggml-cpu/arch/x86` apart from `ggml-quants.c`), so adding a tier is
//! adding a module here. The format modules (`q4`, `nf4`, `lower`, `int8`) keep the block
//! layout, the scalar reference (`*_ref`) and the tier-independent logic, and dispatch to these.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod portable;
