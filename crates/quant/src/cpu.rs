//! Which kernel path runs: the tensor crate's run-time dispatch ([`nibble_tensor::cpu`]),
//! re-exported so that every quant kernel follows the same `NIBBLE_KERNEL=scalar|portable|avx2|avx512`
//! choice as the GEMM, GEMV and f16 kernels it feeds.

pub use nibble_tensor::cpu::{
    detected_path, has_avx2_fma_f16c, has_avx512, kernel_path, KernelPath,
};

/// Whether this CPU can run the AVX2 path (AVX2 + FMA + F16C).
pub fn avx2_available() -> bool {
    has_avx2_fma_f16c()
}

/// Every path this CPU can run (for tests comparing them).
pub fn available_paths() -> Vec<KernelPath> {
    let mut v = vec![KernelPath::Scalar, KernelPath::Portable];
    if has_avx2_fma_f16c() {
        v.push(KernelPath::Avx2Fma);
    }
    if has_avx512() {
        v.push(KernelPath::Avx512);
    }
    v
}

/// `path`, downgraded to one this CPU can run ([`KernelPath::supported`]).
#[inline]
pub(crate) fn usable(path: KernelPath) -> KernelPath {
    path.supported()
}

/// Whether `path` (from [`usable`]) is one of the x86 SIMD tiers, AVX2 or AVX-512 (the
/// AVX-512 tier implies AVX2, FMA and F16C, so it may also run any AVX2 kernel).
#[inline]
pub(crate) fn is_x86_simd(path: KernelPath) -> bool {
    matches!(path, KernelPath::Avx2Fma | KernelPath::Avx512)
}
