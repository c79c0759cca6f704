//! The AVX2 integer tier: `vpmaddubsw` (unsigned codes times signed xq, pairs summed to i16)
//! then `vpmaddwd` by ones (to i32). Signed codes go through `|c| · sign(x, c)`, so that the
//! unsigned operand stays in 0..=128 and a pair stays below `2 · 128 · 127 < 2^15`: no
//! saturation, exact sums.
//!
//! The 256-bit kernels here (the dot products `unit_sums_with`, `dot_units16_with` and the
//! GEMM lanes `Narrow`) are generic over their multiply-add step (`ByteDot`): this tier's
//! `Maddubs` (`vpmaddubsw` + `vpmaddwd`), and the AVX-VNNI tier's `vpdpbusd`
//! ([`super::avxvnni`]), which runs the same code with one instruction per step.

use super::CodeKind;
use std::arch::x86_64::*;

/// The multiply-add step of the 256-bit kernels, the operation of `vpdpbusd`: per i32 lane
/// `l`, `acc_l + Σ_{j<4} a_{4l+j} · b_{4l+j}` with `a` read as unsigned bytes and `b` as
/// signed bytes. A *run* chains up to four such steps into one lane vector
/// ([`ByteDot::run_start`], [`ByteDot::run_add`], [`ByteDot::run_end`]); the default run is
/// [`ByteDot::dot`] step after step.
///
/// Every method's safety contract: the implementation's CPU features (AVX2 for [`Maddubs`]).
pub(crate) trait ByteDot {
    /// Vectors of x per micro-kernel of the GEMM's [`Narrow`] lanes on this step. Default 4
    /// (the `vpdpbusd` steps, whose runs add into the unit's i32 sums directly, with no i16
    /// sums of their own). For AVX-VNNI, measured on the 16-core Xeon with
    /// `NIBBLE_KERNEL=avx2` (2026-12-04 10:40 UTC, `act8_bench` phases, one 1024² layer, three
    /// rounds of 2, 3 and 4 vectors in turns), products at batch 1024 on 2 threads, ms: NF4
    /// 5.73–7.41 / 5.41–7.24 / 5.12–5.81, int8 7.18–7.31 / 6.02–7.23 / 5.24–5.60, lower
    /// 6.61–7.60 / 6.05–7.16 / 5.47–6.07, Q4 5.48–8.58 / 6.37–8.88 / 6.65–6.87; on 16 threads
    /// 4 led for NF4, int8 and lower and tied for Q4. So 4.
    const NARROW_MR: usize = 4;

    /// One step. Exact for [`Maddubs`] where every pair `a_{2i}·b_{2i} + a_{2i+1}·b_{2i+1}`
    /// lies in i16 (no saturation); exact for `vpdpbusd` always.
    ///
    /// # Safety
    /// The implementation's CPU features.
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;

    /// The first step of a run into `acc` (the run's value is opaque until
    /// [`ByteDot::run_end`]). Exact for [`Maddubs`] where each i16 lane's sum over the whole
    /// run (eight products) lies in i16.
    ///
    /// # Safety
    /// The implementation's CPU features.
    #[inline(always)]
    unsafe fn run_start(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe { Self::dot(acc, a, b) }
    }

    /// A further step of a run (at most four steps a run).
    ///
    /// # Safety
    /// The implementation's CPU features.
    #[inline(always)]
    unsafe fn run_add(run: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe { Self::dot(run, a, b) }
    }

    /// The run's i32 lanes: `acc` (as given to [`ByteDot::run_start`]) plus every step's sums.
    ///
    /// # Safety
    /// The implementation's CPU features.
    #[inline(always)]
    unsafe fn run_end(run: __m256i, _acc: __m256i) -> __m256i {
        run
    }

