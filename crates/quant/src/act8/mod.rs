//! Int8 activations for every quantized format: the activation mode, the quantization of x,
//! the scalar integer reference and the forward driver (GEMV and GEMM alike).
//!
//! # Arithmetic
//! Each vector of x is quantized per group of [`GROUP`] = 128 elements (a multiple of every
//! format's block: Q4 16, NF4 64, lower 128; int8 has one affine per row) to
//! `xq = round_half_even(x · 127 / amax)` with `sx = amax / 127` (`amax = max|x|` of the group),
//! so `|x − sx·xq| <= sx / 2 = amax / 254`.
//!
//! A format exposes its rows as integer codes `c` in *units* of 16, 64 or 128 columns
//! ([`IntLayout`]) with one affine map per unit, `w' = scale_u · c + offset_u`, equal to its
//! dequantized weight for Q4 (`c` 0..15, `scale = 2n/15`, `offset = −n`), lower (`c` 0..7 or
//! 0..15, its f16 `scale` and `min`) and int8 (`c − 128` as a signed code, `offset = min +
//! 128·scale`). Then
//! `Σ_k w'_k · sx·xq_k = Σ_u sx_g · (scale_u · I_u + offset_u · Q_u)` with the integer sums
//! `I_u = Σ_{k∈u} c_k·xq_k` and `Q_u = Σ_{k∈u} xq_k`: exact given the int8 x, up to the f32
//! rounding of the final combination. NF4 (and NF4 with double quantization) goes through an
//! int8 table of its 16 levels, `round(127 · level)` (signed codes, `scale = absmax/127`,
//! `offset = 0`), which moves each weight by at most `absmax / 254`.
//!
//! # Error per output (against the f32 path on the dequantized weights)
//! `|Δy_r| <= Σ_k |w'_k| · amax_g(k) / 254` for Q4, lower and int8, and for NF4 additionally
//! `+ Σ_k (|x_k| + amax_g(k)/254) · absmax_b(k) / 254` (the table), plus f32 rounding
//! (relative 1e-6). Tested by `forward_every_format_every_tier` in `tests/act8.rs`.
//!
//! # Tiers
//! Only the integer sums `I_u` come from a tier: [`scalar`] (the portable loop), [`avx2`]
//! (`vpmaddubsw` + `vpmaddwd`), [`avxvnni`] (the AVX2 tier's code with the 256-bit VEX
//! `vpdpbusd` as its one multiply-add step, Intel client CPUs from Alder Lake on and Sapphire
//! Rapids; [`IntTier::AvxVnniEmulated`] runs it with that instruction emulated by AVX2),
//! [`avx512vnni`] (`vpdpbusd`), [`amx`] (`tdpbssd` tiles, the GEMM only;
//! [`IntTier::AmxEmulated`] runs its driver on a scalar emulator of the tiles). Integer sums
//! are exact, and the f32 combination is one shared function with a fixed order, so every tier gives
//! bit-identical outputs for the same input, at every thread count.
//!
//! # Two drivers
//! Batches below [`gemm::GEMM_MIN_M`] (8) run dot products ([`unit_sums`] per row of W and
//! vector, then the f32 combination per row; W unpacked 16 rows at a time, [`ROW_TILE`]).
//! From 8 vectors on, [`forward`] runs the integer GEMM ([`gemm`]): W packed on each call
//! (block by block, by the tasks that use it) into panels of 16 rows in the `vpdpbusd` operand layout (Q4 as odd signed codes `2c − 15`,
//! which needs no offset term), register-blocked micro-kernels of 4 (AVX2, AVX-VNNI) or 8
//! (AVX-512 VNNI) vectors × 16 rows of W whose integer sums per unit go into f32 with one
//! convert and one `fma` per unit, and the group scale of x applied once per 128 columns; no
//! horizontal sums.
//! Its f32 combination is its own fixed sequence (see [`gemm`]), the same on every tier, so
//! the two drivers differ in the last bits of f32 rounding only.
//!
//! # Which forward int8 mode runs ([`int8_route`])
//! Under [`ActivationMode::Int8`] a format's `matmul_t` takes the integer path only where it
//! was measured faster than (or as fast as) the f32 path; elsewhere it runs the f32 path, so
//! int8 mode never costs time. Below 16 (the dot-product driver; `act8_bench` before the
//! GEMM: one 1024² layer, 2 threads, AVX2 tier on this Zen 3, median of 7, f32 / fused or
//! generic int8, ms):
//!
//! | format | batch | f32 | int8 | route |
//! | --- | --- | --- | --- | --- |
//! | Q4 | 1 | 0.084 | fused 0.035, generic 0.087 | fused ([`crate::Q4Matrix::gemv_int8`]) |
//! | Q4 | 8 | 0.336 | fused 0.188, generic 0.246 | fused |
//! | Q4 | 12 | 0.391 | fused 0.268, generic 0.327 | fused |
//! | NF4, NF4-dq | 1 | 0.125 / 0.127 | generic 0.094 / 0.093 | generic ([`forward`]) |
//! | NF4, NF4-dq | 8 | 0.323 / 0.332 | generic 0.274 / 0.306 | generic |
//! | int8 | 1 / 4 | 0.039 / 0.135 | generic 0.077 / 0.154 | f32 |
//! | lower | 1 / 4 | 0.067 / 0.208 | generic 0.153 / 0.235 | f32 |
//!
//! From 8 vectors, the GEMM (`act8_bench 1024 8 12 16 24 32 64 128`, then `384 512 768` and
//! `256 1024`: 2 threads, AVX2 tier, the three runs interleaved, 9–15 rounds, medians; this
//! 2-core host was shared with other builds at load 4–6, so absolute times are about 1.7×
//! a quiet host's and the ratios are the figures to read; before the GEMM the dot-product
//! driver took 5.74 / 7.33 / 6.70 / 6.07 ms at batch 256 for Q4 / NF4 / int8 / lower against
//! 3.35–3.44 ms for f32 on a quiet host):
//!
//! | format | batch | f32 | int8 GEMM | ratio | route |
//! | --- | --- | --- | --- | --- | --- |
//! | Q4 | 8 / 12 | 0.615 / 0.739 | 0.427 / 0.493 (fused GEMV 0.361 / 0.521) | 0.69 / 0.67 | fused GEMV |
//! | Q4 | 16 / 32 / 64 | 0.831 / 1.457 / 2.598 | 0.569 / 0.879 / 1.541 | 0.68 / 0.60 / 0.59 | GEMM |
//! | Q4 | 256 / 512 / 1024 | 7.05 / 12.43 / 24.19 | 5.55 / 10.67 / 21.27 | 0.79 / 0.86 / 0.88 | GEMM |
//! | NF4 | 8 / 12 / 16 / 32 / 64 | 0.639 / 0.767 / 0.895 / 1.663 / 2.930 | 0.383 / 0.483 / 0.589 / 0.970 / 1.777 | 0.60 / 0.63 / 0.66 / 0.58 / 0.61 | GEMM |
//! | NF4 | 256 / 384 / 512 / 1024 | 7.95 / 10.17 / 12.73 / 24.63 | 6.74 / 9.57 / 12.56 / 25.83 | 0.85 / 0.94 / 0.99 / 1.05 | GEMM below 512 |
//! | NF4-dq | 8 / 16 / 64 / 256 / 1024 | 0.691 / 0.931 / 2.899 / 7.91 / 24.32 | 0.391 / 0.612 / 1.801 / 6.77 / 25.80 | 0.57 / 0.66 / 0.62 / 0.86 / 1.06 | as NF4 |
//! | int8 | 8 / 12 / 16 | 0.375 / 0.524 / 0.562 | 0.370 / 0.457 / 0.565 | 0.99 / 0.87 / 1.01 | f32 |
//! | int8 | 24 / 32 / 64 / 256 / 384 | 1.002 / 1.398 / 2.696 / 7.38 / 10.03 | 0.733 / 0.935 / 1.726 / 6.58 / 9.52 | 0.73 / 0.67 / 0.64 / 0.89 / 0.95 | GEMM |
//! | int8 | 512 / 768 / 1024 | 12.23 / 18.99 / 24.62 | 12.31 / 18.80 / 25.91 | 1.01 / 0.99 / 1.05 | f32 |
//! | lower | 8 / 12 | 0.482 / 0.612 | 0.450 / 0.524 | 0.94 / 0.86 | f32 |
//! | lower | 16 / 32 / 64 / 256 / 1024 | 0.723 / 1.437 / 2.609 / 6.79 / 24.21 | 0.576 / 0.841 / 1.395 / 4.81 / 18.09 | 0.80 / 0.59 / 0.53 / 0.71 / 0.75 | GEMM |
//!
//! int8 at 16 measured 0.91–1.08 in four runs and lower at 8–12 0.86–1.0 in two, so they start
//! at 24 and 16. The GEMM's cost per vector is flat in the batch (about 21 µs per vector for
//! Q4 here) while the f32 path's falls as its dequantized panels serve more vectors (40 µs at
//! 64, 24 µs at 1024): on Zen 3 (no VNNI) the 4-bit codes take five multiplies (`vpmaddubsw`
//! ×4, `vpmaddwd`) per sixteen columns and sixteen rows, the 8-bit codes (NF4 levels, int8)
//! two (`vpsignb`-adjusted `vpmaddubsw`, `vpmaddwd`) per four, against four FMAs per four
//! columns for f32, so NF4 and int8 meet f32 at about 512. The AVX-512 VNNI and AMX tiers
//! (`vpdpbusd`, one instruction per four columns × 16 rows; `tdpbssd` tiles) take the GEMM
//! from 48 vectors for Q4 and from 10 or 11 for the other formats (where their fused
//! small-batch kernels stop winning), AVX-VNNI from 48 for Q4 and from 12 for the others, as
//! measured on the 16-core Xeon ([`gemm_route`]).
//!
//! # Per call
//! The GEMM's fixed costs are paid once per call and layer: x's quantization (vectorized, in
//! parallel over vectors, its finiteness checked on the way, written straight in the layout
//! the kernel reads: offset bytes, padded rows) and W's packing (in parallel over panels), the
//! two side by side (`rayon::join`). On the 16-core Xeon (16 threads, batch 1024, one 1024²
//! layer, AMX) quantization, packing and a separate copy of x into the kernel's layout took
//! 0.07–0.11, 0.10–0.22 and 0.04–0.16 ms against 0.38–0.6 ms for the products; earlier, with
//! x quantized one element at a time into freshly zeroed buffers and the copy on one thread,
//! 0.31–0.37, 0.10–0.20 and 0.13–0.27 ms, which left the integer path at 0.9–1.2x the f32
//! time there. Without the copy and with packing beside quantization, one layer's int8 / f32
//! time at batch 1024 went from 0.35–0.54 to 0.30–0.47, at batch 64 from 0.44–0.80 to
//! 0.31–0.47 (`act8_bench`, the two builds in one run, 2026-12-03 16:39 UTC).
//! [`gemm::phases`] times the three apart (`ACT8_BENCH_PHASES=1 act8_bench`). With x's
//! quantization in AVX2 intrinsics ([`avx2`]; on one Zen 3 thread 0.94 → 0.50 ms for units of
//! 16, 0.70 → 0.40 ms for 128, at 1024 × 1024) they read on the Xeon (2026-12-03 21:34 UTC,
//! 16 threads, batch 1024): quantization 0.08–0.09 ms, packing 0.11–0.12 ms, products
//! 0.75 ms for Q4 (VNNI) and 0.47 ms for lower (AMX); before it, in a slower lease,
//! quantization took 0.12–0.16 ms.
//!
//! [`forward`] itself (and every test of it) serves every format and batch; the route only
//! chooses what `matmul_t` calls.
//!
//! # A LoRA adapter
//! At inference a layer with an adapter whose batch runs on the integer GEMM computes the
//! adapter's `h = x · Aᵀ` on the same int8 x, A quantized as x is ([`adapter`]; an error
//! bound of its own, stated there); `y += h · Bᵀ` stays f32, in the base product's pass.

pub mod adapter;
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512vnni;
#[cfg(target_arch = "x86_64")]
pub mod avxvnni;
pub mod backward;
#[cfg(test)]
mod batch1_tests;
pub mod gemm;
#[cfg(test)]
mod quantize_tests;
pub mod scalar;

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use rayon::prelude::*;

use crate::cpu::KernelPath;
use nibble_tensor::ops::PostOp;

/// Elements of x per activation scale.
pub const GROUP: usize = 128;

/// Rows of W unpacked per task of the forward driver.
pub const ROW_TILE: usize = 16;

/// What the forward products of the quantized formats do with their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationMode {
    /// f32 activations (the default): exact with respect to the dequantized weights.
    F32,
    /// Activations quantized to int8 per 128 elements and integer dot products (see the
    /// [module docs](self) for the error bound).
    Int8,
}

impl ActivationMode {
    /// The mode's name as the command line and `NIBBLE_ACTIVATIONS` spell it.
    pub fn name(self) -> &'static str {
        match self {
            ActivationMode::F32 => "f32",
            ActivationMode::Int8 => "int8",
        }
    }

    /// Parses `f32` or `int8` (case-insensitive, surrounding blanks ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(ActivationMode::F32),
            "int8" => Some(ActivationMode::Int8),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            ActivationMode::F32 => 1,
            ActivationMode::Int8 => 2,
        }
    }

    fn from_code(v: u8) -> Option<Self> {
        match v {
            1 => Some(ActivationMode::F32),
            2 => Some(ActivationMode::Int8),
            _ => None,
        }
    }
}

/// 0: not chosen yet (read the environment on first use), else [`ActivationMode::code`].
static MODE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// The storage of [`forward`]'s quantized x, kept for the calling thread's next call.
    static QUANTIZED: std::cell::Cell<QuantizedX> = const {
        std::cell::Cell::new(QuantizedX::EMPTY)
    };
    /// The calling thread's override ([`with_activations`]); 0 for none.
    static SCOPED: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    /// The storage of the dot-product driver's row operands ([`RowScratch`]).
    static ROW_SCRATCH: std::cell::Cell<RowScratch> = const {
        std::cell::Cell::new(RowScratch {
            codes: Vec::new(),
            scale: Vec::new(),
            offset: Vec::new(),
            isum: Vec::new(),
        })
    };
    /// The storage of [`Batch1Int8`]'s per-unit scales, kept for the thread's next layer.
    static UNIT_SCALES: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The fixed fold of the 16 f32 lanes of the fused batch-1 int8 GEMVs (NF4, lower, int8): `f_l = a_l + a_{l+8}`, `g_l = f_l + f_{l+4}`, then
/// `(g_0 + g_2) + (g_1 + g_3)`.
pub(crate) fn fold16(a: [f32; 16]) -> f32 {
    let f: [f32; 8] = std::array::from_fn(|l| a[l] + a[l + 8]);
    let g: [f32; 4] = std::array::from_fn(|l| f[l] + f[l + 4]);
    (g[0] + g[2]) + (g[1] + g[3])
}

/// Whether a batch of `m` vectors through `format` under the current activation mode takes
/// the fused int8 GEMV `route`.
fn takes_fused(format: &str, m: usize, route: Int8Route) -> bool {
    activations() == ActivationMode::Int8 && int8_route(format, m) == route
}

/// A format's fused batch-1 int8 GEMV: the route that selects it, the preparation of x it
/// reads and its kernels. Each format that has one (NF4, lower, int8) names it in a constant
/// `FUSED` of its `act8` module, and its `gemv_prepare` / `gemv_simd` hand over to
/// [`FusedGemv::prepare`] / [`FusedGemv::run`] before their f32 GEMV.
pub(crate) struct FusedGemv<M> {
    /// The format's name in [`int8_route`].
    pub(crate) format: &'static str,
    /// The route that runs this GEMV.
    pub(crate) route: Int8Route,
    /// Appends x prepared for the kernels to `prep`; `false`, with nothing appended, where x
    /// holds a NaN or infinity.
    pub(crate) prepare: fn(&[f32], &mut Vec<f32>) -> bool,
    /// Floats of that preparation for an input of `in` elements (never the length of the
    /// format's f32 preparation, for `in > 0`).
    pub(crate) prep_len: fn(usize) -> usize,
    /// The AVX-512 VNNI kernel.
    #[cfg(target_arch = "x86_64")]
    pub(crate) kernel: FusedKernel<M>,
    /// The AVX-512 VNNI kernel for a small batch in one pass over the rows, where the format
    /// has one, with [`FusedGemv::kernel`]'s bits for each vector; see
    /// [`FusedGemv::run_batch`].
    #[cfg(target_arch = "x86_64")]
    pub(crate) batch: Option<FusedBatchKernel<M>>,
    /// The 256-bit kernels where the format has them, with the AVX-512 kernels' bits: for the
    /// AVX-VNNI and the AVX2 integer tiers (the path's [`IntTier::for_path`]), each a batch-1
    /// kernel as [`FusedGemv::kernel`] and a small-batch one as [`FusedGemv::batch`] (the
    /// route takes the GEMV on those tiers only where they exist, [`fused_on_tier`]).
    #[cfg(target_arch = "x86_64")]
    pub(crate) ymm: Option<YmmKernels<M>>,
    /// The scalar reference for one row (the kernel's bits).
    pub(crate) dot_ref: fn(&M, usize, &[f32]) -> f32,
}

