//! Which kernel path runs: detected once at run time (AVX2 + FMA + F16C), overridable with the
//! `NIBBLE_KERNEL=scalar|portable|avx2` environment variable.
//!
//! (Private to this crate until `nibble_tensor::cpu` lands; the semantics are the same.)

use std::sync::OnceLock;

/// A family of kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Plain scalar Rust: the ground truth.
    Scalar,
    /// Portable SIMD on the `wide` crate.
    Portable,
    /// x86-64 AVX2 + FMA + F16C intrinsics.
    Avx2,
}

/// Whether this CPU can run the AVX2 path.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The path in use: the best the CPU has, unless `NIBBLE_KERNEL` forces one (a forced `avx2`
/// on a CPU without it falls back to `portable`). Detected once.
pub fn kernel_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let best = if avx2_available() {
            KernelPath::Avx2
        } else {
            KernelPath::Portable
        };
        match std::env::var("NIBBLE_KERNEL").as_deref() {
            Ok("scalar") => KernelPath::Scalar,
            Ok("portable") => KernelPath::Portable,
            Ok("avx2") if avx2_available() => KernelPath::Avx2,
            Ok("avx2") => KernelPath::Portable,
            _ => best,
        }
    })
}

/// Every path this CPU can run (for tests comparing them).
pub fn available_paths() -> Vec<KernelPath> {
    let mut v = vec![KernelPath::Scalar, KernelPath::Portable];
    if avx2_available() {
        v.push(KernelPath::Avx2);
    }
    v
}

/// `path`, downgraded to one this CPU can run.
#[inline]
pub(crate) fn usable(path: KernelPath) -> KernelPath {
    if path == KernelPath::Avx2 && !avx2_available() {
        KernelPath::Portable
    } else {
        path
    }
}