    /// Two runs started from zero, ended and summed pairwise within each 128-bit half
    /// (`vphaddd`): `[a_0 + a_1, a_2 + a_3, b_0 + b_1, b_2 + b_3]` per half of the i32 lanes
    /// `a` of `r0` and `b` of `r1`. Exact for [`Maddubs`] where each i16 lane of either run
    /// plus its neighbour lies in i16.
    ///
    /// # Safety
    /// The implementation's CPU features and AVX2.
    #[inline(always)]
    unsafe fn hadd_runs(r0: __m256i, r1: __m256i) -> __m256i {
        // SAFETY: the caller's contract.
        unsafe {
            let zero = _mm256_setzero_si256();
            _mm256_hadd_epi32(Self::run_end(r0, zero), Self::run_end(r1, zero))
        }
    }
}

/// This tier's step: `vpmaddubsw` (pairs to i16) then `vpmaddwd` by ones (to i32); a run sums
/// its `vpmaddubsw` products in i16 lanes (`vpaddw`) and widens once at its end.
pub(crate) struct Maddubs;

impl ByteDot for Maddubs {
    /// 2: each vector's run holds i16 sums of its own beside the unit's i32 sums, and the f32
    /// group and output sums stay live across the units, so 4 vectors need about twice the 16
    /// ymm registers; with 4 the compiler spilled the step loop's x broadcasts, and its time
    /// moved by a third with where its stack frame fell (see [`gemm_block_narrow`]). On the
    /// 2-core Zen 3 (2026-12-04, one 1024² layer, 2 threads, `act8_bench` phases, six
    /// alternating rounds, fastest of each) the products took, 4 → 2 vectors: Q4 at batch 1024
    /// 7.62 → 6.87 ms, at 64 0.525 → 0.450; lower 5.30 → 5.20 and 0.327 → 0.346.
    const NARROW_MR: usize = 2;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX2).
        unsafe {
            let pairs = _mm256_maddubs_epi16(a, b);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }
    #[inline(always)]
    unsafe fn run_start(_acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX2).
        unsafe { _mm256_maddubs_epi16(a, b) }
    }
    #[inline(always)]
    unsafe fn run_add(run: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX2).
        unsafe { _mm256_add_epi16(run, _mm256_maddubs_epi16(a, b)) }
    }
    #[inline(always)]
    unsafe fn run_end(run: __m256i, acc: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX2).
        unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(run, _mm256_set1_epi16(1))) }
    }
    /// `vphaddw` of the two runs' i16 lanes, then one `vpmaddwd` by ones: the same i32 lanes
    /// as the default with one widening instead of two.
    #[inline(always)]
    unsafe fn hadd_runs(r0: __m256i, r1: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX2).
        unsafe { _mm256_madd_epi16(_mm256_hadd_epi16(r0, r1), _mm256_set1_epi16(1)) }
    }
}

/// [`super::unit_sums`] for lengths already checked, on [`Maddubs`].
///
/// # Safety
/// As [`unit_sums_with`].
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unit_sums<const V: usize>(
    kind: CodeKind,
    unit: usize,
    codes: &[u8],
    xq: [&[i8]; V],
    out: [&mut [i32]; V],
) {
    // SAFETY: the caller's contract.
    unsafe { unit_sums_with::<Maddubs, V>(kind, unit, codes, xq, out) }
}