/// A fused GEMV's batch-1 kernel: `y[j] (+)= W[rows.start + j, :] · x'` (with `acc`).
#[cfg(target_arch = "x86_64")]
pub(crate) type FusedKernel<M> = unsafe fn(&M, &[f32], std::ops::Range<usize>, &mut [f32], bool);

/// A fused GEMV's small-batch kernel: `out[v · stride + j] = W[rows.start + j, :] · x'_v` for 2
/// to 8 prepared vectors (`false`, nothing written, for another count).
#[cfg(target_arch = "x86_64")]
pub(crate) type FusedBatchKernel<M> =
    unsafe fn(&M, &[&[f32]], std::ops::Range<usize>, &mut [f32], usize) -> bool;

/// A format's 256-bit fused GEMV kernels ([`FusedGemv::ymm`]): `(batch 1, small batches)` on
/// AVX-VNNI and on plain AVX2.
#[cfg(target_arch = "x86_64")]
pub(crate) struct YmmKernels<M> {
    pub(crate) avxvnni: (FusedKernel<M>, FusedBatchKernel<M>),
    pub(crate) avx2: (FusedKernel<M>, FusedBatchKernel<M>),
}

impl<M> FusedGemv<M> {
    /// The kernels for `path` (a path the CPU supports): the AVX-512 VNNI ones on the AVX-512
    /// path of a CPU with VNNI, the 256-bit ones of `path`'s integer tier where it is AVX-VNNI
    /// or AVX2 and the format has them; `None` elsewhere (the scalar reference runs).
    #[cfg(target_arch = "x86_64")]
    fn kernels(
        &self,
        path: crate::cpu::KernelPath,
    ) -> Option<(FusedKernel<M>, Option<FusedBatchKernel<M>>)> {
        if path == crate::cpu::KernelPath::Avx512 && has_avx512vnni() {
            return Some((self.kernel, self.batch));
        }
        let ymm = self.ymm.as_ref()?;
        let (kernel, batch) = match IntTier::for_path(path) {
            IntTier::AvxVnni => ymm.avxvnni,
            IntTier::Avx2 => ymm.avx2,
            _ => return None,
        };
        Some((kernel, Some(batch)))
    }

    /// Whether the format has 256-bit kernels (the AVX-VNNI and AVX2 tiers' routes take its
    /// fused GEMV only then, [`fused_on_tier`]).
    fn has_ymm(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.ymm.is_some()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Appends x prepared for this GEMV to `prep` and says `true` where a batch of `m` vectors
    /// through a matrix `inn` wide takes it (int8 activations, this route) and x is finite;
    /// `false`, with nothing appended, otherwise (the format then prepares its f32 GEMV).
    pub(crate) fn prepare(&self, inn: usize, m: usize, x: &[f32], prep: &mut Vec<f32>) -> bool {
        inn > 0 && self.takes(m) && (self.prepare)(x, prep)
    }

    /// Whether a batch of `m` vectors takes this GEMV (int8 activations, this route): the
    /// format's [`crate::kernels::QuantRows::act8_fused`] for `m >= 2`.
    pub(crate) fn takes(&self, m: usize) -> bool {
        takes_fused(self.format, m, self.route)
    }

    /// Where `prep` is this GEMV's preparation (told by its length), its rows: the kernel for
    /// `path` ([`FusedGemv::kernels`]), else the scalar reference row by row (the same bits);
    /// `true` then, `false` (nothing written) for another preparation.
    ///
    /// # Safety
    /// The CPU supports `path`; `w` is `inn` wide with `rows.end` rows at least, and
    /// `y.len() >= rows.len()`.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn run(
        &self,
        path: crate::cpu::KernelPath,
        w: &M,
        inn: usize,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) -> bool {
        if inn == 0 || prep.len() != (self.prep_len)(inn) {
            return false;
        }
        if let Some((kernel, _)) = self.kernels(path) {
            // SAFETY: the caller's contract and this preparation; `kernels` chose a kernel whose
            // instructions the CPU has (AVX-512 VNNI, AVX-VNNI, or AVX2 and FMA).
            unsafe { kernel(w, prep, rows, y, acc) };
        } else {
            let mut put = crate::kernels::store_row(y, acc);
            for (j, r) in rows.enumerate() {
                put(j, r, (self.dot_ref)(w, r, prep));
            }
        }
        true
    }
}

impl<M> FusedGemv<M> {
    /// The format's [`crate::kernels::QuantRows::gemv_batch`]: the batch kernel for `path`
    /// ([`FusedGemv::kernels`]) where there is one and every preparation is this GEMV's (told
    /// by its length); `false`, with nothing written, otherwise (the caller then runs the
    /// vectors one at a time).
    ///
    /// `rows` lie inside `w` (`inn` wide), `stride >= rows.len()` and `out.len() >=
    /// (preps.len() - 1) · stride + rows.len()` (the trait's contract, which the caller
    /// keeps).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_batch(
        &self,
        path: crate::cpu::KernelPath,
        w: &M,
        inn: usize,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some((_, Some(batch))) = self.kernels(path) {
            if inn > 0 && preps.iter().all(|p| p.len() == (self.prep_len)(inn)) {
                // SAFETY: the path is usable (the caller's `usable`) and `kernels` chose a
                // kernel whose instructions the CPU has; every preparation is this GEMV's;
                // rows, stride and out as the trait's contract says.
                return unsafe { batch(w, preps, rows, out, stride) };
            }
        }
        let _ = (path, w, inn, preps, rows, out, stride);
        false
    }
}

/// Whether the fused int8 GEMV of `format` runs on `tier`: on AVX-512 VNNI and AMX for NF4,
/// lower and the int8 format, on AVX-VNNI and AVX2 for those of them with 256-bit kernels
/// (their `FUSED`'s 256-bit kernels: all three, `crate::arch::avx2::nf4_int8`, `lower_int8`
/// and `int8_int8`).
pub fn fused_on_tier(format: &str, tier: IntTier) -> bool {
    let has_ymm = match format {
        "nf4" => crate::nf4::act8::FUSED.has_ymm(),
        "lower" => crate::lower::act8::FUSED.has_ymm(),
        "int8" => crate::int8::act8::FUSED.has_ymm(),
        _ => return false,
    };
    match tier {
        IntTier::Avx512Vnni | IntTier::Amx => true,
        IntTier::AvxVnni | IntTier::Avx2 => has_ymm,
        _ => false,
    }
}

/// Widths of `in` that [`check_fused_gemv`] takes for formats of any width: partial last
/// groups, one and two whole groups, odd widths.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) const ANY_WIDTHS: [usize; 9] = [1, 7, 63, 128, 129, 256, 320, 1023, 1024];

/// Test support for a format's fused batch-1 int8 GEMV `fused` (its format's name in
/// messages): on the widths `inns` and 1, 7, 17 and 33 rows, uniform weights with a constant
/// row and x with an all-zero group and ±extremes, each of `quantize(w)`'s matrices with x
/// prepared by its `prepare` (behind a prefix the parts must not read): its AVX-512 VNNI
/// `kernel` against its scalar `dot_ref` bit for bit on three ranges of rows (all, the last two
/// thirds, all but the first and last), y pre-filled with NaN, then accumulated into. Where
/// the CPU lacks VNNI it says so and returns.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn check_fused_gemv<M>(
    fused: &FusedGemv<M>,
    inns: &[usize],
    quantize: impl Fn(&nibble_tensor::Tensor) -> Vec<M>,
) {
    if !has_avx512vnni() {
        println!(
            "{} int8 GEMV: AVX-512 VNNI kernel skipped (this CPU lacks it)",
            fused.format
        );
        return;
    }
    // SAFETY: the CPU has AVX-512 VNNI (checked above) and the AVX-512 tier's features with it.
    unsafe { check_fused_kernel(fused, "AVX-512 VNNI", fused.kernel, inns, quantize) }
}

/// [`check_fused_gemv`] for any `kernel` of the fused GEMV `fused` (`tier` names it in
/// messages): its rows against the reference bit for bit, written and accumulated.
///
/// # Safety
/// The CPU runs `kernel`.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) unsafe fn check_fused_kernel<M>(
    fused: &FusedGemv<M>,
    tier: &str,
    kernel: unsafe fn(&M, &[f32], std::ops::Range<usize>, &mut [f32], bool),
    inns: &[usize],
    quantize: impl Fn(&nibble_tensor::Tensor) -> Vec<M>,
) {
    use nibble_tensor::{Rng, Tensor};
    let FusedGemv {
        format: name,
        prepare,
        dot_ref,
        ..
    } = *fused;
    for &inn in inns {
        for out in [1usize, 7, 17, 33] {
            let mut w = Tensor::uniform(&[out, inn], -0.4, 0.4, &mut Rng::new((inn + out) as u64));
            if out > 5 {
                w.data_mut()[5 * inn..6 * inn].fill(0.25);
            }
            let mut x = Tensor::randn(&[inn], &mut Rng::new(inn as u64)).into_vec();
            let zero = if inn >= 2 * GROUP { GROUP } else { 64 };
            if inn >= 2 * zero {
                x[..zero].fill(0.0);
                x[zero + 2] = 1.0e3;
                x[zero + 3] = -1.0e3;
            }
            for m in quantize(&w) {
                let mut prep = vec![7.0f32];
                assert!(prepare(&x, &mut prep), "{name} {out}x{inn}: x declined");
                let prep = &prep[1..];
                let want: Vec<f32> = (0..out).map(|r| dot_ref(&m, r, prep)).collect();
                for (r0, r1) in [
                    (0, out),
                    (out / 3, out),
                    (1.min(out), out.saturating_sub(1).max(1)),
                ] {
                    let mut y = vec![f32::NAN; r1 - r0];
                    // SAFETY: the CPU runs the kernel (the caller's contract); rows inside W,
                    // y a value per row, x prepared for it.
                    unsafe { kernel(&m, prep, r0..r1, &mut y, false) };
                    let mut y2: Vec<f32> = (r0..r1).map(|r| r as f32).collect();
                    // SAFETY: as above.
                    unsafe { kernel(&m, prep, r0..r1, &mut y2, true) };
                    for (k, r) in (r0..r1).enumerate() {
                        let what = format!("{name} {out}x{inn} row {r}");
                        assert_eq!(y[k].to_bits(), want[r].to_bits(), "{what}");
                        assert_eq!(
                            y2[k].to_bits(),
                            (r as f32 + want[r]).to_bits(),
                            "{what} acc"
                        );
                    }
                }
            }
        }
    }
    println!("{name} int8 GEMV: {tier} kernel checked");
}

/// Test support for a fused GEMV's small-batch `kernel` (`what` names it in messages): on the
/// matrix `m`, rows `rows` and the first 1 to `preps.len()` prepared vectors, outputs pre-filled
/// with NaN in strides wider than the rows, every (row, vector) gets `dot_ref`'s bits for 2 to 8
/// vectors, and other counts are declined with nothing written.
///
/// # Safety
/// The CPU runs `kernel`; `rows` lie inside `m`; every prep is a whole preparation for `m`.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) unsafe fn check_batch_kernel<M>(
    what: &str,
    m: &M,
    rows: std::ops::Range<usize>,
    preps: &[Vec<f32>],
    kernel: FusedBatchKernel<M>,
    dot_ref: fn(&M, usize, &[f32]) -> f32,
) {
    let stride = rows.len() + 3;
    for v in 1..=preps.len() {
        let ps: Vec<&[f32]> = preps[..v].iter().map(|p| p.as_slice()).collect();
        let mut y = vec![f32::NAN; v * stride];
        // SAFETY: the caller's contract; y holds v strides.
        let ran = unsafe { kernel(m, &ps, rows.clone(), &mut y, stride) };
        assert_eq!(ran, (2..=8).contains(&v), "{what}: {v} vectors");
        if !ran {
            assert!(y.iter().all(|t| t.is_nan()), "{what}: declined but wrote");
            continue;
        }
        for (b, p) in ps.iter().enumerate() {
            for (j, r) in rows.clone().enumerate() {
                assert_eq!(
                    y[b * stride + j].to_bits(),
                    dot_ref(m, r, p).to_bits(),
                    "{what}: {v} vectors, vector {b} row {r}"
                );
            }
        }
    }
}

/// Test support for the fused GEMV `fused` of an affine format (its format's name in
/// messages): its scalar reference `dot_ref` against the integer formula in f64 with the same
/// int8 x (`Σ_k w'_k · sx · xq_k`, `w'` from `dequantize`), equal up to f32 rounding.
#[cfg(test)]
pub(crate) fn check_integer_formula<M>(
    fused: &FusedGemv<M>,
    quantize: fn(&nibble_tensor::Tensor) -> M,
    dequantize: fn(&M) -> nibble_tensor::Tensor,
) {
    use nibble_tensor::{Rng, Tensor};
    let (name, prepare, dot_ref) = (fused.format, fused.prepare, fused.dot_ref);
    for inn in [1usize, 129, 1024] {
        let w = Tensor::uniform(&[9, inn], -0.4, 0.4, &mut Rng::new(inn as u64 + 5));
        let x = Tensor::randn(&[inn], &mut Rng::new(inn as u64 + 6)).into_vec();
        let m = quantize(&w);
        let mut prep = Vec::new();
        assert!(prepare(&x, &mut prep));
        let q = quantize_x(&x, 1, inn, GROUP).expect("finite x, unit GROUP");
        let wd = dequantize(&m);
        for r in 0..9 {
            let (mut want, mut mag) = (0.0f64, 0.0f64);
            for k in 0..inn {
                let xk = f64::from(q.sx[k / GROUP]) * f64::from(q.xq[k]);
                let t = f64::from(wd.data()[r * inn + k]) * xk;
                want += t;
                mag += t.abs();
            }
            let got = f64::from(dot_ref(&m, r, &prep));
            assert!(
                (got - want).abs() <= 1e-5 * mag + 1e-6,
                "{name} {inn} row {r}: {got} vs {want}"
            );
        }
    }
}

/// A thread's row operands for the dot-product driver (codes, affine map per unit, integer
/// sums), reused from call to call: [`RowScratch::take`] hands them out zeroed at the sizes
/// asked, [`RowScratch::give_back`] keeps them for the thread's next call. Fresh `vec!`s of
/// zeros per call were `calloc`s, which glibc serves under its arena lock: with the batch-1
/// team's members each asking for four per block of rows, the lock and the futex waits behind
/// it were a sixth of BigNet nf4's int8 forward's samples (`perf`, 2 threads, 2026-12-05).
#[derive(Default)]
struct RowScratch {
    codes: Vec<u8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    isum: Vec<i32>,
}

impl RowScratch {
    /// The thread's storage: `codes` bytes, `units` scales and offsets and `sums` integer sums,
    /// all zero.
    fn take(codes: usize, units: usize, sums: usize) -> RowScratch {
        fn zeroed<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
            v.clear();
            v.resize(n, T::default());
        }
        let mut s = ROW_SCRATCH.take();
        zeroed(&mut s.codes, codes);
        zeroed(&mut s.scale, units);
        zeroed(&mut s.offset, units);
        zeroed(&mut s.isum, sums);
        s
    }

    /// Keeps the storage for the thread's next [`RowScratch::take`].
    fn give_back(self) {
        ROW_SCRATCH.set(self);
    }
}

