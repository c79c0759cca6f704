//! The AVX2 + FMA + F16C kernels of [`crate::int8`].

use super::{hsum, load16, store_panel_run};
use crate::int8::*;
use crate::kernels::for_row_octets;
use crate::kernels::ColBlock;
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

/// One forward GEMM panel (`FwdPack`), as the AVX-512 tier's `int8::pack_fwd_panel` writes
/// it: `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `rows <= 16`, `len`
/// a multiple of 16 (any `c0`), all inside W, `dst.len() >= len · 16` (checked by the
/// caller). `zero + scale · code` per lane, the reference's bits.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn pack_fwd_panel(m: &Int8Matrix, b: ColBlock, dst: &mut [f32]) {
    let (sc, zr) = (m.scales.f32s(), m.zeros.f32s());
    let (mut s, mut z) = ([0.0f32; 16], [0.0f32; 16]);
    s[..b.rows].copy_from_slice(&sc[b.r0..b.r0 + b.rows]);
    z[..b.rows].copy_from_slice(&zr[b.r0..b.r0 + b.rows]);
    let (sv, zv) = (load16(&s), load16(&z));
    let codes = m.codes.as_slice().as_ptr();
    let d = dst.as_mut_ptr();
    for k in 0..b.len / 16 {
        // SAFETY: columns c0 + 16k..+16 of rows r0 + j < out lie inside W (the caller's
        // checks); 256 floats of dst at 256k (len · 16 floats).
        store_panel_run(
            b.rows,
            d.add(k * 256),
            |j| {
                let p = codes.add((b.r0 + j) * m.inn + b.c0 + k * 16);
                [
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)),
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i)),
                ]
            },
            |c, h| _mm256_add_ps(zv[h], _mm256_mul_ps(sv[h], _mm256_cvtepi32_ps(c))),
        );
    }
}

/// Fused GEMV, 4 rows at a time sharing the loads of x. Shapes: W `out x in` (`codes`
/// `[out, in]`, `scales`/`zeros` `[out]`), `x` `[in]`, `y.len() >= rows.len()`. Per row:
/// `Σ_k (zero + scale · code_k) · x_k`, each weight dequantized in registers as the
/// reference dequantizes it (a multiply, then an add), with no `zero · Σx` to cancel against.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemv(
    m: &Int8Matrix,
    x: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    if x.len() != m.inn || rows.end > m.out || y.len() < rows.len() {
        return;
    }
    for_row_octets!(
        rows,
        |r| dot_rows::<8>(m, r, x),
        dot_rows::<4>(m, r, x),
        dot_rows::<1>(m, r, x)[0],
        crate::kernels::store_row(y, acc)
    );
}

/// `Σ_k (zero + scale · code_k) · x_k` for rows `r0..r0+R` (`< out`, checked by the caller).
#[inline(always)]
unsafe fn dot_rows<const R: usize>(m: &Int8Matrix, r0: usize, x: &[f32]) -> [f32; R] {
    let i = m.inn;
    let codes = m.codes.as_slice();
    let (sc, zr) = (m.scales.f32s(), m.zeros.f32s());
    let mut acc = [_mm256_setzero_ps(); R];
    let mut k = 0;
    while k + 8 <= i {
        // SAFETY: k + 8 <= in: inside x and inside each row r0 + r < out of codes.
        let xv = _mm256_loadu_ps(x.as_ptr().add(k));
        for r in 0..R {
            let p = codes.as_ptr().add((r0 + r) * i + k);
            let c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            // (Broadcast from memory each step: loads, not registers, for 8 rows.)
            let (s, z) = (
                _mm256_broadcast_ss(&sc[r0 + r]),
                _mm256_broadcast_ss(&zr[r0 + r]),
            );
            let w = _mm256_add_ps(z, _mm256_mul_ps(s, c));
            acc[r] = _mm256_fmadd_ps(w, xv, acc[r]);
        }
        k += 8;
    }
    // A loop, not a closure: closures do not inherit the target features.
    let mut out = [0.0f32; R];
    for (r, o) in out.iter_mut().enumerate() {
        let row = &codes[(r0 + r) * i..(r0 + r + 1) * i];
        let (s, z) = (sc[r0 + r], zr[r0 + r]);
        let tail: f32 = (k..i).map(|j| (z + s * row[j] as f32) * x[j]).sum();
        *o = hsum(acc[r]) + tail;
    }
    out
}
