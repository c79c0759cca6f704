//! Which kernel path runs: the tensor crate's run-time dispatch ([`nibble_tensor::cpu`]),
//! re-exported so that every quant kernel follows the same `NIBBLE_KERNEL=scalar|portable|avx2|avx512`
//! choice as the GEMM, GEMV and f16 kernels it feeds.

pub use nibble_tensor::cpu::{
    detected_path, has_avx2_fma_f16c, has_avx512, is_amd, kernel_path, KernelPath,
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

/// How the quantized formats' batch-1 GEMVs prefetch their weight rows, one 4-row sweep
/// ahead (`NIBBLE_QUANT_PREFETCH=nta|t0|off`, read once per process; every choice gives the
/// same sums). A knob for CPUs whose caches differ: `prefetchnta` keeps a stream read once
/// per forward out of the outer caches, which on the 2-core Zen 3 leaves them to the
/// activations and LoRA adapters, while on Intel Xeons it sends every forward's weights back
/// to DRAM (see [`default_quant_prefetch`] for what each measured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantPrefetch {
    /// `prefetchnta` one sweep ahead.
    Nta,
    /// `prefetcht0` one sweep ahead.
    T0,
    /// No software prefetch: the hardware prefetchers alone.
    Off,
}

impl QuantPrefetch {
    /// The name `NIBBLE_QUANT_PREFETCH` takes.
    pub fn name(self) -> &'static str {
        match self {
            QuantPrefetch::Nta => "nta",
            QuantPrefetch::T0 => "t0",
            QuantPrefetch::Off => "off",
        }
    }
}

/// The weight prefetch of the batch-1 quantized GEMVs ([`QuantPrefetch`]): `NIBBLE_QUANT_PREFETCH`
/// where set to `nta`, `t0` or `off` (any other value is reported on stderr and the default
/// kept), else [`default_quant_prefetch`] for this CPU.
pub fn quant_prefetch() -> QuantPrefetch {
    static MODE: std::sync::OnceLock<QuantPrefetch> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let default = default_quant_prefetch();
        let Ok(v) = std::env::var("NIBBLE_QUANT_PREFETCH") else {
            return default;
        };
        match v.trim() {
            "nta" => QuantPrefetch::Nta,
            "t0" => QuantPrefetch::T0,
            "off" => QuantPrefetch::Off,
            _ => {
                eprintln!(
                    "nibble: NIBBLE_QUANT_PREFETCH={v:?} is not nta, t0 or off; using the default ({})",
                    default.name()
                );
                default
            }
        }
    })
}

/// The default [`QuantPrefetch`]: `nta` on AMD CPUs (and Hygon's, which are Zen cores), `t0`
/// elsewhere. Measured:
/// * the 2-core Zen 3 (an earlier session): BigNet qlora at batch 1 with int8 activations
///   1.34 → 1.10 ms when `prefetchnta` came in;
/// * the 16-core Xeon (16 threads, 2026-12-04 02:04 UTC, two rounds): within the noise, t0 ahead
///   if anything: one Q4 1024² layer at batch 1 with int8 activations 22.4–23.6 µs (nta), 20.8–22.6
///   (off), 18.2–22.4 (t0); BigNet low_precision / qlora at batch 1 0.333–0.349 / 0.415–0.442 ms
///   (nta), 0.293–0.329 / 0.399–0.469 (off), 0.290–0.317 / 0.415–0.451 (t0);
/// * a 2-core Intel Xeon with AVX-512, VNNI and AMX (2 threads, 2026-12-04 23:30 UTC, `bignet
///   bench --batch 1 --runs 31`, nta / t0 / off / t0 / nta in turns, medians): low_precision
///   1.33 / 0.66 / 0.75 / 0.66 / 1.27 ms, qlora 1.41 / 0.74 / 0.78 / 0.81 / 1.32; with int8
///   activations 0.80 / 0.32 / 0.36 / 0.31 / 0.83 and 0.98 / 0.38 / 0.46 / 0.40 / 0.94. There the
///   10.6 MB of Q4 weights outgrow the two 2 MiB L2s but sit in its L3, and lines fetched with
///   `prefetchnta` do not stay there: every forward read them from DRAM again.
pub fn default_quant_prefetch() -> QuantPrefetch {
    if is_amd() {
        QuantPrefetch::Nta
    } else {
        QuantPrefetch::T0
    }
}

/// How far ahead, in rows of W, the batch-1 quantized GEMVs prefetch ([`prefetch_weights`]):
/// one sweep of their 4-row kernels.
pub(crate) const PREFETCH_ROWS: usize = 4;

/// A [`QuantPrefetch`] fixed at compile time, for inner loops that should neither branch on
/// the mode nor keep a prefetch address per row in registers: a kernel generic over the hint
/// is instantiated once per mode and chosen once per call ([`QuantPrefetch`] `match`).
#[cfg(target_arch = "x86_64")]
pub(crate) trait PrefetchHint {
    /// Prefetches the cache line at `p` (never faults).
    fn line(p: *const u8);
}

/// [`QuantPrefetch::T0`] as a [`PrefetchHint`].
#[cfg(target_arch = "x86_64")]
pub(crate) struct HintT0;
/// [`QuantPrefetch::Nta`] as a [`PrefetchHint`].
#[cfg(target_arch = "x86_64")]
pub(crate) struct HintNta;
/// [`QuantPrefetch::Off`] as a [`PrefetchHint`].
#[cfg(target_arch = "x86_64")]
pub(crate) struct HintOff;

#[cfg(target_arch = "x86_64")]
impl PrefetchHint for HintT0 {
    #[inline(always)]
    fn line(p: *const u8) {
        prefetch_weights(QuantPrefetch::T0, p)
    }
}
#[cfg(target_arch = "x86_64")]
impl PrefetchHint for HintNta {
    #[inline(always)]
    fn line(p: *const u8) {
        prefetch_weights(QuantPrefetch::Nta, p)
    }
}
#[cfg(target_arch = "x86_64")]
impl PrefetchHint for HintOff {
    #[inline(always)]
    fn line(_: *const u8) {}
}

/// Prefetches the cache line at `p` as `mode` says (never faults: `p` may lie past the data).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_weights(mode: QuantPrefetch, p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_NTA, _MM_HINT_T0};
    // SAFETY: a prefetch is a hint that never faults, whatever the address; SSE is part of
    // x86-64's baseline.
    unsafe {
        match mode {
            QuantPrefetch::Nta => _mm_prefetch::<_MM_HINT_NTA>(p as *const i8),
            QuantPrefetch::T0 => _mm_prefetch::<_MM_HINT_T0>(p as *const i8),
            QuantPrefetch::Off => {}
        }
    }
}