/// Chooses the process-wide [`ActivationMode`] (overriding `NIBBLE_ACTIVATIONS`).
///
/// ```
/// use nibble_quant::act8::{activations, set_activations, ActivationMode};
/// set_activations(ActivationMode::Int8);
/// assert_eq!(activations(), ActivationMode::Int8);
/// set_activations(ActivationMode::F32);
/// ```
pub fn set_activations(mode: ActivationMode) {
    MODE.store(mode.code(), Relaxed);
}

/// The mode in force on this thread: a [`with_activations`] scope's, else the process-wide
/// one as last set by [`set_activations`], else `NIBBLE_ACTIVATIONS=int8|f32` (or its old
/// name `NIBBLE_Q4_ACT`) from the environment, else [`ActivationMode::F32`].
pub fn activations() -> ActivationMode {
    if let Some(m) = ActivationMode::from_code(SCOPED.with(|c| c.get())) {
        return m;
    }
    let mut v = MODE.load(Relaxed);
    if v == 0 {
        let env = std::env::var("NIBBLE_ACTIVATIONS")
            .or_else(|_| std::env::var("NIBBLE_Q4_ACT"))
            .ok()
            .and_then(|s| ActivationMode::parse(&s))
            .unwrap_or(ActivationMode::F32);
        // Keep a value someone set meanwhile.
        v = match MODE.compare_exchange(0, env.code(), Relaxed, Relaxed) {
            Ok(_) => env.code(),
            Err(cur) => cur,
        };
    }
    ActivationMode::from_code(v).unwrap_or(ActivationMode::F32)
}

/// Runs `f` with `mode` in force on the calling thread (a per-model setting: a model wraps its
/// forward in this), restoring the previous scope afterwards, also when `f` panics. The mode
/// is read on the thread that calls a forward product, so work that product spreads over the
/// pool follows it.
pub fn with_activations<R>(mode: ActivationMode, f: impl FnOnce() -> R) -> R {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|c| c.replace(mode.code())));
    f()
}

/// How a tier must read the code bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// Unsigned codes 0..=15 (4-bit and 3-bit formats).
    Nibble,
    /// Signed codes −128..=127 stored as their two's-complement bytes.
    Signed,
}

/// A format's integer view: columns per unit and the code kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntLayout {
    /// Columns per affine unit: 16, 64 or 128.
    pub unit: usize,
    /// How to read the codes.
    pub kind: CodeKind,
}

/// A weight matrix with an integer view for int8 activations (implemented by every format).
pub trait IntCodes: Sync {
    /// `(out, in)`.
    fn int_dims(&self) -> (usize, usize);
    /// The integer layout, or `None` when this matrix has none (the f32 path then runs; NF4
    /// with `in % 64 != 0`, whose blocks straddle rows).
    fn int_layout(&self) -> Option<IntLayout>;
    /// Writes row `r`'s codes for columns `0..in` into `dst[..in]`.
    fn int_codes(&self, r: usize, dst: &mut [u8]);
    /// Writes row `r`'s affine map per unit (`ceil(in / unit)` of each):
    /// `w' = scale[u] · code + offset[u]`.
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]);
    /// Whether the codes are 4-bit and centred on 7.5, `w' = h_u · (2c − 15)` per unit
    /// (Q4): the integer GEMM ([`gemm`]) then multiplies the odd signed codes `2c − 15` and
    /// needs no offset term. Default `false`.
    fn int_centered(&self) -> bool {
        false
    }
    /// Row `r`'s `h_u` per unit (`ceil(in / unit)` of them) where [`IntCodes::int_centered`]
    /// holds. Default: half of [`IntCodes::int_affine`]'s scale.
    fn int_centered_scale(&self, r: usize, half: &mut [f32]) {
        let mut offset = vec![0.0f32; half.len()];
        self.int_affine(r, half, &mut offset);
        for h in half {
            *h *= 0.5;
        }
    }
}

/// An integer tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntTier {
    /// The portable loop ([`scalar`]).
    Scalar,
    /// AVX2 `vpmaddubsw` ([`avx2`]).
    Avx2,
    /// AVX-VNNI: the 256-bit VEX `vpdpbusd` of Intel client CPUs (Alder Lake on; Sapphire
    /// Rapids Xeons have it next to AVX-512), the AVX2 tier's code with that one instruction
    /// as its multiply-add step ([`avxvnni`]). Where the CPU has it ([`has_avxvnni`]).
    AvxVnni,
    /// AVX-512 VNNI `vpdpbusd` ([`avx512vnni`]).
    Avx512Vnni,
    /// AMX-INT8 tiles (`tdpbssd`, [`amx`]) for the integer GEMM, the AVX-512 VNNI tier for
    /// everything else (the dot-product driver below [`gemm::GEMM_MIN_M`], the f32 fold).
    /// Where the CPU and OS allow it ([`has_amx`]).
    Amx,
    /// The [`IntTier::Amx`] driver with its tile instructions run by a scalar emulator and
    /// its fold on scalar lanes: exact and slow, on any CPU, so that the AMX driver is tested
    /// where AMX is missing. Never chosen by [`IntTier::for_path`] nor listed by
    /// [`IntTier::available`]; below the GEMM it runs the portable tier.
    AmxEmulated,
    /// The [`IntTier::AvxVnni`] code with its `vpdpbusd` emulated by AVX2 instructions: exact,
    /// on any AVX2 CPU (else the portable tier), so that everything of the AVX-VNNI tier but
    /// the instruction is tested where the CPU lacks it. Never chosen by [`IntTier::for_path`]
    /// nor listed by [`IntTier::available`].
    AvxVnniEmulated,
}

/// Whether this CPU has AVX-512 VNNI next to the AVX-512 tier (checked once).
pub fn has_avx512vnni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            crate::cpu::has_avx512() && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU has GFNI next to the AVX-512 tier (checked once): the 4-bit fused GEMVs
/// then take each byte's high nibble in one instruction.
pub fn has_avx512_gfni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            crate::cpu::has_avx512() && is_x86_feature_detected!("gfni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU has AVX-VNNI (256-bit `vpdpbusd`) next to AVX2, FMA and F16C, and
/// `NIBBLE_AVXVNNI` is not `0` (checked once; `NIBBLE_AVXVNNI=0` runs the plain AVX2 tier
/// instead, for A/B runs). Also where Q4's fused int8 GEMV ([`crate::Q4Matrix::gemv_int8`],
/// on every tier) forms its block sums with `vpdpbusd` (the same bits).
pub fn has_avxvnni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        if std::env::var("NIBBLE_AVXVNNI").is_ok_and(|v| v.trim() == "0") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            crate::cpu::has_avx2_fma_f16c() && is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether the [`IntTier::Amx`] tier can run: AVX-512 VNNI ([`has_avx512vnni`]), AMX-INT8
/// tiles permitted for this process ([`amx::tiles_permitted`], asked once) and `NIBBLE_AMX`
/// not `0` (read once, before asking the kernel; for A/B runs against the VNNI tier).
pub fn has_amx() -> bool {
    amx_status().is_ok()
}

/// [`has_amx`], or why not in words (for logs and skipped tests).
pub fn amx_status() -> Result<(), String> {
    static STATUS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    STATUS
        .get_or_init(|| {
            if std::env::var("NIBBLE_AMX").is_ok_and(|v| v.trim() == "0") {
                return Err("disabled by NIBBLE_AMX=0".into());
            }
            amx::tiles_permitted().map_err(|r| r.to_string())?;
            if !has_avx512vnni() {
                return Err("no AVX-512 VNNI (the fold and small batches need it)".into());
            }
            Ok(())
        })
        .clone()
}

impl IntTier {
    /// The tier's name in reports (`bignet bench --json`'s `"int_tier"`): `scalar`, `avx2`,
    /// `avxvnni`, `avx512vnni`, `amx`, `amx-emulated` or `avxvnni-emulated`.
    ///
    /// ```
    /// use nibble_quant::act8::IntTier;
    /// assert_eq!(IntTier::Avx512Vnni.name(), "avx512vnni");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            IntTier::Scalar => "scalar",
            IntTier::Avx2 => "avx2",
            IntTier::AvxVnni => "avxvnni",
            IntTier::Avx512Vnni => "avx512vnni",
            IntTier::Amx => "amx",
            IntTier::AmxEmulated => "amx-emulated",
            IntTier::AvxVnniEmulated => "avxvnni-emulated",
        }
    }

    /// The tier a kernel path runs (downgraded to what this CPU has): on the AVX-512 path
    /// AMX where [`has_amx`], else AVX-512 VNNI where the CPU has it; on the AVX-512 path
    /// without AVX-512 VNNI and on the AVX2 path, AVX-VNNI where [`has_avxvnni`], else AVX2.
    ///
    /// To force a tier for A/B runs: `NIBBLE_KERNEL=avx2` takes the AVX2 path (AVX-VNNI where
    /// the CPU has it, so on a Xeon with both this runs the AVX-VNNI tier),
    /// `NIBBLE_AVXVNNI=0` turns AVX-VNNI off (plain AVX2), `NIBBLE_AMX=0` turns AMX off,
    /// `NIBBLE_KERNEL=scalar` the portable tier; tests and benchmarks pass any tier of
    /// [`IntTier::available`] to [`forward`] directly.
    pub fn for_path(path: KernelPath) -> IntTier {
        match path.supported() {
            KernelPath::Avx512 if has_amx() => IntTier::Amx,
            KernelPath::Avx512 if has_avx512vnni() => IntTier::Avx512Vnni,
            KernelPath::Avx512 | KernelPath::Avx2Fma if has_avxvnni() => IntTier::AvxVnni,
            KernelPath::Avx512 | KernelPath::Avx2Fma => IntTier::Avx2,
            _ => IntTier::Scalar,
        }
    }

    /// `self`, or the best lower tier this CPU has (AMX, then AVX-512 VNNI, then AVX2;
    /// AVX-VNNI, then AVX2; AVX2, then the portable tier).
    pub fn supported(self) -> IntTier {
        match self {
            IntTier::Amx if !has_amx() => IntTier::Avx512Vnni.supported(),
            IntTier::Avx512Vnni if !has_avx512vnni() => IntTier::Avx2.supported(),
            IntTier::AvxVnni if !has_avxvnni() => IntTier::Avx2.supported(),
            IntTier::Avx2 | IntTier::AvxVnniEmulated if !crate::cpu::has_avx2_fma_f16c() => {
                IntTier::Scalar
            }
            t => t,
        }
    }

    /// Every tier this CPU can run ([`IntTier::AmxEmulated`] and
    /// [`IntTier::AvxVnniEmulated`] left out).
    pub fn available() -> Vec<IntTier> {
        [
            IntTier::Scalar,
            IntTier::Avx2,
            IntTier::AvxVnni,
            IntTier::Avx512Vnni,
            IntTier::Amx,
        ]
        .into_iter()
        .filter(|t| t.supported() == *t)
        .collect()
    }
}

/// The scalar integer reference: `out[u] = Σ_{k in unit u} code_k · xq_k` (codes read as
/// `kind` says). `codes.len() == xq.len() == out.len() · unit`.
pub fn unit_sums_ref(kind: CodeKind, unit: usize, codes: &[u8], xq: &[i8], out: &mut [i32]) {
    for (u, o) in out.iter_mut().enumerate() {
        let c = &codes[u * unit..(u + 1) * unit];
        let x = &xq[u * unit..(u + 1) * unit];
        *o = c
            .iter()
            .zip(x)
            .map(|(&c, &x)| code_value(kind, c) * i32::from(x))
            .sum();
    }
}

#[inline(always)]
fn code_value(kind: CodeKind, c: u8) -> i32 {
    match kind {
        CodeKind::Nibble => i32::from(c),
        CodeKind::Signed => i32::from(c as i8),
    }
}

/// Integer unit sums of one row of codes against `V` vectors on `tier`:
/// `out[v][u] = Σ_{k in unit u} code_k · xq[v]_k`, with `qsum[v][u] = Σ_{k in unit u} xq[v]_k`
/// (used by tiers that read signed codes offset by 128). Lengths: `codes` and every `xq[v]`
/// `n` bytes, `n` a multiple of 128; `unit` 16, 64 or 128; `out[v]` and `qsum[v]` `n / unit`.
/// Any other length or unit is an error. Every xq in −127..=127 (as [`quantize_x`] makes
/// them). Exact: the same on every tier.
pub fn unit_sums<const V: usize>(
    tier: IntTier,
    kind: CodeKind,
    unit: usize,
    codes: &[u8],
    xq: [&[i8]; V],
    qsum: [&[i32]; V],
    out: [&mut [i32]; V],
) -> crate::Result<()> {
    let n = codes.len();
    let units = n / unit.max(1);
    if !matches!(unit, 16 | 64 | 128)
        || n % GROUP != 0
        || xq.iter().any(|x| x.len() != n)
        || qsum.iter().any(|q| q.len() != units)
        || out.iter().any(|o| o.len() != units)
    {
        return Err(crate::QuantError::Shape {
            op: "act8::unit_sums",
            shape: vec![n, unit],
            what: "codes and xq: equal lengths, a multiple of 128; unit 16, 64 or 128".into(),
        });
    }
    unit_sums_checked(tier, kind, unit, codes, xq, qsum, out);
    Ok(())
}

/// [`unit_sums`] with its lengths known to be right.
fn unit_sums_checked<const V: usize>(
    tier: IntTier,
    kind: CodeKind,
    unit: usize,
    codes: &[u8],
    xq: [&[i8]; V],
    qsum: [&[i32]; V],
    out: [&mut [i32]; V],
) {
    match tier.supported() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` returned Avx512Vnni or Amx, so the CPU has AVX-512 F/BW/VL +
        // VNNI and AVX2; the caller checked every length (a multiple of 128, unit 16/64/128).
        IntTier::Avx512Vnni | IntTier::Amx => unsafe {
            avx512vnni::unit_sums(kind, unit, codes, xq, qsum, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` returned Avx2, so the CPU has AVX2; lengths checked by the caller.
        IntTier::Avx2 => unsafe { avx2::unit_sums(kind, unit, codes, xq, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` returned AvxVnni, so the CPU has AVX-VNNI, AVX2 and FMA; lengths
        // checked by the caller.
        IntTier::AvxVnni => unsafe { avxvnni::hw::unit_sums(kind, unit, codes, xq, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` returned AvxVnniEmulated, so the CPU has AVX2 and FMA; lengths
        // checked by the caller.
        IntTier::AvxVnniEmulated => unsafe {
            avxvnni::emulated::unit_sums(kind, unit, codes, xq, out)
        },
        _ => scalar::unit_sums(kind, unit, codes, xq, out),
    }
}

/// A batch of vectors quantized to int8, padded to a multiple of [`GROUP`] with zeros.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QuantizedX {
    /// Padded length of each vector (`ceil(in / 128) · 128`).
    pub kpad: usize,
    /// Columns per unit.
    pub unit: usize,
    /// The int8 values, `[m, kpad]`.
    pub xq: Vec<i8>,
    /// The scale `sx` of each group, `[m, kpad / 128]`.
    pub sx: Vec<f32>,
    /// `Q_u = Σ xq` over each unit, `[m, kpad / unit]`.
    pub qsum: Vec<i32>,
}

impl QuantizedX {
    /// No vectors yet (storage to be reused).
    pub const EMPTY: QuantizedX = QuantizedX {
        kpad: 0,
        unit: 1,
        xq: Vec::new(),
        sx: Vec::new(),
        qsum: Vec::new(),
    };
}

/// `1.5 · 2^23`: adding it to `|v| <= 2^22` rounds `v` to an integer (half to even) held in
/// the low bits of the sum's mantissa (two's complement around `0x4B40_0000`).
const ROUNDER: f32 = 12_582_912.0;

/// `v` rounded half to even, as an i8, for `|v| <= 127`: the low byte of the rounding sum's
/// bits, without a libm call or a saturating float-to-int cast (which AVX2 code does one
/// element at a time), so the loop vectorizes.
#[inline(always)]
fn round_to_i8(v: f32) -> i8 {
    (v + ROUNDER).to_bits() as u8 as i8
}

