//! The AVX-512 VNNI integer tier: `vpdpbusd` (unsigned bytes times signed bytes, four
//! products summed into each i32 lane without saturation). Signed codes are read as
//! `c + 128` (`c ^ 0x80`, unsigned) and the unit's `128 · Σ xq` taken off afterwards: exact.

use super::CodeKind;
use std::arch::x86_64::*;

/// [`super::unit_sums`] for lengths already checked (128-byte steps of two 64-byte chunks).
///
/// # Safety
/// The CPU has AVX-512 F/BW + VNNI and AVX2; `codes` and every `xq[v]` have the same length,
/// a multiple of 128, `unit` is 16, 64 or 128 and every `out[v]` and `qsum[v]` has
/// `codes.len() / unit` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
pub(super) unsafe fn unit_sums<const V: usize>(
    kind: CodeKind,
    unit: usize,
    codes: &[u8],
    xq: [&[i8]; V],
    qsum: [&[i32]; V],
    out: [&mut [i32]; V],
) {
    let n = codes.len();
    let signed = kind == CodeKind::Signed;
    let flip = _mm512_set1_epi8(if signed { -128 } else { 0 });
    let outp: [*mut i32; V] = out.map(|o| o.as_mut_ptr());
    let mut s = 0;
    while s < n {
        // SAFETY: s + 128 <= n (n a multiple of 128).
        let c0 = _mm512_loadu_si512(codes.as_ptr().add(s) as *const _);
        let c1 = _mm512_loadu_si512(codes.as_ptr().add(s + 64) as *const _);
        let (c0, c1) = (_mm512_xor_si512(c0, flip), _mm512_xor_si512(c1, flip));
        for v in 0..V {
            // SAFETY: xq[v] has n bytes (caller).
            let x0 = _mm512_loadu_si512(xq[v].as_ptr().add(s) as *const _);
            let x1 = _mm512_loadu_si512(xq[v].as_ptr().add(s + 64) as *const _);
            let q0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, x0);
            let q1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c1, x1);
            let q = [
                _mm512_extracti64x4_epi64::<0>(q0),
                _mm512_extracti64x4_epi64::<1>(q0),
                _mm512_extracti64x4_epi64::<0>(q1),
                _mm512_extracti64x4_epi64::<1>(q1),
            ];
            // SAFETY: the step's units lie inside out[v].
            super::avx2::store_units(unit, q, outp[v].add(s / unit));
        }
        s += 128;
    }
    if signed {
        for v in 0..V {
            for u in 0..n / unit {
                // SAFETY: u < n / unit, the length of out[v] and qsum[v].
                *outp[v].add(u) -= 128 * qsum[v][u];
            }
        }
    }
}

/// The GEMM's lanes: `vpdpbusd` of `xq + 128` by the signed weights, 16 rows of W per zmm,
/// lanes starting at the correction `−128 · Σ w` (see [`super::gemm`]); the same design as
/// [`super::avx2::Narrow`] with one instruction per step.
pub(super) struct Vnni;

impl super::gemm::Lanes for Vnni {
    const NR: usize = 16;
    const MR: usize = 8;
    const OFFSET_X: bool = true;
    type I = __m512i;
    type F = __m512;