/// [`super::unit_sums`] for lengths already checked (128-byte steps: 8, 2 or 1 units each) on
/// the step `D`: nibble codes multiply x directly (pairs at most `2 · 15 · 127`), signed codes
/// as `|c| · sign(x, c)` (pairs at most `2 · 128 · 127 < 2^15`; every xq in −127..=127), so
/// that the sums are exact on every [`ByteDot`].
///
/// # Safety
/// `D`'s CPU features and AVX2; `codes` and every `xq[v]` have the same length, a multiple of
/// 128, `unit` is 16, 64 or 128 and every `out[v]` has `codes.len() / unit` elements.
#[inline(always)]
pub(super) unsafe fn unit_sums_with<D: ByteDot, const V: usize>(
    kind: CodeKind,
    unit: usize,
    codes: &[u8],
    xq: [&[i8]; V],
    out: [&mut [i32]; V],
) {
    let n = codes.len();
    let signed = kind == CodeKind::Signed;
    let outp: [*mut i32; V] = out.map(|o| o.as_mut_ptr());
    let mut s = 0;
    while s < n {
        let mut c = [_mm256_setzero_si256(); 4];
        let mut cu = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            // SAFETY: s + 32k + 32 <= n (n a multiple of 128).
            c[k] = _mm256_loadu_si256(codes.as_ptr().add(s + 32 * k) as *const __m256i);
            cu[k] = if signed { _mm256_abs_epi8(c[k]) } else { c[k] };
        }
        for v in 0..V {
            let mut q = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                // SAFETY: xq[v] has n bytes (caller).
                let x = _mm256_loadu_si256(xq[v].as_ptr().add(s + 32 * k) as *const __m256i);
                let x = if signed { _mm256_sign_epi8(x, c[k]) } else { x };
                q[k] = D::dot(_mm256_setzero_si256(), cu[k], x);
            }
            // SAFETY: the step's units s/unit.. (8, 2 or 1 of them) lie inside out[v].
            store_units(unit, q, outp[v].add(s / unit));
        }
        s += 128;
    }
}

/// Horizontal sum of 8 i32 lanes.
#[inline(always)]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Stores the unit sums of one 128-byte step from its four 32-byte chunks' i32 lanes (lane
/// `l` of chunk `k` covers bytes `32k + 4l .. 32k + 4l + 4`): 8 units of 16, 2 of 64 or 1 of
/// 128 at `dst`.
///
/// # Safety
/// AVX2; `dst` has room for `128 / unit` values.
#[inline(always)]
pub(super) unsafe fn store_units(unit: usize, q: [__m256i; 4], dst: *mut i32) {
    match unit {
        16 => {
            // hadd twice leaves [u0, u2, u4, u6 | u1, u3, u5, u7].
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(q[0], q[1]), _mm256_hadd_epi32(q[2], q[3]));
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            // SAFETY: 8 values fit (caller).
            _mm256_storeu_si256(dst as *mut __m256i, _mm256_permutevar8x32_epi32(h, order));
        }
        64 => {
            // SAFETY: 2 values fit (caller).
            *dst = hsum_epi32(_mm256_add_epi32(q[0], q[1]));
            *dst.add(1) = hsum_epi32(_mm256_add_epi32(q[2], q[3]));
        }
        _ => {
            let a = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            // SAFETY: 1 value fits (caller).
            *dst = hsum_epi32(a);
        }
    }
}

/// The shared f32 combination ([`super::combine_body`]) compiled with AVX2 (plain multiplies
/// and adds, so the same bits as the portable build).
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn combine(
    isum: &[i32],
    sx_u: &[f32],
    xo_u: &[f32],
    scale: &[f32],
    offset: &[f32],
) -> f32 {
    super::combine_body(isum, sx_u, xo_u, scale, offset)
}