/// Quantizes `m` vectors of `inn` elements (`x` `[m, inn]`, every element finite) for a
/// layout of `unit` columns per unit (vectors in parallel). `unit` must be 16, 64 or 128 (the
/// layouts the integer kernels read): another unit (1, 2, 4, 8 and 32 panicked in the
/// quantizer), or an `x` of other than `m · inn` elements, is a
/// [`QuantError::Shape`](crate::QuantError::Shape); a NaN or infinite element a [`QuantError::NonFinite`](crate::QuantError::NonFinite) naming its
/// vector (row) and column.
///
/// ```
/// use nibble_quant::act8::quantize_x;
/// let q = quantize_x(&[0.5, -1.0, 0.25], 1, 3, 16).unwrap();
/// assert_eq!((q.kpad, &q.xq[..4]), (128, &[64, -127, 32, 0][..]));
/// assert_eq!((q.sx[0], q.qsum[0]), (1.0 / 127.0, 64 - 127 + 32));
/// assert!(quantize_x(&[0.5, -1.0, 0.25], 1, 3, 3).is_err());
/// assert!(quantize_x(&[0.5, -1.0, 0.25], 1, 3, 32).is_err());
/// ```
pub fn quantize_x(x: &[f32], m: usize, inn: usize, unit: usize) -> crate::Result<QuantizedX> {
    const OP: &str = "act8::quantize_x";
    let shape_err = |what: String| crate::QuantError::Shape {
        op: OP,
        shape: vec![m, inn],
        what,
    };
    if !matches!(unit, 16 | 64 | 128) {
        return Err(shape_err(format!(
            "unit {unit} is not one of the integer kernels' 16, 64 or 128 columns"
        )));
    }
    if m.checked_mul(inn) != Some(x.len()) {
        return Err(shape_err(format!(
            "x holds {} elements, not m · inn = {m} · {inn}",
            x.len()
        )));
    }
    if let Some(k) = x.iter().position(|v| !v.is_finite()) {
        return Err(crate::QuantError::NonFinite {
            op: OP,
            row: k / inn,
            col: k % inn,
            value: x[k],
        });
    }
    let mut q = QuantizedX::EMPTY;
    quantize_x_into(x, m, inn, unit, true, &mut q, XLayout::PLAIN);
    Ok(q)
}

/// How [`quantize_x_into`] lays out the int8 values of x for their reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XLayout {
    /// XORed into every byte of `xq` (padding included): `0x80` gives `xq + 128` as an
    /// unsigned byte, the operand of kernels that read x offset ([`gemm`]'s `OFFSET_X`).
    pub(crate) flip: u8,
    /// `xq` holds whole rows up to a multiple of this many vectors (rows past the batch zero).
    pub(crate) rows_multiple: usize,
}

impl XLayout {
    /// The values as they are, `m` rows.
    pub(crate) const PLAIN: XLayout = XLayout {
        flip: 0,
        rows_multiple: 1,
    };
}

/// [`quantize_x`] into `q`'s storage (reused from an earlier batch, resized as needed), on the
/// pool where `parallel`, its values laid out as `layout` says (the sums `qsum` are of the
/// values themselves). Checks as it goes that every element of x is finite: `false` (and `q`
/// unspecified) if one is not.
pub(crate) fn quantize_x_into(
    x: &[f32],
    m: usize,
    inn: usize,
    unit: usize,
    parallel: bool,
    q: &mut QuantizedX,
    layout: XLayout,
) -> bool {
    let kpad = inn.next_multiple_of(GROUP);
    let unit = unit.max(1);
    let (groups, units) = (kpad / GROUP, kpad / unit);
    q.kpad = kpad;
    q.unit = unit;
    // Every element is written below (each row's padding too): no zeroing pass over the
    // storage of the last call.
    let rows = m.next_multiple_of(layout.rows_multiple.max(1));
    q.xq.resize(rows * kpad, 0);
    q.sx.resize(m * groups, 0.0);
    q.qsum.resize(m * units, 0);
    q.xq[m * kpad..].fill(0);
    if inn == 0 {
        q.xq.fill(0);
        q.sx.fill(0.0);
        q.qsum.fill(0);
        return true;
    }
    // The 512-bit code on the AVX-512 path (where the CPU has VNNI too), else AVX2 wherever
    // the CPU has it: every form gives the portable code's bits.
    let simd: Option<QuantizeGroups> = {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::kernel_path() == KernelPath::Avx512 && has_avx512vnni() {
                Some(avx512vnni::quantize_groups)
            } else if crate::cpu::has_avx2_fma_f16c() {
                Some(avx2::quantize_groups)
            } else {
                None
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    };
    let flip = layout.flip;
    let one = |(((xv, xq), sx), qs): QuantizeRow<'_>| match simd {
        // SAFETY: `simd` was chosen above for a CPU that has its features.
        Some(g) => unsafe { quantize_row_simd(g, xv, xq, sx, qs, unit, flip) },
        None => quantize_row(xv, xq, sx, qs, unit, flip),
    };
    let rows = x
        .chunks(inn)
        .zip(q.xq.chunks_mut(kpad))
        .zip(q.sx.chunks_mut(groups))
        .zip(q.qsum.chunks_mut(units));
    if parallel && m > 1 {
        let rows = x
            .par_chunks(inn)
            .zip(q.xq.par_chunks_mut(kpad))
            .zip(q.sx.par_chunks_mut(groups))
            .zip(q.qsum.par_chunks_mut(units));
        // A few rows per task: one row is about a µs of work.
        rows.with_min_len(8).map(one).reduce(|| true, |a, b| a && b)
    } else {
        let mut rows = rows;
        rows.all(one)
    }
}

/// One vector of x, its int8 values, its group scales and its unit sums.
type QuantizeRow<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [i32]);

/// A SIMD tier's quantization of whole groups (`avx2::quantize_groups`,
/// `avx512vnni::quantize_groups`): [`quantize_row`]'s arguments and bits for an `xv` of whole
/// groups of [`GROUP`] (`xq` as long, `sx` one scale per group, `qs` one sum per unit; `unit`
/// 16, 64 or 128), returning whether every element was finite. Safety: the tier's CPU
/// features.
pub(crate) type QuantizeGroups =
    unsafe fn(&[f32], &mut [i8], &mut [f32], &mut [i32], usize, u8) -> bool;

/// The lengths a [`QuantizeGroups`] needs, checked (a panic names the mismatch); returns the
/// number of groups and of units per group.
#[inline(always)]
fn check_groups(xv: &[f32], xq: &[i8], sx: &[f32], qs: &[i32], unit: usize) -> (usize, usize) {
    let full = xv.len() / GROUP;
    assert!(
        matches!(unit, 16 | 64 | 128)
            && xv.len() == full * GROUP
            && xq.len() == xv.len()
            && sx.len() == full
            && qs.len() == xv.len() / unit,
        "quantize_groups: {} values, {} bytes, {} scales, {} sums, unit {unit}",
        xv.len(),
        xq.len(),
        sx.len(),
        qs.len()
    );
    (full, GROUP / unit)
}

/// [`quantize_row`]'s bits with the whole groups by the SIMD tier `groups` and a partial last
/// group and the padding by the portable code.
///
/// # Safety
/// The CPU has `groups`'s features; the lengths [`quantize_row`] expects.
unsafe fn quantize_row_simd(
    groups: QuantizeGroups,
    xv: &[f32],
    xq: &mut [i8],
    sx: &mut [f32],
    qs: &mut [i32],
    unit: usize,
    flip: u8,
) -> bool {
    let full = xv.len() / GROUP;
    let (tail, units) = (full * GROUP, full * (GROUP / unit.max(1)));
    // SAFETY: the caller's contract; the slices are `full` whole groups.
    let finite = unsafe {
        groups(
            &xv[..tail],
            &mut xq[..tail],
            &mut sx[..full],
            &mut qs[..units],
            unit,
            flip,
        )
    };
    if tail == xq.len() {
        return finite;
    }
    let rest = quantize_row(
        &xv[tail..],
        &mut xq[tail..],
        &mut sx[full..],
        &mut qs[units..],
        unit,
        flip,
    );
    finite && rest
}

/// Quantizes one vector `xv` (see the [module docs](self)) into `xq` (`kpad` long, its tail
/// past `xv` zero), its group scales `sx` and its unit sums `qs`, each byte of `xq` XORed with
/// `flip` (see [`XLayout`]); `false` if an element is not finite. Written in independent lanes
/// of 8 so that it vectorizes where compiled for a vector unit (the SIMD tiers' own code,
/// [`QuantizeGroups`], does whole groups and leaves the rest to this); the
/// maximum is exact in any order, so every build gives the same bits.
#[inline(always)]
fn quantize_row(
    xv: &[f32],
    xq: &mut [i8],
    sx: &mut [f32],
    qs: &mut [i32],
    unit: usize,
    flip: u8,
) -> bool {
    const LANES: usize = 8;
    let mut finite = true;
    for (g, grp) in xv.chunks(GROUP).enumerate() {
        // Lane maxima of |x|, and lane sums of x · 0 (NaN once an element is NaN or infinite).
        let (mut most, mut probe) = ([0.0f32; LANES], [0.0f32; LANES]);
        let mut chunks = grp.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let a = c[l].abs();
                most[l] = if a > most[l] { a } else { most[l] };
                probe[l] += c[l] * 0.0;
            }
        }
        for (l, &v) in chunks.remainder().iter().enumerate() {
            let a = v.abs();
            most[l] = if a > most[l] { a } else { most[l] };
            probe[l] += v * 0.0;
        }
        finite &= probe.iter().sum::<f32>() == 0.0;
        let amax = most.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
        sx[g] = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (d, &v) in xq[g * GROUP..].iter_mut().zip(grp) {
            *d = round_to_i8((v * inv).clamp(-127.0, 127.0));
        }
    }
    xq[xv.len()..].fill(0);
    for (s, c) in qs.iter_mut().zip(xq.chunks_exact_mut(unit)) {
        *s = c.iter().map(|&v| i32::from(v)).sum();
        for v in c {
            *v = (*v as u8 ^ flip) as i8;
        }
    }
    finite
}

