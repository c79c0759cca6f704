//! The AVX2 + FMA + F16C kernels of [`crate::int8`].

use super::hsum;
use crate::int8::*;
use crate::kernels::for_row_quads;
use std::arch::x86_64::*;

/// Shapes: `codes.len() == out.len()` (any length; the last `len % 8` by the scalar code).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dequantize(codes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
    dequantize_body(codes, scale, zero, out)
}

#[inline(always)]
unsafe fn dequantize_body(codes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
    let n = codes.len().min(out.len());
    let (s, z) = (_mm256_set1_ps(scale), _mm256_set1_ps(zero));
    let mut k = 0;
    while k + 8 <= n {
        // SAFETY: k + 8 <= n: 8 bytes of codes, 8 floats of out.
        let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(k) as *const __m128i));
        let v = _mm256_add_ps(z, _mm256_mul_ps(s, _mm256_cvtepi32_ps(c)));
        _mm256_storeu_ps(out.as_mut_ptr().add(k), v);
        k += 8;
    }
    dequantize_ref(&codes[k..n], scale, zero, &mut out[k..n]);
}

/// Fused GEMV, 4 rows at a time sharing the loads of x. Shapes: W `out x in` (`codes`
/// `[out, in]`, `scales`/`zeros` `[out]`), `x` `[in]`, `sx = Σ x`, `y.len() >= rows.len()`.
/// Per row: `zero · Σx + scale · Σ_k code_k x_k`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemv(
    m: &Int8Matrix,
    x: &[f32],
    sx: f32,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    if x.len() != m.inn || rows.end > m.out || y.len() < rows.len() {
        return;
    }
    let (sc, zr) = (m.scales.f32s(), m.zeros.f32s());
    for_row_quads!(
        rows,
        |r| dot_rows::<4>(m, r, x),
        dot_rows::<1>(m, r, x)[0],
        |j: usize, row: usize, d: f32| {
            let v = zr[row] * sx + sc[row] * d;
            y[j] = if acc { y[j] + v } else { v };
        }
    );
}

/// `Σ_k code_k x_k` for rows `r0..r0+R` (`< out`, checked by the caller).
#[inline(always)]
unsafe fn dot_rows<const R: usize>(m: &Int8Matrix, r0: usize, x: &[f32]) -> [f32; R] {
    let i = m.inn;
    let codes = m.codes.as_slice();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut k = 0;
    while k + 8 <= i {
        // SAFETY: k + 8 <= in: inside x and inside each row r0 + r < out of codes.
        let xv = _mm256_loadu_ps(x.as_ptr().add(k));
        for r in 0..R {
            let p = codes.as_ptr().add((r0 + r) * i + k);
            let c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            acc[r] = _mm256_fmadd_ps(c, xv, acc[r]);
        }
        k += 8;
    }
    // A loop, not a closure: closures do not inherit the target features.
    let mut out = [0.0f32; R];
    for (r, o) in out.iter_mut().enumerate() {
        let row = &codes[(r0 + r) * i..(r0 + r + 1) * i];
        let tail: f32 = (k..i).map(|j| row[j] as f32 * x[j]).sum();
        *o = hsum(acc[r]) + tail;
    }
    out
}