/// The quantization of whole groups of x with the bits of [`super::quantize_row`], in AVX2
/// intrinsics (the row's driver is [`super::quantize_row_simd`]): per group of 128, `max |x|`
/// and the finiteness check over 16 vectors of 8 (four running maxima, reduced in registers),
/// then in a second pass over the row (from L1) the scaled and clamped values rounded by
/// `vcvtps2dq` (round half to even, as the portable rounding sum for `|v| <= 127`), packed to
/// bytes, and the unit sums from sums of 4 bytes (`vpmaddubsw` by ones, `vpmaddwd` by ones) as
/// the VNNI kernels store theirs ([`store_units`]). Measured on one Zen 3 thread (1024 vectors of 1024, `act8_bench` phases): 0.94 ms for
/// units of 16 and 0.70 ms for 128 with the portable body compiled for AVX2; this code's
/// first form (the group held in 16 registers, which spilled, and unit sums added on the
/// stack) 0.43 ms for units of 16 (`quantize_x` alone, minimum of 200), this one 0.29 ms.
///
/// # Safety
/// The CPU has AVX2; the lengths of [`super::QuantizeGroups`].
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_groups(
    xv: &[f32],
    xq: &mut [i8],
    sx: &mut [f32],
    qs: &mut [i32],
    unit: usize,
    flip: u8,
) -> bool {
    const GROUP: usize = super::GROUP;
    let (full, per_group) = super::check_groups(xv, xq, sx, qs, unit);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let inf = _mm256_set1_ps(f32::INFINITY);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    // Each stored byte XORed with `flip`, as the portable code does.
    let flip_bytes = _mm256_set1_epi8(flip as i8);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut bad = _mm256_setzero_ps();
    // Two passes over the row (4 KiB at 1024, in L1 for the second): each group's maximum
    // first, into `sx`, then its values; holding a group in registers between the two spilled.
    for g in 0..full {
        let src = xv[g * GROUP..(g + 1) * GROUP].as_ptr();
        // Four independent maxima (the maximum is exact in any order; `max(a, most)` keeps
        // `most` where `a` is NaN, as the portable `a > most ? a : most`).
        let mut most = [_mm256_setzero_ps(); 4];
        for j in 0..GROUP / 8 {
            // SAFETY: 8 floats at 8j of the group's 128.
            let a = _mm256_and_ps(unsafe { _mm256_loadu_ps(src.add(8 * j)) }, abs);
            most[j % 4] = _mm256_max_ps(a, most[j % 4]);
            // NaN (unordered) or infinite.
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
        }
        sx[g] = hmax(_mm256_max_ps(
            _mm256_max_ps(most[0], most[1]),
            _mm256_max_ps(most[2], most[3]),
        ));
    }
    for g in 0..full {
        let src = xv[g * GROUP..(g + 1) * GROUP].as_ptr();
        let load = |j: usize| {
            // SAFETY: 8 floats at 8j (j < 16) of the group's 128.
            unsafe { _mm256_loadu_ps(src.add(8 * j)) }
        };
        let amax = sx[g];
        sx[g] = amax / 127.0;
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let mut sums = [_mm256_setzero_si256(); 4];
        for (k, sum) in sums.iter_mut().enumerate() {
            // (A helper fn rather than a closure: closures do not inherit the target features.)
            let a = quantize8(load(4 * k), inv, lo, hi);
            let b = quantize8(load(4 * k + 1), inv, lo, hi);
            let c = quantize8(load(4 * k + 2), inv, lo, hi);
            let d = quantize8(load(4 * k + 3), inv, lo, hi);
            // i32 → i16 → i8 per 128-bit half, then the dwords back in element order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            let bytes = _mm256_permutevar8x32_epi32(packed, order);
            // Sums of 4 consecutive values per i32 lane (|sum| <= 508), as `vpdpbusd` by
            // ones would give them, for `store_units`.
            *sum = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, bytes), ones16);
            let out = _mm256_xor_si256(bytes, flip_bytes);
            // SAFETY: 32 bytes at g·128 + 32k, inside xq (asserted lengths).
            unsafe {
                _mm256_storeu_si256(xq[g * GROUP + 32 * k..].as_mut_ptr() as *mut __m256i, out)
            };
        }
        // SAFETY: the group's `per_group` unit sums lie inside qs (asserted lengths).
        unsafe { store_units(unit, sums, qs[g * per_group..].as_mut_ptr()) };
    }
    _mm256_movemask_ps(bad) == 0
}

/// The largest of the 8 lanes of `v` (none NaN), by three lane-wise maxima.
#[inline(always)]
pub(super) fn hmax(v: __m256) -> f32 {
    // SAFETY: inlined into AVX2 code only (the `quantize_row`s).
    unsafe {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    }
}