/// The shared f32 combination of a row's unit sums against one vector:
/// `Σ_u sx_u · (scale_u · I_u) + offset_u · (sx_u · Q_u)` in 8 lane accumulators (unit `u` in
/// lane `u % 8`) reduced by a fixed tree, the same on every tier.
///
/// Only IEEE multiplies and adds (never fused), so compiling it for another target (the AVX2
/// wrapper [`avx2::combine`]) gives the same bits.
#[inline(always)]
fn combine_body(isum: &[i32], sx_u: &[f32], xo_u: &[f32], scale: &[f32], offset: &[f32]) -> f32 {
    #[inline(always)]
    fn term(i: i32, sx: f32, xo: f32, s: f32, o: f32) -> f32 {
        sx * (s * i as f32) + o * xo
    }
    let mut acc = [0.0f32; 8];
    let n = isum.len();
    let whole = n / 8 * 8;
    for ((((i8s, sx), xo), s), o) in isum[..whole]
        .chunks_exact(8)
        .zip(sx_u.chunks_exact(8))
        .zip(xo_u.chunks_exact(8))
        .zip(scale.chunks_exact(8))
        .zip(offset.chunks_exact(8))
    {
        for l in 0..8 {
            acc[l] += term(i8s[l], sx[l], xo[l], s[l], o[l]);
        }
    }
    for k in whole..n {
        acc[k % 8] += term(isum[k], sx_u[k], xo_u[k], scale[k], offset[k]);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// [`combine_body`] compiled for the best vector unit `tier` allows (same bits on every one).
#[inline]
fn combine(
    tier: IntTier,
    isum: &[i32],
    sx_u: &[f32],
    xo_u: &[f32],
    scale: &[f32],
    offset: &[f32],
) -> f32 {
    match tier {
        #[cfg(target_arch = "x86_64")]
        IntTier::Avx2
        | IntTier::AvxVnni
        | IntTier::AvxVnniEmulated
        | IntTier::Avx512Vnni
        | IntTier::Amx => {
            // SAFETY: the tier came through `supported`: Avx2, AvxVnni, AvxVnniEmulated,
            // Avx512Vnni and Amx CPUs have AVX2.
            unsafe { avx2::combine(isum, sx_u, xo_u, scale, offset) }
        }
        _ => combine_body(isum, sx_u, xo_u, scale, offset),
    }
}

/// `y`'s base pointer, shared by tasks that write disjoint columns of `y` (`[m, out]`), the
/// bias row added to every value written where there is one (null where not), and the step
/// applied after it.
#[derive(Clone, Copy)]
struct YPtr {
    y: *mut f32,
    bias: *const f32,
    /// Columns of y (the bias's length).
    cols: usize,
    /// Applied to `bias + v` (only with a bias).
    post: PostOp,
}
// SAFETY: each task writes only the columns of its own row tile (disjoint between tasks), and
// the `&mut y` borrow outlives every task (joined before `forward` returns).
unsafe impl Send for YPtr {}
// SAFETY: as above.
unsafe impl Sync for YPtr {}

impl YPtr {
    /// `y` (`cols` columns per row) with `bias` (`cols` values) added to every value written
    /// and then its step applied, where given.
    fn new(y: &mut [f32], bias: Option<(&[f32], PostOp)>, cols: usize) -> YPtr {
        debug_assert!(bias.is_none_or(|(b, _)| b.len() == cols));
        YPtr {
            y: y.as_mut_ptr(),
            bias: bias.map_or(std::ptr::null(), |(b, _)| b.as_ptr()),
            cols,
            post: bias.map_or(PostOp::Identity, |(_, p)| p),
        }
    }

    /// Element `idx` of y (for a pass of a task over its own rectangle).
    fn at(self, idx: usize) -> *mut f32 {
        self.y.wrapping_add(idx)
    }

    /// Writes (or with `accumulate` adds) `v` at element `idx` of `y`; with a bias, writes
    /// `post(v + bias[idx % cols])` (the bits of the bias written first, `v` added to it, then
    /// the step).
    ///
    /// # Safety
    /// `idx` lies inside `y`, in the columns that belong to the calling task alone.
    #[inline(always)]
    unsafe fn store(self, idx: usize, v: f32, accumulate: bool) {
        // SAFETY: the caller's contract; the bias has `cols` values.
        unsafe {
            let d = self.y.add(idx);
            *d = if accumulate {
                *d + v
            } else if self.bias.is_null() {
                v
            } else {
                self.post.apply1(*self.bias.add(idx % self.cols) + v)
            };
        }
    }

    /// Writes (or with `accumulate` adds) `src` at elements `idx..idx + src.len()` of `y`, in
    /// vector stores (a block's row of outputs, inside one row of y); with a bias, `src` plus
    /// the bias's values of those columns, then the step.
    ///
    /// # Safety
    /// The elements lie inside one row of `y`, in the columns that belong to the calling task
    /// alone.
    #[inline(always)]
    unsafe fn store_run(self, idx: usize, src: &[f32], accumulate: bool) {
        // SAFETY: the caller's contract: the run is inside `y` and this task's alone.
        let d = unsafe { std::slice::from_raw_parts_mut(self.y.add(idx), src.len()) };
        if accumulate {
            for (d, &v) in d.iter_mut().zip(src) {
                *d += v;
            }
        } else if self.bias.is_null() {
            // A whole panel's run as one 64-byte move: `copy_from_slice` calls `memcpy` for
            // a run of unknown length, 1–2 % of the integer GEMM's time at batch 1024.
            if let (Ok(d), Ok(src)) = (
                <&mut [f32; 16]>::try_from(&mut *d),
                <&[f32; 16]>::try_from(src),
            ) {
                *d = *src;
            } else {
                d.copy_from_slice(src);
            }
        } else {
            // SAFETY: the run lies in one row, so its columns are inside the bias.
            let b =
                unsafe { std::slice::from_raw_parts(self.bias.add(idx % self.cols), src.len()) };
            // One loop per step (the branch outside it), each of which vectorizes.
            #[inline(always)]
            fn biased(d: &mut [f32], src: &[f32], b: &[f32], post: impl Fn(f32) -> f32) {
                for ((d, &v), &b) in d.iter_mut().zip(src).zip(b) {
                    *d = post(b + v);
                }
            }
            match self.post {
                PostOp::Identity => biased(d, src, b, |v| v),
                PostOp::Relu => biased(d, src, b, |v| PostOp::Relu.apply1(v)),
            }
        }
    }
}

/// A LoRA adapter's `h · Bᵀ` (`h = x · Aᵀ`, `m x rank`; `Bᵀ` `rank x out`) for the int8 GEMM
/// to add to each task's rectangle of outputs while it is in that core's cache
/// ([`forward_low_rank`]), instead of a product of its own that reads y back and writes it
/// again.
pub(crate) struct LowRankTail<'a> {
    /// The borrow that `h_ptr` points into (`h`, row-major).
    _h: std::marker::PhantomData<&'a [f32]>,
    /// `h`'s first element and its number of values (`m · rank`).
    h_ptr: *const f32,
    h_len: usize,
    rank: usize,
    /// `Bᵀ` in the f32 GEMM's packed panels: columns `16u .. 16u + 16` at
    /// `bt[u · rank · 16 ..]`, element `(p, j)` at `p · 16 + j % 16` (zeros past `out`),
    /// packed a block of [`TAIL_BLOCK`] columns at a time by the first task that needs it
    /// ([`LowRankTail::ensure_block`]), through `bt_ptr`.
    bt: Vec<f32>,
    bt_ptr: *mut f32,
    /// B, to pack from.
    b: &'a dyn nibble_tensor::gemm::PackB,
    /// Per block of [`TAIL_BLOCK`] columns, its [`run_once`] stage.
    blocks: Vec<AtomicU8>,
    out: usize,
}

/// Columns of `Bᵀ` packed at a time (the integer GEMM's tasks' width, `gemm::N_BLOCK`).
const TAIL_BLOCK: usize = gemm::N_BLOCK;

// SAFETY: `h_ptr` points into the `&'a [f32]` that `_h` stands for, read only, each row after
// it was written (`from_raw_h`'s contract; `new`'s h is a shared borrow); `bt_ptr`
// into `bt`, each block of which is written only inside its `run_once` and read only once
// that returned (Release / Acquire), as `gemm`'s packed W is; `b` is `Sync`. So the tail may
// be used from any thread while it lives.
unsafe impl Sync for LowRankTail<'_> {}

/// Rows and panels of 16 columns of one low-rank tail kernel call.
pub(crate) const TAIL_ROWS: usize = 6;
pub(crate) const TAIL_PANELS: usize = 4;

thread_local! {
    /// The packed `Bᵀ` of this thread's last [`LowRankTail`], its storage reused (a fresh
    /// 128 KiB vector per call came from `mmap` and was cleared page by page each time).
    static TAIL_BT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<'a> LowRankTail<'a> {
    /// Whether a tail of this rank runs here: at least 1 and at most one K block of the f32
    /// GEMM (whose blocks' sums are added to y one by one), on a process path of AVX2 or
    /// AVX-512 (as `NIBBLE_KERNEL` may have forced it; the portable and scalar paths keep the
    /// f32 GEMM pass).
    pub(crate) fn fits(rank: usize) -> bool {
        let simd = matches!(
            crate::cpu::kernel_path(),
            KernelPath::Avx2Fma | KernelPath::Avx512
        );
        simd && rank > 0 && rank <= nibble_tensor::gemm::KC
    }

    /// The tail for `h · b` (`h`: `m x rank` row-major with `rank <= KC`, `b`: `rank x out`),
    /// or `None` where the fused pass would not give the f32 GEMM's bits or speed: `h` not
    /// row-major, a rank of 0 or above one K block of the GEMM (whose blocks' sums are added
    /// to y one by one), or a process path below AVX2.
    pub(crate) fn new(
        h: nibble_tensor::gemm::MatRef<'a, f32>,
        b: &'a dyn nibble_tensor::gemm::PackB,
        m: usize,
        out: usize,
    ) -> Option<LowRankTail<'a>> {
        use nibble_tensor::gemm::{PackB, NR};
        const _: () = assert!(NR == 16);
        let rank = h.cols();
        if !Self::fits(rank) || h.rows() != m || b.k() != rank || b.n() != out {
            return None;
        }
        let (h_ptr, ld, len) = PackB::as_row_major(&h).map(|(d, ld)| (d.as_ptr(), ld, d.len()))?;
        if ld != rank || len < m * rank {
            return None;
        }
        // SAFETY: `h` borrows `m · rank` values at `h_ptr` for 'a, read only.
        unsafe { Self::from_raw_h(h_ptr, m, rank, b, out) }
    }

    /// [`LowRankTail::new`] with h given as `m · rank` row-major values at `h_ptr`, which may
    /// be written while the tail lives (its rows computed by the pass that runs it, each
    /// before the tasks that read it: [`adapter::forward_adapter`]); `None` where no tail fits
    /// ([`LowRankTail::fits`]) or `b` is not `rank x out`.
    ///
    /// # Safety
    /// `h_ptr` addresses `m · rank` values valid for 'a; every row is written before
    /// [`LowRankTail::apply`] reads it and not while it does.
    pub(crate) unsafe fn from_raw_h(
        h_ptr: *const f32,
        m: usize,
        rank: usize,
        b: &'a dyn nibble_tensor::gemm::PackB,
        out: usize,
    ) -> Option<LowRankTail<'a>> {
        use nibble_tensor::gemm::NR;
        if !Self::fits(rank) || b.k() != rank || b.n() != out {
            return None;
        }
        let panels = out.div_ceil(NR);
        // Every value is written by the packing before it is read: no clearing pass.
        let mut bt = TAIL_BT.take();
        bt.truncate(panels * rank * NR);
        bt.resize(panels * rank * NR, 0.0);
        let bt_ptr = bt.as_mut_ptr();
        Some(LowRankTail {
            _h: std::marker::PhantomData,
            h_ptr,
            h_len: m * rank,
            rank,
            bt,
            bt_ptr,
            b,
            blocks: (0..out.div_ceil(TAIL_BLOCK))
                .map(|_| AtomicU8::new(0))
                .collect(),
            out,
        })
    }

    /// Packs the panels of block `blk` (columns `TAIL_BLOCK · blk ..`) unless they are
    /// ([`run_once`]).
    fn ensure_block(&self, blk: usize) {
        use nibble_tensor::gemm::NR;
        run_once(&self.blocks[blk], "packing a low-rank tail's block", || {
            let cols = blk * TAIL_BLOCK..self.out.min((blk + 1) * TAIL_BLOCK);
            for c0 in cols.step_by(NR) {
                let len = self.rank * NR;
                // SAFETY: panel c0 / NR lies inside `bt` (`ceil(out / NR)` panels of `len`),
                // and `run_once` runs this in one task alone: nothing else reads or writes
                // the block until it is done.
                let panel =
                    unsafe { std::slice::from_raw_parts_mut(self.bt_ptr.add(c0 / NR * len), len) };
                self.b
                    .pack_panel(0, self.rank, c0, NR.min(self.out - c0), panel);
            }
        });
    }

    /// `y[rows, cols] = post(y + h[rows] · Bᵀ[:, cols])` (y `m x out`, `cols` starting on a
    /// multiple of 16): every element `post(y + t)` with `t` the f32 GEMM's fused
    /// multiply-add chain from 0 over `p` in order, as the GEMM adds one K block to C, then
    /// `post` as its tasks apply it: the bits of that GEMM accumulating into y, then `post`.
    ///
    /// # Safety
    /// `y` holds `m x out`; the rectangle belongs to the calling task alone.
    pub(crate) unsafe fn apply(
        &self,
        y: *mut f32,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        post: PostOp,
    ) {
        const W: usize = 16 * TAIL_PANELS;
        debug_assert!(cols.start % 16 == 0 && cols.end <= self.out);
        if cols.is_empty() {
            return;
        }
        for blk in cols.start / TAIL_BLOCK..=(cols.end - 1) / TAIL_BLOCK {
            self.ensure_block(blk);
        }
        let panel = self.rank * 16;
        for r0 in rows.clone().step_by(TAIL_ROWS) {
            let nr = TAIL_ROWS.min(rows.end - r0);
            for c0 in cols.clone().step_by(W) {
                let nc = W.min(cols.end - c0);
                // SAFETY: rows r0..r0 + nr < m of h (m x rank) and of y; panels c0/16.. of bt
                // cover columns c0..c0 + nc <= out; the rectangle is the caller's.
                unsafe {
                    TailTile {
                        h: self.h_ptr.add(r0 * self.rank),
                        rank: self.rank,
                        rows: nr,
                        bt: self.bt_ptr.add(c0 / 16 * panel),
                        panel,
                        cols: nc,
                        y: y.add(r0 * self.out + c0),
                        ldy: self.out,
                    }
                    .run()
                };
                if post != PostOp::Identity {
                    for r in r0..r0 + nr {
                        // SAFETY: as above.
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(y.add(r * self.out + c0), nc) };
                        post.apply(row);
                    }
                }
            }
        }
    }
}

/// One tile of a low-rank tail: `y[r, c] += Σ_p h[r · rank + p] · bt[c / 16 · panel + p · 16 +
/// c % 16]` for `r < rows <= TAIL_ROWS`, `c < cols <= 16 · TAIL_PANELS` (y's rows `ldy` apart),
/// each sum a fused multiply-add chain from 0 with `p` in order, added to y last.
#[derive(Clone, Copy)]
pub(crate) struct TailTile {
    /// h's first row of the tile (`rank` values per row).
    pub(crate) h: *const f32,
    pub(crate) rank: usize,
    pub(crate) rows: usize,
    /// The packed `Bᵀ` panel of the tile's first column, panels `panel` floats apart.
    pub(crate) bt: *const f32,
    pub(crate) panel: usize,
    pub(crate) cols: usize,
    /// y at the tile's first element.
    pub(crate) y: *mut f32,
    pub(crate) ldy: usize,
}

impl TailTile {
    /// Runs the tile: AVX-512 on the process's AVX-512 path ([`crate::cpu::kernel_path`]), else
    /// AVX2 (the same bits).
    ///
    /// # Safety
    /// The pointers hold the elements the tile names; the CPU has AVX2 and FMA.
    unsafe fn run(self) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::kernel_path() == crate::cpu::KernelPath::Avx512 {
                // SAFETY: the caller's contract; the process's path is AVX-512, which the CPU
                // has.
                return unsafe { crate::arch::avx512::low_rank_tile(self) };
            }
            // SAFETY: the caller's contract (AVX2 and FMA).
            unsafe { crate::arch::avx2::low_rank_tile(self) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = self;
    }
}

impl Drop for LowRankTail<'_> {
    fn drop(&mut self) {
        TAIL_BT.set(std::mem::take(&mut self.bt));
    }
}

/// `y = post(bias + x · Wᵀ + h · Bᵀ)` with int8 activations (`tail` = `h · Bᵀ`, a LoRA
/// adapter): each task of the GEMM adds the tail's product to its rectangle of outputs once
/// it has stored them, then applies `post`, with the bits of [`forward_with_bias`] (or
/// [`forward`] without a bias) followed by the f32 GEMM accumulating `h · Bᵀ` into y and
/// `post`. Returns `false`, with `y` untouched, where [`forward`] would, below the GEMM's
/// batches ([`gemm::GEMM_MIN_M`]), and where `bias` does not have `out` values.
pub(crate) fn forward_low_rank(
    tier: IntTier,
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    tail: &LowRankTail<'_>,
    post: PostOp,
) -> bool {
    let Some((o, i, layout)) = gemm_layer(w, x, m, y, bias) else {
        return false;
    };
    if tail.h_len != m * tail.rank || tail.out != o {
        return false;
    }
    let tier = gemm_tier(tier, layout.unit);
    let threads = rayon::current_num_threads().max(1);
    let parallel = threads > 1 && o.saturating_mul(i).saturating_mul(m) >= PARALLEL_MIN_WORK;
    let mut q = QUANTIZED.take();
    let yp = YPtr::new(y, bias.map(|b| (b, PostOp::Identity)), o);
    let done = gemm::run(
        tier,
        w,
        layout,
        x,
        m,
        parallel,
        yp,
        false,
        &mut q,
        Some((tail, post)),
    );
    QUANTIZED.set(q);
    done
}

/// Runs `work` once for `stage` (0 at first): the first caller moves it to 1 and runs
/// `work`, then stores 2 (Release); any other caller meanwhile waits (spinning, then yielding
/// its core) until it reads 2 (Acquire), so what `work` wrote is visible to every caller once
/// this returns. A panic in `work` stores 3 and goes on unwinding; a caller waiting on it then
/// panics with `what`. For work that the tasks of one parallel pass share, done by the first
/// task that needs it (a block of packed weights, of h).
pub(crate) fn run_once(stage: &AtomicU8, what: &str, work: impl FnOnce()) {
    use std::sync::atomic::Ordering::{Acquire, Release};
    const EMPTY: u8 = 0;
    const RUNNING: u8 = 1;
    const DONE: u8 = 2;
    const FAILED: u8 = 3;
    if stage.load(Acquire) == DONE {
        return;
    }
    if stage
        .compare_exchange(EMPTY, RUNNING, Acquire, Acquire)
        .is_ok()
    {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
            Ok(()) => stage.store(DONE, Release),
            Err(panic) => {
                stage.store(FAILED, Release);
                std::panic::resume_unwind(panic);
            }
        }
        return;
    }
    let mut spins = 0u32;
    loop {
        match stage.load(Acquire) {
            DONE => return,
            FAILED => panic!("{what} panicked in another task"),
            _ if spins < 1 << 12 => {
                spins += 1;
                std::hint::spin_loop();
            }
            _ => std::thread::yield_now(),
        }
    }
}

/// W's `(out, in, layout)` where the integer GEMM takes a layer's batch: from
/// [`gemm::GEMM_MIN_M`] vectors, W non-empty with an integer layout in units of 16, 64 or
/// 128, `x` `[m, in]`, `y` `[m, out]` and `bias` (where given) `[out]`; `None` elsewhere.
pub(crate) fn gemm_layer(
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &[f32],
    bias: Option<&[f32]>,
) -> Option<(usize, usize, IntLayout)> {
    let (o, i) = w.int_dims();
    let layout = w.int_layout()?;
    (m >= gemm::GEMM_MIN_M
        && i > 0
        && o > 0
        && holds(x.len(), m, i)
        && holds(y.len(), m, o)
        && bias.is_none_or(|b| b.len() == o)
        && matches!(layout.unit, 16 | 64 | 128))
    .then_some((o, i, layout))
}

/// Multiply-adds (`out · in · m`) below which the forward stays on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// What a format's `matmul_t` runs for a batch under [`ActivationMode::Int8`] (see the
/// [module docs](self) for the measurements behind [`int8_route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Route {
    /// Q4's fused int8 GEMV, once per vector ([`crate::Q4Matrix::gemv_int8`]'s bits).
    FusedQ4,
    /// NF4's fused int8 GEMV at batch 1 on the AVX-512 VNNI and AMX tiers (`crate::nf4::act8`):
    /// the generic driver's int8 values and scales, its f32 steps in another order.
    FusedNf4,
    /// Lower's fused int8 GEMV (batch 1 and small batches) on the AVX-512 VNNI and AMX tiers,
    /// and on AVX-VNNI and AVX2 with its 256-bit kernels (`crate::lower::act8`): the generic
    /// driver's int8 values, its f32 steps in another order.
    FusedLower,
    /// The int8 format's fused int8 GEMV at batch 1 on the AVX-512 VNNI and AMX tiers
    /// (`crate::int8::act8`): the generic driver's int8 values, its f32 steps in another order.
    FusedInt8,
    /// The format-independent integer driver [`forward`].
    Generic,
    /// The f32 path: int8 mode changes nothing for this format and batch.
    F32,
}

/// Q4 batches below this run the fused int8 GEMV on every tier; up to where the tier's integer
/// GEMM starts, on the tiers where it starts later ([`q4_fused_end`]).
pub const Q4_FUSED_MAX_M: usize = 16;

/// The first Q4 batch on `tier` that leaves the fused int8 GEMV (one pass per vector over the
/// matrix's codes, [`crate::Q4Matrix::gemv_int8`]): where the tier's integer GEMM starts
/// ([`gemm_route`]), at least [`Q4_FUSED_MAX_M`]. Below 48 the AVX-512 VNNI, AMX and AVX-VNNI
/// tiers have no integer GEMM, and until the twenty-fifth session batches of 16 to 47 there ran
/// the f32 path: BigNet low_precision with int8 activations on the 2-core Xeon (2 threads,
/// 2026-12-05) took 5.9 / 10.6 / 13.7 ms at batch 16 / 32 / 47 that way against 2.0–2.4 / 4.3 /
/// 6.6 through the fused GEMV (qlora 7.7 / 12.1 / 14.0 against 4.1 / 5.0 / 7.7), and on the
/// AVX-VNNI tier (`NIBBLE_KERNEL=avx2`) 6.5 / 10.6 / 15.4 against 4.0 / 7.6 / 10.3 (batch 15
/// 2.24 ms, batch 48 on the integer GEMM 4.6).
pub fn q4_fused_end(tier: IntTier) -> usize {
    gemm_route(tier.supported(), "q4").map_or(Q4_FUSED_MAX_M, |r| r.start.max(Q4_FUSED_MAX_M))
}

