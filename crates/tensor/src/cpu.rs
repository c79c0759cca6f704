//! Runtime CPU feature dispatch for the numeric kernels.
//!
//! The crate is compiled for the baseline target (no `target-cpu=native`), so SIMD kernels are
//! `#[target_feature]` functions selected at run time. [`kernel_path`] detects the CPU once and
//! caches the answer; every kernel family (GEMM, GEMV, f16 conversion, and the quant crate's
//! dequantizers) asks it which implementation to run.
//!
//! The environment variable `NIBBLE_KERNEL` forces a path: `scalar`, `portable` or `avx2`.
//! Forcing `avx2` on a CPU without AVX2/FMA/F16C is refused (it would be undefined behaviour):
//! detection wins and a one-line warning goes to stderr, as for an unknown value.

use std::sync::OnceLock;

/// Which implementation family the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// x86-64 AVX2 + FMA + F16C intrinsics (`std::arch`), the fast path.
    Avx2Fma,
    /// Portable SIMD through the `wide` crate (`f32x8`), compiled for the baseline target.
    Portable,
    /// Plain scalar Rust: the reference implementation.
    Scalar,
}

impl KernelPath {
    /// The path's name as accepted by `NIBBLE_KERNEL` (`"avx2"`, `"portable"`, `"scalar"`).
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx2Fma => "avx2",
            KernelPath::Portable => "portable",
            KernelPath::Scalar => "scalar",
        }
    }

    /// `self`, or [`KernelPath::Portable`] if `self` is [`KernelPath::Avx2Fma`] and this CPU
    /// lacks AVX2, FMA or F16C. Every kernel entry point runs its path through this, so asking
    /// for AVX2 on a CPU without it is safe.
    pub fn supported(self) -> KernelPath {
        if self == KernelPath::Avx2Fma && !has_avx2_fma_f16c() {
            KernelPath::Portable
        } else {
            self
        }
    }
}

/// True if the CPU running this process has AVX2, FMA and F16C (checked once, then cached).
pub fn has_avx2_fma_f16c() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
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
    })
}

/// The best path this CPU supports, ignoring `NIBBLE_KERNEL`.
pub fn detected_path() -> KernelPath {
    if has_avx2_fma_f16c() {
        KernelPath::Avx2Fma
    } else {
        KernelPath::Portable
    }
}

/// The path the kernels use in this process: `NIBBLE_KERNEL` if set to a supported value,
/// else the best the CPU supports. Decided on the first call and cached for the process.
///
/// ```
/// use nibble_tensor::cpu::{kernel_path, KernelPath};
/// let p = kernel_path();
/// assert_eq!(p, kernel_path()); // stable for the whole process
/// assert_eq!(p.supported(), p);
/// # let _ = KernelPath::Scalar;
/// ```
pub fn kernel_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let detected = detected_path();
        match std::env::var("NIBBLE_KERNEL") {
            Err(_) => detected,
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" => detected,
                "scalar" => KernelPath::Scalar,
                "portable" => KernelPath::Portable,
                "avx2" if has_avx2_fma_f16c() => KernelPath::Avx2Fma,
                other => {
                    eprintln!(
                        "nibble: NIBBLE_KERNEL={other:?} is unknown or unsupported on this CPU; \
                         using {}",
                        detected.name()
                    );
                    detected
                }
            },
        }
    })
}