/// `round_half_even(clamp(v · inv, lo, hi))` in i32 lanes (`vcvtps2dq` under the default
/// rounding mode).
#[inline(always)]
fn quantize8(v: __m256, inv: __m256, lo: __m256, hi: __m256) -> __m256i {
    // SAFETY: inlined into AVX2 code only (`quantize_row`).
    unsafe { _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, inv), lo), hi)) }
}

/// NF4 codes (high nibble first) to their int8 levels: each 16 packed bytes become 32 level
/// bytes through `vpshufb` on the 16-entry table.
///
/// # Safety
/// The CPU has AVX2; `dst.len() == 2 · src.len()`, a multiple of 32.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_nf4_levels_i8(src: &[u8], dst: &mut [u8]) {
    // SAFETY: NF4_LEVELS_I8 has 16 bytes.
    let table = _mm_loadu_si128(super::NF4_LEVELS_I8.as_ptr() as *const __m128i);
    let low = _mm_set1_epi8(15);
    for (k, d) in dst.chunks_exact_mut(32).enumerate() {
        // SAFETY: 16 bytes of src at 16k (dst is 2 · src long); 32 bytes of d.
        let b = _mm_loadu_si128(src.as_ptr().add(16 * k) as *const __m128i);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        let lo = _mm_and_si128(b, low);
        // Element 2i is the high nibble of byte i.
        let first = _mm_unpacklo_epi8(hi, lo);
        let second = _mm_unpackhi_epi8(hi, lo);
        _mm_storeu_si128(
            d.as_mut_ptr() as *mut __m128i,
            _mm_shuffle_epi8(table, first),
        );
        _mm_storeu_si128(
            d.as_mut_ptr().add(16) as *mut __m128i,
            _mm_shuffle_epi8(table, second),
        );
    }
}

/// 4-bit codes (low nibble first) to one byte each: 16 packed bytes to 32 codes per pass.
///
/// # Safety
/// The CPU has AVX2; `dst.len() == 2 · src.len()`, a multiple of 32.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn unpack_nibbles_low_first(src: &[u8], dst: &mut [u8]) {
    let low = _mm_set1_epi8(15);
    for (k, d) in dst.chunks_exact_mut(32).enumerate() {
        // SAFETY: 16 bytes of src at 16k (dst is 2 · src long); 32 bytes of d.
        let b = _mm_loadu_si128(src.as_ptr().add(16 * k) as *const __m128i);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        let lo = _mm_and_si128(b, low);
        _mm_storeu_si128(d.as_mut_ptr() as *mut __m128i, _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(
            d.as_mut_ptr().add(16) as *mut __m128i,
            _mm_unpackhi_epi8(lo, hi),
        );
    }
}

/// f16 to f32 with F16C ([`crate::kernels::avx2::f16_to_f32`] compiled for it).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    // SAFETY: the features are enabled; the callee bounds itself by both lengths.
    unsafe { crate::kernels::avx2::f16_to_f32(src, dst) }
}

/// Units of 16 (Q4) fused with the f32 combination: for each 128-byte step the 8 unit sums
/// land in one register in unit order, which is exactly the lane layout of
/// [`super::combine_body`], and the same multiplies and adds (never fused) run on them, so the
/// result has the bits of [`super::unit_sums`] followed by [`super::combine`].
///
/// # Safety
/// The CPU has AVX2; `codes` and every `xq[v]` have `n` bytes, `n` a multiple of 128; every
/// `sx_u[v]`, `xo_u[v]`, `scale` and `offset` has `n / 16` elements.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_units16<const V: usize>(
    kind: CodeKind,
    codes: &[u8],
    xq: [&[i8]; V],
    sx_u: [&[f32]; V],
    xo_u: [&[f32]; V],
    scale: &[f32],
    offset: &[f32],
) -> [f32; V] {
    // SAFETY: the caller's contract.
    unsafe { dot_units16_with::<Maddubs, V>(kind, codes, xq, sx_u, xo_u, scale, offset) }
}