/// NF4 (and NF4-dq) batches below this run [`forward`] on the AVX2 tier (its dot-product
/// driver below [`gemm::GEMM_MIN_M`]); larger ones where [`gemm_route`] says so. On the
/// AVX-512 VNNI tier NF4's small batches stay f32: on the 16-core Xeon (16 threads, one 1024²
/// layer) the integer path took 0.048 ms at batch 1 against 0.031 for f32. On AVX-VNNI too
/// (the same Xeon, `NIBBLE_KERNEL=avx2`, int8 / f32 time: 2 threads, batch 1 0.98–1.18, batch 8
/// 0.75; 16 threads 0.74–1.26 and 2.6–3.6).
pub const NF4_GENERIC_MAX_M: usize = 9;

/// Where the integer GEMM starts for NF4 on the AVX-512 VNNI and AMX tiers ([`gemm_route`]),
/// and so where its fused GEMV stops ([`fused_end`]): since the fused GEMV runs up to 8 vectors
/// in one pass over each tile of rows (`nf4_int8::gemv_batch`) it beats the GEMM (here on
/// AMX) below 10. BigNet with int8 activations, 2 threads of the 2-core Xeon, three rounds in
/// turns (2026-12-05), fused / GEMM, ms: batch 8 1.37–1.61 / 1.79–1.83, 10 1.86–2.13 /
/// 1.87–1.95, 12 2.46–2.79 / 1.93–1.94, 16 3.09–3.61 / 2.21–2.26.
///
/// In the twenty-sixth session the GEMM started at 8 for NF4, int8 and lower (where it starts
/// at all, [`gemm::GEMM_MIN_M`]), their small batches then running vector by vector. The driver of 2026-12-05 against the f32
/// path, one 1024² layer (`act8_bench`, generic / f32 time, the minima of 7, nf4, nf4_dq, int8,
/// lower): 16-core Xeon, AMX tier, 16 threads, batch 8 0.78–0.90, 16 0.63–0.83, 32 0.51–0.64,
/// 47 0.48–0.53; 8 threads 0.86–1.02, 0.71–0.89, 0.55–0.64, 0.49–0.58; 4 threads 0.73–0.88,
/// 0.54–0.66, 0.48–0.57, 0.45–0.51; 2-core Xeon, 2 threads 0.57–0.76, 0.39–0.55, 0.37–0.52,
/// 0.32–0.46. From 16 every thread count gains; at 8 all but 8 threads, which break even. BigNet
/// with int8 activations, 2 threads, three rounds in turns, the GEMM from 16 / from 8, ms: nf4
/// at batch 8 2.88–3.05 / 1.61–1.83, 12 3.66–3.71 / 1.68–2.12; int8 2.35–2.68 / 1.43–1.72,
/// 3.36–3.42 / 1.53–1.87; lower 3.12–3.34 / 2.37–3.05, 3.84–4.31 / 2.45–2.70. (On 2026-12-03
/// the driver of then lost at 32 on 16 threads, 1.03–1.48x, hence the earlier 48.)
pub const NF4_GEMM_START_512: usize = 10;

/// [`NF4_GEMM_START_512`] for the int8 format (`int8_int8::gemv_batch`): the same runs, fused /
/// GEMM, ms: batch 8 1.10–1.15 / 1.48–1.87, 10 1.39–1.43 / 1.55–1.84, 12 1.58–1.63 /
/// 1.60–1.97, 14 1.84–1.89 / 1.78–2.00, 16 2.53–2.67 / 1.67–2.01; in a second pairing batch 9
/// 1.33–1.34 / 1.48–1.53, 11 1.60 / 1.53.
pub const INT8_GEMM_START_512: usize = 11;

/// [`NF4_GEMM_START_512`] for lower (`lower_int8::gemv_batch`); batches of 6 to 9 ran its f32
/// path (the batch tiles) or the GEMM before. The same hour, 2 threads, fused / before
/// (6 and 7 the batch tiles, then the GEMM), ms: batch 6 1.30–1.41 / 2.88–3.08, 7 1.43–1.50 /
/// 3.13–3.41, 8 1.48–1.87 / 2.54–2.82, 10 2.48–2.80 / 2.53–2.79, 12 2.98–3.14 / 2.54–2.90.
pub const LOWER_GEMM_START_512: usize = 10;
const _: () = assert!(NF4_GEMM_START_512 >= gemm::GEMM_MIN_M);
const _: () = assert!(INT8_GEMM_START_512 >= gemm::GEMM_MIN_M);
const _: () = assert!(LOWER_GEMM_START_512 >= gemm::GEMM_MIN_M);

/// The batches for which int8 mode runs the integer GEMM ([`gemm`], through [`forward`]) for
/// a format on a tier (Q4 keeps its fused GEMV below [`q4_fused_end`], which follows this),
/// or `None` where the GEMM is not routed at all. AVX2 (measured on the Zen 3, see the
/// [module docs](self)): Q4 and lower at every batch from 16, NF4 from 8 (with its
/// dot-product driver below, every NF4 batch runs int8) and int8 from 24. (Until the
/// thirteenth session NF4 and int8 stopped at 512, where their f32 path had measured as fast;
/// on the 2-core Zen 3, 2026-12-04, 2 threads, one 1024² layer, generic driver int8 / f32
/// time, two runs: batch 256 0.63–0.69, 512 0.69–0.71, 1024 0.72–0.74, 2048 0.73–0.75 for
/// nf4, nf4_dq and int8.) AVX-512 VNNI and AMX, measured on the 16-core Xeon (one 1024²
/// layer, `act8_bench`, generic driver int8 / f32 time, medians of 7, 2026-12-03 16:01 UTC,
/// after x's quantization was vectorized and its buffers kept): 16 threads, AMX tier, batch
/// 32 1.03–1.48 (lower to nf4_dq), 48 0.57–0.79, 64 0.48–0.74, 128 0.45–0.62, 256 0.26–0.56,
/// 1024 0.37–0.59; VNNI tier 32 1.05–1.51, 48 0.69–0.95, 64 0.53–0.76, 128 0.47–0.63, 256
/// 0.41–0.46, 1024 0.46–0.52; 2 threads, AMX tier, batch 16 0.63–0.91, 64 0.41–0.60, 256
/// 0.32–0.55, 1024 0.31–0.54. So every format from 48 on both tiers then (on 2 threads smaller
/// batches would gain too; 48 was where 16 threads stopped losing); since the twenty-sixth
/// session NF4, int8 and lower from 8, and since the twenty-eighth where their fused batch
/// kernels stop winning ([`NF4_GEMM_START_512`]). Q4 runs its units of 16 on
/// the VNNI tier under AMX (see [`forward`]). AVX-VNNI, measured on the same Xeon (which has
/// it) with `NIBBLE_KERNEL=avx2`, 2026-12-03 16:25 UTC, generic driver int8 / f32 time: 2
/// threads, batch 8 0.75–1.00, 16 0.61–0.87, 64 0.43–0.53, 256 0.36–0.50, 1024 0.37–0.57 (the
/// AVX2 tier in the same run 0.71–1.32 at 64 to 1024); 16 threads, batch 16 1.26–2.46, 64
/// 0.50–1.75 (noisy), 256 0.33–0.87, 1024 0.24–0.46. So every format from 48, at every larger
/// batch (one `vpdpbusd` per four columns makes the 8-bit codes as cheap as the 4-bit ones,
/// unlike AVX2); since the thirty-first session NF4, int8 and lower from
/// [`GEMM_START_AVXVNNI`] (their 256-bit fused GEMVs below). The portable and emulated tiers:
/// `None` (not measured; the f32 path runs).
pub fn gemm_route(tier: IntTier, format: &str) -> Option<std::ops::Range<usize>> {
    // (The measurements behind the start of NF4, int8 and lower on the 512-bit tiers:
    // [`NF4_GEMM_START_512`], [`INT8_GEMM_START_512`], [`LOWER_GEMM_START_512`].)
    match (tier, format) {
        (IntTier::Amx | IntTier::Avx512Vnni, "nf4") => Some(NF4_GEMM_START_512..usize::MAX),
        (IntTier::Amx | IntTier::Avx512Vnni, "int8") => Some(INT8_GEMM_START_512..usize::MAX),
        (IntTier::Amx | IntTier::Avx512Vnni, "lower") => Some(LOWER_GEMM_START_512..usize::MAX),
        (IntTier::Amx | IntTier::Avx512Vnni | IntTier::AvxVnni, "q4") => Some(48..usize::MAX),
        (IntTier::AvxVnni, "nf4" | "int8" | "lower") => Some(GEMM_START_AVXVNNI..usize::MAX),
        (IntTier::Avx2, "q4" | "lower") => Some(GEMM_START_AVX2_4BIT..usize::MAX),
        (IntTier::Avx2, "nf4") => Some(gemm::GEMM_MIN_M..usize::MAX),
        (IntTier::Avx2, "int8") => Some(24..usize::MAX),
        _ => None,
    }
}

/// The route of a batch of `m` vectors through a format named `format` (its
/// `WeightMatrix::format_name`: `q4`, `nf4`, `int8`, `lower`) under [`ActivationMode::Int8`] on
/// the tier of the current kernel path ([`int8_route_on`]).
pub fn int8_route(format: &str, m: usize) -> Int8Route {
    int8_route_on(IntTier::for_path(crate::cpu::kernel_path()), format, m)
}

/// [`fused_end`] on `tier`: the int8 format, NF4 and lower on AVX-VNNI up to
/// [`INT8_FUSED_END_AVXVNNI`], [`NF4_FUSED_END_AVXVNNI`] and [`LOWER_FUSED_END_AVXVNNI`], on
/// AVX2 up to [`FUSED_END_AVX2`] (lower [`LOWER_FUSED_END_AVX2`]), every other case as
/// [`fused_end`] (the route checks [`fused_on_tier`] besides).
pub fn fused_end_on(tier: IntTier, format: &str) -> usize {
    match (tier, format) {
        (IntTier::AvxVnni, "int8") => INT8_FUSED_END_AVXVNNI,
        (IntTier::AvxVnni, "nf4") => NF4_FUSED_END_AVXVNNI,
        (IntTier::AvxVnni, "lower") => LOWER_FUSED_END_AVXVNNI,
        (IntTier::Avx2, "nf4" | "int8") => FUSED_END_AVX2,
        (IntTier::Avx2, "lower") => LOWER_FUSED_END_AVX2,
        _ => fused_end(format),
    }
}

/// Where the int8 format's fused int8 GEMV stops on the AVX-VNNI tier (its 256-bit kernels,
/// `crate::arch::avx2::int8_int8`): where the tier's integer GEMM starts ([`gemm_route`],
/// [`GEMM_START_AVXVNNI`]), since the fused GEMV beats the f32 path at every smaller batch. BigNet's int8 format on the 2-core
/// Xeon with `NIBBLE_KERNEL=avx2` (its AVX-VNNI), 2 threads, two rounds of the final build, f32
/// path → fused, ms (2026-12-06): batch 1 0.94–1.35 → 0.49–0.60, 2 1.86–2.35 → 0.60–1.27, 4
/// 3.46–3.64 → 1.20–1.52, 8 5.19–5.36 → 2.67–5.60, 16 8.37–9.57 → 5.36–5.54, 24 9.87–13.83 →
/// 8.42–8.45, 32 14.57–14.71 → 10.87–11.56, 47 19.96–20.70 → 16.04–17.24 (the GEMM at 48:
/// 8.59–8.69 in an earlier pairing).
pub const INT8_FUSED_END_AVXVNNI: usize = GEMM_START_AVXVNNI;

/// Where the AVX-VNNI tier's integer GEMM starts for NF4 (and NF4-dq), the int8 format and
/// lower ([`gemm_route`]; their fused GEMVs run below it). It was 48 for every format (set
/// against the f32 path on 16 threads, before these formats had 256-bit fused GEMVs); against
/// the fused GEMVs the GEMM wins from about 12. BigNet with int8 activations on the 16-core
/// Xeon with `NIBBLE_KERNEL=avx2` (its AVX-VNNI), medians of 30, three rounds in turns
/// (2026-12-06 06:25 and 06:30 UTC), ms, GEMM from 24 against 48: 16 threads, batch 24 / 32 /
/// 47, int8 2.39–2.60 / 2.99–3.42 / 4.02–5.15 → 1.74–1.89 / 1.84–2.30 / 2.43–2.70, nf4
/// 3.07–3.54 / 3.78–4.52 / 5.15–5.57 → 1.77–2.61 / 1.99–2.51 / 2.29–3.45, nf4_dq 3.28–4.01 /
/// 4.01–4.18 / 5.21–5.64 → 1.86–2.03 / 2.08–2.36 / 2.31–2.89, lower_precision 3.27–3.55 /
/// 4.17–4.39 / 5.70–6.27 → 1.98–2.38 / 2.08–3.48 / 2.40–2.98; 2 threads int8 5.55–6.82 /
/// 7.14–9.11 / 9.96–15.69 → 4.16–4.85 / 4.24–5.74 / 7.69–7.83, nf4 9.95–12.90 / 11.93–12.72 /
/// 17.15–19.31 → 4.41–5.82 / 4.35–6.94 / 5.54–7.23, lower_precision 6.17–10.29 / 8.37–14.15 /
/// 12.31–16.47 → 5.38–6.67 / 4.92–7.09 / 6.43–8.98. From 12 against 24 (three rounds): 16
/// threads, batch 12 / 16 / 20, int8 1.19–1.55 / 1.65–2.02 / 1.99–2.24 → 1.22–1.66 /
/// 1.47–1.72 / 1.56–1.97, nf4 1.82–2.13 / 2.36–2.39 / 2.79–2.97 → 1.30–1.57 / 1.48–1.59 /
/// 1.63–1.81, nf4_dq 1.77–1.93 / 2.38–2.50 / 2.80–3.10 → 1.31–1.51 / 1.51–1.61 / 1.69–1.77,
/// lower_precision 1.90–2.26 / 2.41–2.58 / 2.96–3.30 → 1.49–1.77 / 1.68–2.25 / 1.90–2.20; 2
/// threads int8 2.73–3.93 / 3.53–5.31 / 4.81–6.67 → 3.27–4.17 / 3.92–4.56 / 4.37–5.49, nf4
/// 5.57–6.03 / 5.41–6.88 / 6.52–7.16 → 3.92–4.62 / 4.59–5.33 / 4.54–5.89, lower_precision
/// 3.88–5.98 / 4.82–7.81 / 7.46–10.23 → 3.77–5.80 / 5.05–6.12 / 6.12–7.47 (the int8 format at
/// 12 and 16 on 2 threads a tie). Q4 keeps 48: its GEMM from 24 was faster on 16 threads
/// (low_precision at 32 / 47 3.21–3.51 / 4.25–5.05 → 2.30–2.43 / 2.66–2.84 ms) but not on 2
/// (6.11–9.65 / 8.28–13.43 → 8.66–8.99 / 10.94–11.13), where its interleaved fused GEMV holds.
pub const GEMM_START_AVXVNNI: usize = 12;
const _: () = assert!(GEMM_START_AVXVNNI >= gemm::GEMM_MIN_M);