    #[inline(always)]
    unsafe fn unit_sums<const R: usize, const UNIT: usize>(
        x: [*const u8; R],
        w: *const u8,
        init: __m512i,
    ) -> [__m512i; R] {
        // SAFETY: the trait's contract: AVX-512 VNNI, UNIT bytes of each x, 16 · UNIT of w.
        unsafe {
            let mut acc = [init; R];
            for s in 0..UNIT / 4 {
                let wv = _mm512_loadu_si512(w.add(64 * s) as *const _);
                for r in 0..R {
                    let xb =
                        _mm512_set1_epi32(std::ptr::read_unaligned(x[r].add(4 * s) as *const i32));
                    acc[r] = _mm512_dpbusd_epi32(acc[r], xb, wv);
                }
            }
            acc
        }
    }
    #[inline(always)]
    unsafe fn load_i(p: *const i32) -> __m512i {
        // SAFETY: the trait's contract (16 values at p).
        unsafe { _mm512_loadu_si512(p as *const _) }
    }
    #[inline(always)]
    unsafe fn store_i(v: __m512i, p: *mut i32) {
        // SAFETY: the trait's contract (room for 16 values at p).
        unsafe { _mm512_storeu_si512(p as *mut _, v) }
    }
    #[inline(always)]
    unsafe fn zero_i() -> __m512i {
        // SAFETY: the trait's contract (AVX-512).
        unsafe { _mm512_setzero_si512() }
    }
    #[inline(always)]
    unsafe fn load_f(p: *const f32) -> __m512 {
        // SAFETY: the trait's contract (16 values at p).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        // SAFETY: the trait's contract (AVX-512).
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn to_f32(i: __m512i) -> __m512 {
        // SAFETY: the trait's contract (AVX-512).
        unsafe { _mm512_cvtepi32_ps(i) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the trait's contract (AVX-512 F).
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn store(v: __m512, p: *mut f32) {
        // SAFETY: the trait's contract (room for 16 values at p).
        unsafe { _mm512_storeu_ps(p, v) }
    }
}

/// [`super::gemm::panel_corr`] on [`Vnni`] lanes, compiled for AVX-512 F/BW + VNNI.
///
/// # Safety
/// The CPU has AVX-512 F/BW + VNNI; the contract of [`super::gemm::panel_corr`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub(super) unsafe fn gemm_corr(codes: &[u8], unit: usize, corr: &mut [i32]) {
    // SAFETY: the caller's contract.
    unsafe { super::gemm::panel_corr::<Vnni>(codes, unit, corr) }
}

/// [`super::gemm::block`] on [`Vnni`] lanes, compiled for AVX-512 F/BW + VNNI.
///
/// # Safety
/// The CPU has AVX-512 F/BW + VNNI and AVX2/FMA; the contract of [`super::gemm::block`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub(super) unsafe fn gemm_block(
    pw: &super::gemm::PackedW,
    xp: &super::gemm::XPrep,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    y: super::YPtr,
    o: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { super::gemm::block::<Vnni>(pw, xp, rows, panels, y, o, accumulate) }
}

/// The quantization of whole groups of x with the bits of [`super::quantize_row`] in 512-bit
/// code (the row's driver is [`super::quantize_row_simd`]), the design of
/// [`super::avx2::quantize_groups`] at twice the width: per group of 128, `max |x|` and the finiteness check over 8 vectors of 16 (two running maxima), then in
/// a second pass over the row the scaled and clamped values rounded by `vcvtps2dq`, packed to
/// bytes (two in-lane packs and one `vpermd` back to element order), and the unit sums from
/// `vpdpbusd` of ones by the bytes (sums of 4 per i32 lane).
///
/// # Safety
/// The CPU has AVX-512 F/BW + VNNI and AVX2; the lengths of [`super::QuantizeGroups`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
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
    let inf = _mm512_set1_ps(f32::INFINITY);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let ones = _mm512_set1_epi8(1);
    let flip_bytes = _mm512_set1_epi8(flip as i8);
    // After the two packs, dword 4l + p holds values 4l..4l + 4 of source p (of a, b, c, d);
    // element order wants at dword j values 4(j % 4).. of source j / 4.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut bad: __mmask16 = 0;
    for g in 0..full {
        let src = xv[g * GROUP..(g + 1) * GROUP].as_ptr();
        // Two independent maxima (exact in any order; `max(a, most)` keeps `most` where `a`
        // is NaN, as the portable `a > most ? a : most`).
        let mut most = [_mm512_setzero_ps(); 2];
        for j in 0..GROUP / 16 {
            // SAFETY: 16 floats at 16j of the group's 128.
            let a = _mm512_abs_ps(unsafe { _mm512_loadu_ps(src.add(16 * j)) });
            most[j % 2] = _mm512_max_ps(a, most[j % 2]);
            // NaN (unordered) or infinite.
            bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
        }
        let m = _mm512_max_ps(most[0], most[1]);
        sx[g] = super::avx2::hmax(_mm256_max_ps(
            _mm512_castps512_ps256(m),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(m))),
        ));
    }
    for g in 0..full {
        let src = xv[g * GROUP..(g + 1) * GROUP].as_ptr();
        let load = |j: usize| {
            // SAFETY: 16 floats at 16j (j < 8) of the group's 128.
            unsafe { _mm512_loadu_ps(src.add(16 * j)) }
        };
        let amax = sx[g];
        sx[g] = amax / 127.0;
        let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let mut sums = [_mm256_setzero_si256(); 4];
        for k in 0..2 {
            // (A helper fn rather than a closure, as in the AVX2 tier.)
            let a = quantize16(load(4 * k), inv, lo, hi);
            let b = quantize16(load(4 * k + 1), inv, lo, hi);
            let c = quantize16(load(4 * k + 2), inv, lo, hi);
            let d = quantize16(load(4 * k + 3), inv, lo, hi);
            let packed = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
            let bytes = _mm512_permutexvar_epi32(order, packed);
            // Sums of 4 consecutive values per i32 lane (|sum| <= 508).
            let s4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, bytes);
            sums[2 * k] = _mm512_castsi512_si256(s4);
            sums[2 * k + 1] = _mm512_extracti64x4_epi64::<1>(s4);
            let out = _mm512_xor_si512(bytes, flip_bytes);
            // SAFETY: 64 bytes at g·128 + 64k, inside xq (asserted lengths).
            unsafe { _mm512_storeu_si512(xq[g * GROUP + 64 * k..].as_mut_ptr() as *mut _, out) };
        }
        // SAFETY: the group's `per_group` unit sums lie inside qs (asserted lengths).
        unsafe { super::avx2::store_units(unit, sums, qs[g * per_group..].as_mut_ptr()) };
    }
    bad == 0
}

/// `round_half_even(clamp(v · inv, lo, hi))` in i32 lanes (`vcvtps2dq` under the default
/// rounding mode), as the AVX2 tier's `quantize8`.
#[inline(always)]
fn quantize16(v: __m512, inv: __m512, lo: __m512, hi: __m512) -> __m512i {
    // SAFETY: inlined into AVX-512 code only (`quantize_groups`).
    unsafe { _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), lo), hi)) }
}