/// [`dot_units16`] on the step `D` (the unit sums formed as in [`unit_sums_with`]).
///
/// # Safety
/// `D`'s CPU features and AVX2; the lengths of [`dot_units16`].
#[inline(always)]
pub(super) unsafe fn dot_units16_with<D: ByteDot, const V: usize>(
    kind: CodeKind,
    codes: &[u8],
    xq: [&[i8]; V],
    sx_u: [&[f32]; V],
    xo_u: [&[f32]; V],
    scale: &[f32],
    offset: &[f32],
) -> [f32; V] {
    let n = codes.len();
    let signed = kind == CodeKind::Signed;
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut acc = [_mm256_setzero_ps(); V];
    let mut s = 0;
    while s < n {
        let mut c = [_mm256_setzero_si256(); 4];
        let mut cu = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            // SAFETY: s + 32k + 32 <= n.
            c[k] = _mm256_loadu_si256(codes.as_ptr().add(s + 32 * k) as *const __m256i);
            cu[k] = if signed { _mm256_abs_epi8(c[k]) } else { c[k] };
        }
        let u = s / 16;
        // SAFETY: units u..u+8 lie inside the n/16-element slices.
        let sc = _mm256_loadu_ps(scale.as_ptr().add(u));
        let of = _mm256_loadu_ps(offset.as_ptr().add(u));
        for v in 0..V {
            let mut q = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                // SAFETY: xq[v] has n bytes.
                let x = _mm256_loadu_si256(xq[v].as_ptr().add(s + 32 * k) as *const __m256i);
                let x = if signed { _mm256_sign_epi8(x, c[k]) } else { x };
                q[k] = D::dot(_mm256_setzero_si256(), cu[k], x);
            }
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(q[0], q[1]), _mm256_hadd_epi32(q[2], q[3]));
            let isum = _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(h, order));
            // SAFETY: as for scale.
            let sx = _mm256_loadu_ps(sx_u[v].as_ptr().add(u));
            let xo = _mm256_loadu_ps(xo_u[v].as_ptr().add(u));
            let term = _mm256_add_ps(
                _mm256_mul_ps(sx, _mm256_mul_ps(sc, isum)),
                _mm256_mul_ps(of, xo),
            );
            acc[v] = _mm256_add_ps(acc[v], term);
        }
        s += 128;
    }
    let mut out = [0.0f32; V];
    for v in 0..V {
        let mut a = [0.0f32; 8];
        // SAFETY: 8 floats.
        _mm256_storeu_ps(a.as_mut_ptr(), acc[v]);
        out[v] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    }
    out
}

/// The GEMM's lanes that read x as `xq + 128` (unsigned, 1..=255) times the signed weights
/// `w`, into i32 lanes that start at the correction `−128 · Σ w` (see [`super::gemm`]), in runs
/// of four steps of the step `D` ([`ByteDot`]). A lane vector is a pair of ymm: 16 rows of W,
/// the panel of the VNNI tier. On [`Maddubs`] (this tier, 4-bit and 3-bit codes only,
/// `|w| <= 15`): `vpmaddubsw` of `xq + 128` by `w`, four steps summed in i16 lanes (at most
/// `8 · 255 · 15 = 30600`), then `vpmaddwd` by ones. On `vpdpbusd` (the AVX-VNNI tier,
/// [`super::avxvnni`]): every signed `w`, one instruction per step.
pub(super) struct Narrow<D: ByteDot = Maddubs>(std::marker::PhantomData<D>);

/// The GEMM's lanes for 8-bit signed codes: `vpmaddubsw` of `|w|` (0..=128) by `sign(xq, w)`
/// (pairs at most `2 · 128 · 127 < 2^15`), `vpmaddwd` by ones into i32 lanes that start at
/// zero; pairs of ymm as [`Narrow`].
pub(super) struct Wide;

