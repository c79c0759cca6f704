//! Runtime CPU feature dispatch for the numeric kernels.
//!
//! The crate is compiled for the baseline target (no `target-cpu=native`), so SIMD kernels are
//! `#[target_feature]` functions selected at run time. [`kernel_path`] detects the CPU once and
//! caches the answer; every kernel family (GEMM, GEMV, f16 conversion, and the quant crate's
//! dequantizers) asks it which implementation to run.
//!
//! The environment variable `NIBBLE_KERNEL` forces a path: `scalar`, `portable`, `avx2` or
//! `avx512`. Forcing a tier the CPU lacks is refused (it would be undefined behaviour): detection
//! wins and a one-line warning goes to stderr, as for an unknown value.
//!
//! Tiers nest: a CPU with the AVX-512 tier also has the AVX2 one, so a kernel family without
//! 512-bit code runs its AVX2 kernels on [`KernelPath::Avx512`] (see [`KernelPath::at_most_avx2`]).

use std::sync::OnceLock;

/// Which implementation family the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// x86-64 AVX-512 (F, BW, VL) + FMA + F16C intrinsics: 512-bit kernels where a family has
    /// them, the AVX2 kernels elsewhere.
    Avx512,
    /// x86-64 AVX2 + FMA + F16C intrinsics (`std::arch`), the fast path.
    Avx2Fma,
    /// Portable SIMD through the `wide` crate (`f32x8`), compiled for the baseline target.
    Portable,
    /// Plain scalar Rust: the reference implementation.
    Scalar,
}

impl KernelPath {
    /// The path's name as accepted by `NIBBLE_KERNEL` (`"avx512"`, `"avx2"`, `"portable"`,
    /// `"scalar"`).
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx512 => "avx512",
            KernelPath::Avx2Fma => "avx2",
            KernelPath::Portable => "portable",
            KernelPath::Scalar => "scalar",
        }
    }

    /// `self`, or the best lower tier this CPU has: [`KernelPath::Avx512`] falls back to
    /// [`KernelPath::Avx2Fma`] without AVX-512 F/BW/VL, and [`KernelPath::Avx2Fma`] to
    /// [`KernelPath::Portable`] without AVX2, FMA or F16C. Every kernel entry point runs its
    /// path through this, so asking for a tier the CPU lacks is safe.
    pub fn supported(self) -> KernelPath {
        match self {
            KernelPath::Avx512 if !has_avx512() => KernelPath::Avx2Fma.supported(),
            KernelPath::Avx2Fma if !has_avx2_fma_f16c() => KernelPath::Portable,
            p => p,
        }
    }

    /// [`supported`](Self::supported), with [`KernelPath::Avx512`] mapped to
    /// [`KernelPath::Avx2Fma`]: the path for a kernel family that has no 512-bit code.
    pub fn at_most_avx2(self) -> KernelPath {
        match self.supported() {
            KernelPath::Avx512 => KernelPath::Avx2Fma,
            p => p,
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

/// True if the CPU is an AMD one (or a Hygon, whose cores are AMD Zen), from CPUID leaf 0's
/// vendor string. The batch-1 GEMVs pick their default weight prefetch by it: `prefetchnta`
/// on AMD, where it leaves the caches to activations, and `prefetcht0` (or the hardware
/// prefetcher) on Intel Xeons, where lines fetched with `prefetchnta` did not stay in L3 and
/// every forward read its weights from DRAM again (see `nibble_quant::cpu::default_quant_prefetch`).
pub fn is_amd() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // The vendor string is EBX, EDX, ECX: "AuthenticAMD" or "HygonGenuine".
            let v = std::arch::x86_64::__cpuid(0);
            let vendor = (v.ebx, v.edx, v.ecx);
            vendor == (0x6874_7541, 0x6974_6E65, 0x444D_4163)
                || vendor == (0x6F67_7948, 0x6E65_476E, 0x656E_6975)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// True if the CPU running this process has the AVX-512 tier: AVX-512 F, BW and VL, plus AVX2,
/// FMA and F16C (checked once, then cached).
pub fn has_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2_fma_f16c()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Every path this CPU can run, best first (for tests and benchmarks comparing them).
pub fn available_paths() -> Vec<KernelPath> {
    [
        KernelPath::Avx512,
        KernelPath::Avx2Fma,
        KernelPath::Portable,
        KernelPath::Scalar,
    ]
    .into_iter()
    .filter(|p| p.supported() == *p)
    .collect()
}

/// The tiers this CPU lacks, as `NIBBLE_KERNEL` names (for tests that must say what they
/// skipped).
pub fn missing_paths() -> Vec<&'static str> {
    [KernelPath::Avx512, KernelPath::Avx2Fma]
        .into_iter()
        .filter(|p| p.supported() != *p)
        .map(KernelPath::name)
        .collect()
}

/// The best path this CPU supports, ignoring `NIBBLE_KERNEL`.
pub fn detected_path() -> KernelPath {
    if has_avx512() {
        KernelPath::Avx512
    } else if has_avx2_fma_f16c() {
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
                "avx512" if has_avx512() => KernelPath::Avx512,
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
