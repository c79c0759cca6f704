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