/// The f32 and load/store half of both AVX2 lane sets (pairs of ymm).
macro_rules! avx2_float_lanes {
    ($mr:expr) => {
        const NR: usize = 16;
        const MR: usize = $mr;
        type I = [__m256i; 2];
        type F = [__m256; 2];

        #[inline(always)]
        unsafe fn load_i(p: *const i32) -> [__m256i; 2] {
            // SAFETY: the trait's contract (16 values at p).
            unsafe {
                [
                    _mm256_loadu_si256(p as *const __m256i),
                    _mm256_loadu_si256(p.add(8) as *const __m256i),
                ]
            }
        }
        #[inline(always)]
        unsafe fn store_i(v: [__m256i; 2], p: *mut i32) {
            // SAFETY: the trait's contract (room for 16 values at p).
            unsafe {
                _mm256_storeu_si256(p as *mut __m256i, v[0]);
                _mm256_storeu_si256(p.add(8) as *mut __m256i, v[1]);
            }
        }
        #[inline(always)]
        unsafe fn zero_i() -> [__m256i; 2] {
            // SAFETY: the trait's contract (AVX2).
            unsafe { [_mm256_setzero_si256(); 2] }
        }
        #[inline(always)]
        unsafe fn load_f(p: *const f32) -> [__m256; 2] {
            // SAFETY: the trait's contract (16 values at p).
            unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> [__m256; 2] {
            // SAFETY: the trait's contract (AVX2).
            unsafe { [_mm256_set1_ps(v); 2] }
        }
        #[inline(always)]
        unsafe fn to_f32(i: [__m256i; 2]) -> [__m256; 2] {
            // SAFETY: the trait's contract (AVX2).
            unsafe { [_mm256_cvtepi32_ps(i[0]), _mm256_cvtepi32_ps(i[1])] }
        }
        #[inline(always)]
        unsafe fn fma(a: [__m256; 2], b: [__m256; 2], c: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: the trait's contract (the GEMM's AVX2 wrappers enable FMA).
            unsafe {
                [
                    _mm256_fmadd_ps(a[0], b[0], c[0]),
                    _mm256_fmadd_ps(a[1], b[1], c[1]),
                ]
            }
        }
        #[inline(always)]
        unsafe fn store(v: [__m256; 2], p: *mut f32) {
            // SAFETY: the trait's contract (room for 16 values at p).
            unsafe {
                _mm256_storeu_ps(p, v[0]);
                _mm256_storeu_ps(p.add(8), v[1]);
            }
        }
    };
}

/// 4 bytes of x at `p` in every i32 lane.
///
/// # Safety
/// AVX2; 4 readable bytes at `p`.
#[inline(always)]
unsafe fn broadcast4(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32)) }
}

/// Step `s`'s two ymm of a 16-row panel.
///
/// # Safety
/// AVX2; 64 bytes at `w + 64 s`.
#[inline(always)]
unsafe fn panel_step(w: *const u8, s: usize) -> [__m256i; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        [
            _mm256_loadu_si256(w.add(64 * s) as *const __m256i),
            _mm256_loadu_si256(w.add(64 * s + 32) as *const __m256i),
        ]
    }
}

impl<D: ByteDot> super::gemm::Lanes for Narrow<D> {
    const OFFSET_X: bool = true;
    avx2_float_lanes!(D::NARROW_MR);