/// Where the fused int8 GEMVs of NF4 and the int8 format stop on the plain AVX2 tier (their
/// 256-bit kernels with `vpdpbusd`'s sums by `vpmaddwd` pairs); from here NF4 runs the integer
/// GEMM (from [`gemm::GEMM_MIN_M`]), the int8 format the f32 path up to its GEMM (24).
/// Measured on the 2-core Xeon with `NIBBLE_KERNEL=avx2 NIBBLE_AVXVNNI=0` (AVX2 code on an
/// Intel core; not on a Zen 3), BigNet with int8 activations, 2 threads, two rounds, before (the
/// f32 path for int8, the dot-product driver for NF4) → fused, ms (2026-12-06): int8 batch 1
/// 0.92–1.21 → 0.59–0.92, 2 2.21–2.30 → 1.44–1.79, 4 3.38–3.44 → 2.56–2.60, 8 4.94–4.95 →
/// 4.81–4.84 (a tie), 16 8.23–8.54 → 9.21–9.72; nf4 batch 1 1.62–2.43 → 0.78–1.32, 2 3.70–3.73
/// → 1.90–1.94, 4 4.71–5.01 → 3.49–3.50, 8 (the GEMM) 5.07–5.27 → 6.87–7.04; in a second
/// pairing the fused GEMV at batch 4 / 7 took 2.53–3.03 / 4.72–5.33 for int8 (the f32 path at
/// 8: 4.94–4.95 above) and 3.63–4.31 / 6.19–7.66 for NF4 (the GEMM at 8: 5.49–6.22). So batches
/// 1 to 4.
pub const FUSED_END_AVX2: usize = 5;

/// Where lower's fused int8 GEMV stops on the AVX-VNNI tier (its 256-bit kernels,
/// `crate::arch::avx2::lower_int8`): where the tier's integer GEMM starts
/// ([`GEMM_START_AVXVNNI`]), as for the int8 format. Below 32 the fused GEMV clearly beats the
/// f32 path (from 32 to 47 BigNet ties while one layer still gains). BigNet's lower_precision on the 2-core Xeon with
/// `NIBBLE_KERNEL=avx2` (its AVX-VNNI), 2 threads, two rounds in turns, f32 path → fused, ms
/// (2026-12-06): batch 1 2.60–2.82 → 0.95–0.96, 2 5.49–9.44 → 1.47–2.07, 4 4.71–6.52 →
/// 2.27–2.29, 8 7.29–8.25 → 4.50–4.70, 16 11.58–12.47 → 8.82–8.85, 24 15.52–16.53 →
/// 13.14–13.48, 32 18.58–19.10 → 18.03–18.21, 47 26.53–26.93 → 27.77–27.82 (the GEMM at 48:
/// 12.34–12.82); three more rounds at 24 / 32 / 40 / 47: 11.57–17.09 / 14.85–20.16 /
/// 21.10–26.06 / 25.61–27.16 → 13.24–14.38 / 17.68–17.95 / 21.66–22.51 / 26.30–26.83. One
/// 1024² layer (`act8_bench`, 2 threads, 21 rounds interleaved, fused / f32 medians): batch 16
/// 0.72–0.78, 24 0.74–0.84, 32 0.81–0.90, 40 0.76–1.09, 47 0.82–0.93. (The GEMM itself beat
/// the fused GEMV from about 10 there, BigNet fused → GEMM, three rounds: batch 8 4.37–4.79 →
/// 5.64–5.99, 10 6.39–6.85 → 6.14–6.32, 16 8.55–8.94 → 6.87–7.25, 32 15.95–18.19 → 7.89–9.82,
/// 47 24.07–26.97 → 10.29–11.52; the 16-core Xeon confirmed it, see [`GEMM_START_AVXVNNI`].)
pub const LOWER_FUSED_END_AVXVNNI: usize = GEMM_START_AVXVNNI;

/// Where lower's fused int8 GEMV stops on the plain AVX2 tier (its 256-bit kernels with
/// `vpmaddubsw` pairs, exact for nibbles: 1.4–1.7x faster than `vpdpbusd`'s emulation there):
/// where the tier's integer GEMM starts ([`GEMM_START_AVX2_4BIT`]), since the fused GEMV beats
/// the f32 path at every smaller batch. BigNet's lower_precision on the 2-core Xeon with
/// `NIBBLE_KERNEL=avx2 NIBBLE_AVXVNNI=0` (AVX2 code on an Intel core; not on a Zen 3), 2
/// threads, two rounds in turns, f32 path → fused, ms (2026-12-06): batch 1 1.99–2.00 →
/// 0.98–1.04, 2 4.07–4.35 → 1.54–1.57, 4 5.28–5.64 → 2.54–2.64, 8 6.71–7.49 → 4.99–5.02, 12
/// 8.62–9.18 → 7.40–7.55, 15 9.80–11.06 → 9.08–9.20 (the GEMM at 16: 7.40–8.80).
pub const LOWER_FUSED_END_AVX2: usize = GEMM_START_AVX2_4BIT;

/// Where the plain AVX2 tier's integer GEMM starts for the formats of at most 4-bit codes, Q4
/// and lower ([`gemm_route`]; measured on the Zen 3, see its docs).
pub const GEMM_START_AVX2_4BIT: usize = 16;
const _: () = assert!(GEMM_START_AVX2_4BIT >= gemm::GEMM_MIN_M);

/// Where NF4's (and NF4-dq's) fused int8 GEMV stops on the AVX-VNNI tier
/// (`crate::arch::avx2::nf4_int8`): where the tier's integer GEMM starts
/// ([`GEMM_START_AVXVNNI`]; until the thirty-first session the fused GEMV stopped at 24, where
/// it no longer beat the f32 path, which ran from there to the GEMM's start then, 48). BigNet on the 2-core Xeon with
/// `NIBBLE_KERNEL=avx2` (its AVX-VNNI), 2 threads, two rounds of the final build, f32 path →
/// fused, ms (2026-12-06): nf4 batch 1 2.09–2.23 → 0.75–0.85, 2 3.81–4.03 → 1.26–1.37, 4
/// 4.69–4.95 → 2.15–2.48, 8 5.20–7.39 → 4.03–4.63, 16 8.78–10.88 → 8.09–9.33, 24 11.20–13.88
/// → 12.10–13.06 (a tie); nf4_dq at 1 / 8 / 16 / 24 2.30–2.83 → 0.87–0.90, 8.31–10.00 →
/// 4.81–4.92, 11.91–15.88 → 9.41–9.93, 15.25–23.45 → 14.29–15.92.
pub const NF4_FUSED_END_AVXVNNI: usize = GEMM_START_AVXVNNI;

/// Where the fused int8 GEMVs of NF4, lower and the int8 format stop on the AVX-512 VNNI and AMX
/// tiers (batch 1 and small batches over tiles of 64 rows of W, up to 8 vectors in one pass
/// over each row's codes, the formats' batch kernels, each row's codes from memory once per
/// tile; each vector gives the bits it gives alone): up to their GEMM's start
/// ([`INT8_GEMM_START_512`], [`NF4_GEMM_START_512`], [`LOWER_GEMM_START_512`]). Before the
/// batch kernels (each vector in turn over the tile; lower stopped at 6, where its f32 path, the
/// batch tiles, caught up):
/// BigNet with int8 activations on the 2-core Xeon, 2 threads, three rounds in turns, ms,
/// batch 2 / 3 / 4 / 5 / 7, before (the f32 path) → fused: int8 0.99–1.83 / 1.45–1.54 /
/// 1.65–1.68 / 2.06–2.16 / 2.41–2.52 → 0.52–0.54 / 0.63–0.67 / 0.79–1.38 / 0.91–0.93 /
/// 1.19–1.23; nf4 1.63–1.72 / 1.72–1.92 / 1.83–2.21 / 2.23–2.50 / 2.47–2.85 → 0.49–0.52 /
/// 0.70–0.74 / 0.92–0.95 / 1.12–1.18 / 1.51–1.66; nf4_dq 1.76–1.94 / 1.89–2.11 / 2.08–2.28 /
/// 2.47–2.65 / 2.91–3.06 → 0.58–0.61 / 0.82–0.88 / 1.06–1.15 / 1.32–1.45 / 1.88–1.93; lower
/// 1.91–2.08 / 2.22–2.31 / 2.35–2.46 / 2.67–2.86 → 0.64–0.69 / 0.95–1.80 / 1.21–1.27 /
/// 1.54–1.64 (at 6 and 7, in an earlier pairing, 2.79–2.86 / 3.03–3.19 against 1.95–3.14 /
/// 2.51–3.58: no clear gain). One thread, batch 2 / 4 / 7: int8 1.89 / 3.08 / 4.21 → 0.90 /
/// 1.37 / 2.20, nf4 3.03 / 3.55 / 4.71 → 0.78 / 1.56 / 2.71, lower 3.50 / 4.29 / 5.60 → 1.17 /
/// 2.47 / 4.02.
pub fn fused_end(format: &str) -> usize {
    match format {
        "lower" => LOWER_GEMM_START_512,
        "nf4" => NF4_GEMM_START_512,
        _ => INT8_GEMM_START_512,
    }
}

/// [`int8_route`] on `tier`: Q4 fused below [`q4_fused_end`] (16 on AVX2, 48 where the
/// integer GEMM starts at 48); NF4, lower and the int8 format fused below [`fused_end`] on
/// AVX-512 VNNI and AMX, and below [`fused_end_on`] on AVX-VNNI and AVX2 ([`fused_on_tier`]) (at batch 1, one 1024² layer on one thread of a 2-core Intel Xeon: NF4
/// 24–26 µs against 50–54 µs for f32 (`crate::nf4::act8`), where the dot-product driver took
/// 2.2x f32's time; lower 30 µs against 90 (`crate::lower::act8`), the driver 1.7x; the int8
/// format 26 µs against 45 (`crate::int8::act8`)), and NF4's dot-product driver below 9 on
/// AVX2; the GEMM where [`gemm_route`] says; everything else f32. (An x holding a NaN or
/// infinity, or an NF4 matrix without an integer layout, takes the f32 path whatever the
/// route.)
pub fn int8_route_on(tier: IntTier, format: &str, m: usize) -> Int8Route {
    match format {
        "q4" if m < q4_fused_end(tier) => Int8Route::FusedQ4,
        "nf4" | "lower" | "int8"
            if m < fused_end_on(tier.supported(), format)
                && fused_on_tier(format, tier.supported()) =>
        {
            match format {
                "nf4" => Int8Route::FusedNf4,
                "lower" => Int8Route::FusedLower,
                _ => Int8Route::FusedInt8,
            }
        }
        "nf4" if m < NF4_GENERIC_MAX_M && tier.supported() == IntTier::Avx2 => Int8Route::Generic,
        _ if gemm_route(tier.supported(), format).is_some_and(|r| r.contains(&m)) => {
            Int8Route::Generic
        }
        _ => Int8Route::F32,
    }
}

/// `y (+)= x · Wᵀ` with int8 activations on `tier` (any batch `m`: dot products below
/// [`gemm::GEMM_MIN_M`], the integer GEMM from there): `x` `[m, in]`, `y` `[m, out]`. The
/// calling thread keeps the GEMM's packed W and x buffers of its last call for the next one
/// (about `out · in` bytes plus 8 bytes per row and unit, and `m · in` bytes of quantized x),
/// so that a forward through layers of one shape allocates and page-faults nothing after its
/// first layer. Returns `false`, with `y` untouched, when the shapes do not match, `w` has no
/// integer layout, `in == 0`, or x holds a NaN or infinity (the caller then runs the f32 path,
/// so that those propagate exactly as there).
pub fn forward(
    tier: IntTier,
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) -> bool {
    forward_into(tier, w, x, m, y, accumulate, None)
}

/// `y = post(x · Wᵀ + bias)` with int8 activations (a linear layer's forward and the step
/// after it; `bias` `[out]`): the bits of `y` filled with the bias rows, [`forward`]
/// accumulating, then `post` on y, without the passes that fill y, read it back and apply
/// `post`. Returns `false`, with `y` untouched, where [`forward`] would, and where `bias` does
/// not have `out` values.
pub fn forward_with_bias(
    tier: IntTier,
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    bias: &[f32],
    post: PostOp,
) -> bool {
    bias.len() == w.int_dims().0 && forward_into(tier, w, x, m, y, false, Some((bias, post)))
}

/// [`forward`], with `bias` (`out` values, `accumulate` false) added to every output and the
/// step after it applied where given.
fn forward_into(
    tier: IntTier,
    w: &dyn IntCodes,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
    bias: Option<(&[f32], PostOp)>,
) -> bool {
    let (o, i) = w.int_dims();
    debug_assert!(bias.is_none_or(|(b, _)| b.len() == o && !accumulate));
    let Some(layout) = w.int_layout() else {
        return false;
    };
    if i == 0
        || !holds(x.len(), m, i)
        || !holds(y.len(), m, o)
        || !matches!(layout.unit, 16 | 64 | 128)
    {
        return false;
    }
    if m == 0 || o == 0 {
        return true;
    }
    let unit = layout.unit;
    let tier = gemm_tier(tier, unit);
    let threads = rayon::current_num_threads().max(1);
    let parallel = threads > 1 && o.saturating_mul(i).saturating_mul(m) >= PARALLEL_MIN_WORK;
    // The quantized x of this thread's last call, its storage reused.
    let mut q = QUANTIZED.take();
    if m >= gemm::GEMM_MIN_M {
        let yp = YPtr::new(y, bias, o);
        let done = gemm::run(
            tier, w, layout, x, m, parallel, yp, accumulate, &mut q, None,
        );
        QUANTIZED.set(q);
        return done;
    }
    if !quantize_x_into(x, m, i, unit, parallel, &mut q, XLayout::PLAIN) {
        QUANTIZED.set(q);
        return false;
    }
    let (kpad, units) = (q.kpad, q.kpad / unit);
    let (sx_u, xo_u) = unit_scales(&q, m);
    let yp = YPtr::new(y, bias, o);
    let run = |t: usize| {
        let r0 = t * ROW_TILE;
        let nr = ROW_TILE.min(o - r0);
        let mut scratch = RowScratch::take(nr * kpad, nr * units, 4 * units);
        let RowScratch {
            codes,
            scale,
            offset,
            isum,
        } = &mut scratch;
        for p in 0..nr {
            row_operands(
                w,
                r0 + p,
                unit,
                &mut codes[p * kpad..(p + 1) * kpad],
                &mut scale[p * units..(p + 1) * units],
                &mut offset[p * units..(p + 1) * units],
            );
        }
        let put = |b: usize, r: usize, v: f32| {
            // SAFETY: b < m and r < o: inside y (m x o); column r belongs to this task's
            // row tile alone.
            unsafe { yp.store(b * o + r, v, accumulate) }
        };
        let xq = |b: usize| &q.xq[b * kpad..(b + 1) * kpad];
        let qs = |b: usize| &q.qsum[b * units..(b + 1) * units];
        let mut b = 0;
        while b < m {
            let nv = if m - b >= 4 { 4 } else { 1 };
            for p in 0..nr {
                let c = &codes[p * kpad..(p + 1) * kpad];
                let (s, z) = (
                    &scale[p * units..(p + 1) * units],
                    &offset[p * units..(p + 1) * units],
                );
                let at = |v: usize| (b + v) * units..(b + v + 1) * units;
                if nv == 1 {
                    let (sx, xo) = (&sx_u[at(0)], &xo_u[at(0)]);
                    let val = dot_row(tier, layout, c, s, z, xq(b), qs(b), sx, xo, isum);
                    put(b, r0 + p, val);
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if unit == 16
                    && matches!(
                        tier,
                        IntTier::Avx2 | IntTier::AvxVnni | IntTier::AvxVnniEmulated
                    )
                {
                    // SAFETY: the tier is one of those three (checked by `supported`);
                    // every slice has `units` (or `kpad` = 16·units) elements, a
                    // multiple of 8 units.
                    let vals = unsafe {
                        dot_units16::<4>(
                            tier,
                            layout.kind,
                            c,
                            [xq(b), xq(b + 1), xq(b + 2), xq(b + 3)],
                            [&sx_u[at(0)], &sx_u[at(1)], &sx_u[at(2)], &sx_u[at(3)]],
                            [&xo_u[at(0)], &xo_u[at(1)], &xo_u[at(2)], &xo_u[at(3)]],
                            s,
                            z,
                        )
                    };
                    for (v, val) in vals.into_iter().enumerate() {
                        put(b + v, r0 + p, val);
                    }
                    continue;
                }
                let (i0, rest) = isum.split_at_mut(units);
                let (i1, rest) = rest.split_at_mut(units);
                let (i2, i3) = rest.split_at_mut(units);
                unit_sums_checked(
                    tier,
                    layout.kind,
                    unit,
                    c,
                    [xq(b), xq(b + 1), xq(b + 2), xq(b + 3)],
                    [qs(b), qs(b + 1), qs(b + 2), qs(b + 3)],
                    [i0, i1, i2, &mut i3[..units]],
                );
                for v in 0..nv {
                    let val = combine(
                        tier,
                        &isum[v * units..(v + 1) * units],
                        &sx_u[at(v)],
                        &xo_u[at(v)],
                        s,
                        z,
                    );
                    put(b + v, r0 + p, val);
                }
            }
            b += nv;
        }
        scratch.give_back();
    };
    let tiles = o.div_ceil(ROW_TILE);
    if parallel {
        (0..tiles).into_par_iter().for_each(run);
    } else {
        (0..tiles).for_each(run);
    }
    QUANTIZED.set(q);
    true
}

/// Quantizes one vector `x` as [`forward`] does for units of `unit` columns, into this thread's
/// reused storage, and calls `f` with it; `false` (and `f` not called) where x holds a NaN or
/// infinity. (The fused batch-1 GEMVs prepare their x through this, so that they see the
/// driver's int8 values.)
pub(crate) fn with_quantized_row(x: &[f32], unit: usize, f: impl FnOnce(&QuantizedX)) -> bool {
    let mut q = QUANTIZED.take();
    let ok = quantize_x_into(x, 1, x.len(), unit, false, &mut q, XLayout::PLAIN);
    if ok {
        f(&q);
    }
    QUANTIZED.set(q);
    ok
}

/// Per unit of every vector of `q` (`m` of them): its group's scale `sx`, and that times the
/// unit's `Q_u` (the dot-product driver's operands for [`combine`]).
fn unit_scales(q: &QuantizedX, m: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut sx_u, mut xo_u) = (Vec::new(), Vec::new());
    unit_scales_into(q, m, &mut sx_u, &mut xo_u);
    (sx_u, xo_u)
}