    #[inline(always)]
    unsafe fn unit_sums<const R: usize, const UNIT: usize>(
        x: [*const u8; R],
        w: *const u8,
        init: [__m256i; 2],
    ) -> [[__m256i; 2]; R] {
        // SAFETY: the trait's contract: AVX2 and D's features, UNIT bytes of each x, 16 · UNIT
        // of w (UNIT a multiple of 16: whole runs of four steps).
        unsafe {
            let mut acc = [init; R];
            for run in 0..UNIT / 16 {
                let mut t = acc;
                for j in 0..4 {
                    let s = 4 * run + j;
                    let wv = panel_step(w, s);
                    for r in 0..R {
                        let xb = broadcast4(x[r].add(4 * s));
                        for h in 0..2 {
                            t[r][h] = if j == 0 {
                                D::run_start(acc[r][h], xb, wv[h])
                            } else {
                                D::run_add(t[r][h], xb, wv[h])
                            };
                        }
                    }
                }
                for r in 0..R {
                    for h in 0..2 {
                        acc[r][h] = D::run_end(t[r][h], acc[r][h]);
                    }
                }
            }
            acc
        }
    }
}

impl super::gemm::Lanes for Wide {
    const OFFSET_X: bool = false;
    // 4 vectors per micro-kernel (no run sums of their own; on the 2-core Zen 3, 2026-12-04,
    // 2 vectors made NF4's and int8's products at batch 1024 8–10 % slower).
    avx2_float_lanes!(4);

    #[inline(always)]
    unsafe fn unit_sums<const R: usize, const UNIT: usize>(
        x: [*const u8; R],
        w: *const u8,
        init: [__m256i; 2],
    ) -> [[__m256i; 2]; R] {
        // SAFETY: the trait's contract: AVX2, UNIT bytes of each x, 16 · UNIT of w.
        unsafe {
            let mut acc = [init; R];
            for s in 0..UNIT / 4 {
                let wv = panel_step(w, s);
                let wa = [_mm256_abs_epi8(wv[0]), _mm256_abs_epi8(wv[1])];
                for r in 0..R {
                    let xb = broadcast4(x[r].add(4 * s));
                    for h in 0..2 {
                        let xs = _mm256_sign_epi8(xb, wv[h]);
                        acc[r][h] = Maddubs::dot(acc[r][h], wa[h], xs);
                    }
                }
            }
            acc
        }
    }
}

/// [`super::gemm::block`] on [`Narrow`] lanes, compiled for AVX2 and FMA.
///
/// With 4 vectors per tile its speed depended on where its stack frame fell: the tile held
/// more values than the 16 ymm registers (integer sums, the runs' i16 sums, the f32 group and
/// output sums) and the compiler spilled some of the step loop's x broadcasts. On the 2-core
/// Zen 3 (2026-12-04, one 1024² Q4 layer at batch 1024, 2 threads, `act8_bench` phases) the
/// products took 7.7–8.1 ms or 10.5–11.4 ms with the same machine code, as a black-boxed stack
/// array of 1 to 3072 bytes in the caller moved the frame (most likely loads that alias the
/// spill stores modulo 4 KiB). With 2 vectors ([`ByteDot::NARROW_MR`] of [`Maddubs`]) the
/// fastest of three rounds at frame offsets of 1, 512, 1024 and 2048 bytes read 6.79–6.91 ms.
///
/// # Safety
/// The CPU has AVX2 and FMA; the contract of [`super::gemm::block`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemm_block_narrow(
    pw: &super::gemm::PackedW,
    xp: &super::gemm::XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: super::YPtr,
    o: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { super::gemm::block::<Narrow<Maddubs>>(pw, xp, rows, panels, y, o, accumulate) }
}

/// [`super::gemm::panel_corr`] on [`Narrow`] lanes, compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2; the contract of [`super::gemm::panel_corr`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemm_corr_narrow(codes: &[u8], unit: usize, corr: &mut [i32]) {
    // SAFETY: the caller's contract.
    unsafe { super::gemm::panel_corr::<Narrow<Maddubs>>(codes, unit, corr) }
}

/// [`super::gemm::block`] on [`Wide`] lanes, compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; the contract of [`super::gemm::block`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemm_block_wide(
    pw: &super::gemm::PackedW,
    xp: &super::gemm::XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: super::YPtr,
    o: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { super::gemm::block::<Wide>(pw, xp, rows, panels, y, o, accumulate) }
}