/// [`unit_scales`] into `sx_u` and `xo_u` (their contents replaced, their storage reused).
fn unit_scales_into(q: &QuantizedX, m: usize, sx_u: &mut Vec<f32>, xo_u: &mut Vec<f32>) {
    let (kpad, unit) = (q.kpad, q.unit.max(1));
    let (units, per_group) = (kpad / unit, GROUP / unit);
    sx_u.clear();
    sx_u.extend(
        (0..m * units).map(|k| q.sx[(k / units) * (kpad / GROUP) + (k % units) / per_group]),
    );
    xo_u.clear();
    xo_u.extend(sx_u.iter().zip(&q.qsum).map(|(&s, &c)| s * c as f32));
}

/// Row `r` of `w` as the dot-product driver reads it: its codes for columns `0..in` into
/// `codes` (whose padding past `in` stays as the caller zeroed it) and its affine map per unit
/// into `scale` / `offset` (units past the row's last one untouched).
fn row_operands(
    w: &dyn IntCodes,
    r: usize,
    unit: usize,
    codes: &mut [u8],
    scale: &mut [f32],
    offset: &mut [f32],
) {
    let i = w.int_dims().1;
    w.int_codes(r, &mut codes[..i]);
    let nu = i.div_ceil(unit);
    w.int_affine(r, &mut scale[..nu], &mut offset[..nu]);
}

/// One row's value for one vector on the dot-product driver: the integer unit sums of `codes`
/// (`kpad` bytes) against `xq`, then [`combine`] (or, for units of 16 on the 256-bit tiers,
/// [`dot_units16`], which does both); `isum` holds at least `kpad / unit` sums.
#[allow(clippy::too_many_arguments)]
fn dot_row(
    tier: IntTier,
    layout: IntLayout,
    codes: &[u8],
    scale: &[f32],
    offset: &[f32],
    xq: &[i8],
    qs: &[i32],
    sx_u: &[f32],
    xo_u: &[f32],
    isum: &mut [i32],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if layout.unit == 16
        && matches!(
            tier,
            IntTier::Avx2 | IntTier::AvxVnni | IntTier::AvxVnniEmulated
        )
    {
        // SAFETY: the tier is one of those three (checked by `supported`); every slice has
        // `units` (or `kpad` = 16·units) elements, a multiple of 8 units.
        let [val] = unsafe {
            dot_units16::<1>(
                tier,
                layout.kind,
                codes,
                [xq],
                [sx_u],
                [xo_u],
                scale,
                offset,
            )
        };
        return val;
    }
    let units = qs.len();
    let isum = &mut isum[..units];
    unit_sums_checked(
        tier,
        layout.kind,
        layout.unit,
        codes,
        [xq],
        [qs],
        [&mut *isum],
    );
    combine(tier, isum, sx_u, xo_u, scale, offset)
}

/// Batch 1 on the dot-product driver by ranges of rows (`WeightMatrix::batch1_rows`, for the
/// batch-1 team of `nibble_bignet::infer`): x quantized once when made, then each row of a
/// range computed as [`forward`] computes it at `m = 1`, through the same functions (the same
/// bits). Where [`forward`] would decline (no integer layout, a NaN or infinity in x, a
/// mismatched length), [`Batch1Int8::new`] gives `None` and the caller takes the f32 path.
pub(crate) struct Batch1Int8<'a> {
    w: &'a dyn IntCodes,
    tier: IntTier,
    layout: IntLayout,
    q: QuantizedX,
    sx_u: Vec<f32>,
    xo_u: Vec<f32>,
}

impl<'a> Batch1Int8<'a> {
    /// Quantizes `x` (`[in]`) for `w` on `tier`'s dot-product driver.
    pub(crate) fn new(tier: IntTier, w: &'a dyn IntCodes, x: &[f32]) -> Option<Batch1Int8<'a>> {
        let (o, i) = w.int_dims();
        let layout = w.int_layout()?;
        if i == 0 || o == 0 || x.len() != i || !matches!(layout.unit, 16 | 64 | 128) {
            return None;
        }
        let tier = gemm_tier(tier, layout.unit);
        let mut q = QUANTIZED.take();
        if !quantize_x_into(x, 1, i, layout.unit, false, &mut q, XLayout::PLAIN) {
            QUANTIZED.set(q);
            return None;
        }
        let (mut sx_u, mut xo_u) = UNIT_SCALES.take();
        unit_scales_into(&q, 1, &mut sx_u, &mut xo_u);
        Some(Batch1Int8 {
            w,
            tier,
            layout,
            q,
            sx_u,
            xo_u,
        })
    }

    /// `y[j] (+)= W[rows.start + j, :] · x'` for the rows of `rows` (`y.len() >= rows.len()`,
    /// `rows.end <= out`, checked by the caller).
    pub(crate) fn rows(&self, rows: std::ops::Range<usize>, y: &mut [f32], accumulate: bool) {
        let (kpad, unit) = (self.q.kpad, self.layout.unit);
        let units = kpad / unit;
        let mut scratch = RowScratch::take(kpad, units, units);
        let RowScratch {
            codes,
            scale,
            offset,
            isum,
        } = &mut scratch;
        for (r, d) in rows.zip(y.iter_mut()) {
            row_operands(self.w, r, unit, codes, scale, offset);
            let val = dot_row(
                self.tier,
                self.layout,
                codes,
                scale,
                offset,
                &self.q.xq[..kpad],
                &self.q.qsum[..units],
                &self.sx_u,
                &self.xo_u,
                isum,
            );
            *d = if accumulate { *d + val } else { val };
        }
        scratch.give_back();
    }
}

impl Drop for Batch1Int8<'_> {
    fn drop(&mut self) {
        // Back to this thread's storage for its next call.
        QUANTIZED.set(std::mem::take(&mut self.q));
        UNIT_SCALES.set((
            std::mem::take(&mut self.sx_u),
            std::mem::take(&mut self.xo_u),
        ));
    }
}

/// The tier the integer GEMM runs for `tier` ([`IntTier::supported`] first) and units of
/// `unit` columns: units of 16 leave AMX for AVX-512 VNNI.
///
/// AMX forms a unit of 16 columns at a quarter of a tile's depth and stores and folds every
/// unit; on the 16-core Xeon each tile instruction (load, dot product, store, zero) cost about
/// the same whatever its depth, so Q4 (units of 16) ran slower there than on VNNI (one 1024²
/// layer, `act8_bench`, 16 threads, batch 1024, the products alone: 2.1–2.4 ms on AMX against
/// 0.76–0.93 ms on VNNI in the same runs, 2026-12-03 21:06–21:14 UTC; blocks of 16 × 16 with
/// two or four tile sets rotating between units, so that a unit's store never held up the
/// next unit's products, took 3.4–3.8 ms; earlier, int8 / f32 time at batch 256 0.98 against
/// 0.88, at 1024 1.55 against 1.14).
pub(crate) fn gemm_tier(tier: IntTier, unit: usize) -> IntTier {
    match tier.supported() {
        IntTier::Amx if unit < 64 => IntTier::Avx512Vnni,
        t => t,
    }
}

/// Units of 16 fused with the f32 combination ([`avx2::dot_units16`]: the bits of
/// [`unit_sums`] followed by [`combine`]) on the AVX2-width `tier`.
///
/// # Safety
/// `tier` is `Avx2`, `AvxVnni` or `AvxVnniEmulated` and came through [`IntTier::supported`];
/// the lengths of [`avx2::dot_units16`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_units16<const V: usize>(
    tier: IntTier,
    kind: CodeKind,
    codes: &[u8],
    xq: [&[i8]; V],
    sx_u: [&[f32]; V],
    xo_u: [&[f32]; V],
    scale: &[f32],
    offset: &[f32],
) -> [f32; V] {
    // SAFETY: the caller's contract: the CPU has the features of the tier's function.
    unsafe {
        match tier {
            IntTier::AvxVnni => {
                avxvnni::hw::dot_units16(kind, codes, xq, sx_u, xo_u, scale, offset)
            }
            IntTier::AvxVnniEmulated => {
                avxvnni::emulated::dot_units16(kind, codes, xq, sx_u, xo_u, scale, offset)
            }
            _ => avx2::dot_units16(kind, codes, xq, sx_u, xo_u, scale, offset),
        }
    }
}

/// `dst[k] = src[k]` as f32 for `k < min(len)` (F16C where the CPU has it; exact either way).
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        unsafe { avx2::f16_to_f32(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// NF4's 16 levels as int8: `round(127 · level)` (each within `1/254` of `level`).
pub const NF4_LEVELS_I8: [i8; 16] = {
    let mut t = [0i8; 16];
    let mut c = 0;
    while c < 16 {
        let v = crate::nf4::NF4_LEVELS[c] * 127.0;
        t[c] = (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i8;
        c += 1;
    }
    t
};

/// Writes the [`NF4_LEVELS_I8`] bytes of the NF4 codes `first..first + dst.len()` of
/// `packed` (element `2k` in the HIGH nibble of byte `k`) into `dst`: 16 bytes at a time with
/// AVX2 (`vpshufb` as the 16-entry table) where the CPU has it and `first` is even, else
/// [`unpack_nf4_levels_i8_ref`] (the same bytes).
///
/// # Panics
/// If `packed` holds fewer bytes than the codes asked for need (a caller's slicing error; the
/// codes come from a matrix whose parts were checked when it was built).
pub fn unpack_nf4_levels_i8(packed: &[u8], first: usize, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma_f16c() && first % 2 == 0 && dst.len() >= 32 {
        let whole = dst.len() / 32 * 32;
        let src = &packed[first / 2..first / 2 + whole / 2];
        // SAFETY: the CPU has AVX2; `src` holds `whole / 2` bytes and `dst` at least `whole`.
        unsafe { avx2::unpack_nf4_levels_i8(src, &mut dst[..whole]) };
        unpack_nf4_levels_i8_ref(packed, first + whole, &mut dst[whole..]);
        return;
    }
    unpack_nf4_levels_i8_ref(packed, first, dst);
}

/// The scalar ground truth of [`unpack_nf4_levels_i8`].
pub fn unpack_nf4_levels_i8_ref(packed: &[u8], first: usize, dst: &mut [u8]) {
    unpack_nibbles_high_first(packed, first, dst);
    for c in dst {
        *c = NF4_LEVELS_I8[usize::from(*c & 15)] as u8;
    }
}

/// Unpacks 4-bit codes, element `2k` in the LOW nibble of byte `k`, into `dst` (one code a
/// byte; `dst.len()` codes, `packed` at least `ceil(dst.len() / 2)` bytes): 32 codes at a time
/// with AVX2 where the CPU has it, the rest by [`unpack_nibbles_low_first_ref`] (the same
/// bytes).
///
/// # Panics
/// If `packed` holds fewer bytes than the codes asked for need, where the SIMD loop runs (its scalar twin then leaves the
/// codes it has no bytes for as they were; a caller's slicing error; the
/// codes come from a matrix whose parts were checked when it was built).
pub fn unpack_nibbles_low_first(packed: &[u8], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma_f16c() && dst.len() >= 32 {
        let whole = dst.len() / 32 * 32;
        // SAFETY: the CPU has AVX2; `packed` holds at least `whole / 2` bytes.
        unsafe { avx2::unpack_nibbles_low_first(&packed[..whole / 2], &mut dst[..whole]) };
        unpack_nibbles_low_first_ref(&packed[whole / 2..], &mut dst[whole..]);
        return;
    }
    unpack_nibbles_low_first_ref(packed, dst);
}

/// The scalar ground truth of [`unpack_nibbles_low_first`].
pub fn unpack_nibbles_low_first_ref(packed: &[u8], dst: &mut [u8]) {
    let n = dst.len();
    let mut pairs = dst.chunks_exact_mut(2);
    for (d, &b) in (&mut pairs).zip(packed) {
        d[0] = b & 15;
        d[1] = b >> 4;
    }
    if let ([d], Some(&b)) = (pairs.into_remainder(), packed.get(n / 2)) {
        *d = b & 15;
    }
}

/// Unpacks 4-bit codes, element `2k` in the HIGH nibble of byte `k`, starting at element
/// `first` (`dst.len()` codes; `packed` at least `ceil((first + dst.len()) / 2)` bytes).
///
/// # Panics
/// If `packed` holds fewer bytes than the codes asked for need (a caller's slicing error; the
/// codes come from a matrix whose parts were checked when it was built).
pub fn unpack_nibbles_high_first(packed: &[u8], first: usize, dst: &mut [u8]) {
    if first % 2 == 0 && dst.len() % 2 == 0 {
        let bytes = &packed[first / 2..first / 2 + dst.len() / 2];
        for (d, &b) in dst.chunks_exact_mut(2).zip(bytes) {
            d[0] = b >> 4;
            d[1] = b & 15;
        }
        return;
    }
    for (k, d) in dst.iter_mut().enumerate() {
        let e = first + k;
        let b = packed[e / 2];
        *d = if e % 2 == 0 { b >> 4 } else { b & 15 };
    }
}

/// Unpacks 3-bit codes, 8 codes little-endian in each 3 bytes (code `j` at bits `3j..3j+3`),
/// into `dst` (`packed` at least `ceil(3 · dst.len() / 8)` bytes; with fewer, the codes it has
/// no bytes for are left as they were, or it panics where a tail's bytes are missing).
///
/// # Panics
/// If `packed` holds fewer bytes than the codes asked for need (a caller's slicing error; the
/// codes come from a matrix whose parts were checked when it was built).
pub fn unpack_3bit(packed: &[u8], dst: &mut [u8]) {
    let n = dst.len();
    let mut runs = dst.chunks_exact_mut(8);
    for (d, p) in (&mut runs).zip(packed.chunks_exact(3)) {
        let v = u32::from(p[0]) | u32::from(p[1]) << 8 | u32::from(p[2]) << 16;
        for (j, dj) in d.iter_mut().enumerate() {
            *dj = ((v >> (3 * j)) & 7) as u8;
        }
    }
    let rest = runs.into_remainder();
    if !rest.is_empty() {
        let base = (n / 8) * 3;
        let mut v = 0u32;
        for (t, &b) in packed[base..].iter().take(3).enumerate() {
            v |= u32::from(b) << (8 * t);
        }
        for (j, dj) in rest.iter_mut().enumerate() {
            *dj = ((v >> (3 * j)) & 7) as u8;
        }
    }
}

/// Whether a buffer of `len` elements holds exactly `m` rows of `n` (a product that overflows
/// never does: compared wrapping, `m = 2^63 + 3` passed the check and the kernels read past x).
pub(crate) fn holds(len: usize, m: usize, n: usize) -> bool {
    m.checked_mul(n) == Some(len)
}
