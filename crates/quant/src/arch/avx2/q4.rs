//! The AVX2 + FMA + F16C kernels of [`crate::q4`].

use super::{f16_to_f32, hmax, hsum, lut16, store_panel_run};
use crate::cpu::{prefetch_weights, quant_prefetch, PREFETCH_ROWS};
use crate::kernels::for_row_quads;
use crate::q4::*;
use half::f16;
use std::arch::x86_64::*;

use crate::kernels::ColBlock;

/// 16 codes of one block (8 bytes at `p`), in element order, as bytes.
#[inline(always)]
unsafe fn unpack16(p: *const u8) -> __m128i {
    // SAFETY: (caller) 8 readable bytes at `p`.
    let b = _mm_loadl_epi64(p as *const __m128i);
    let m = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(b, m);
    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    _mm_unpacklo_epi8(lo, hi)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_row(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
    let nb = x.len() / Q4_BLOCK;
    let full = nb / 8 * 8;
    for g in (0..full).step_by(8) {
        // SAFETY: blocks g..g+8 lie inside x, packed and norm (checked by the caller).
        if !quantize_8_blocks(
            x.as_ptr().add(g * 16),
            packed.as_mut_ptr().add(g * 8),
            norm.as_mut_ptr().add(g),
        ) {
            return false;
        }
    }
    quantize_row_body(&x[full * 16..], &mut packed[full * 8..], &mut norm[full..])
}

/// `[max(a0, a1), max(a2, a3), max(b0, b1), max(b2, b3) | same for the high lanes]`.
#[inline(always)]
unsafe fn pair_max(a: __m256, b: __m256) -> __m256 {
    _mm256_max_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(a, b),
        _mm256_shuffle_ps::<0b11_01_11_01>(a, b),
    )
}

/// Maxima of the 8 lanes of each of `m[0..8]`, as one vector `[max m0, .., max m7]`
/// (pairwise shuffles and `vmaxps`, 21 operations for 8 reductions).
#[inline(always)]
unsafe fn hmax8(m: [__m256; 8]) -> __m256 {
    let (p01, p23, p45, p67) = (
        pair_max(m[0], m[1]),
        pair_max(m[2], m[3]),
        pair_max(m[4], m[5]),
        pair_max(m[6], m[7]),
    );
    // Lanes [m0, m0, m1, m1 | ..] -> [m0, m1, m2, m3 | m0, m1, m2, m3] (half maxima).
    let (q0, q1) = (pair_max(p01, p23), pair_max(p45, p67));
    _mm256_max_ps(
        _mm256_permute2f128_ps::<0x20>(q0, q1),
        _mm256_permute2f128_ps::<0x31>(q0, q1),
    )
}

/// Quantizes 8 consecutive blocks (128 floats at `x`) into 64 bytes at `packed` and 8
/// norms at `norm`, bit-identical to [`quantize_row_ref`]; returns `false` (writing
/// nothing meaningful) if a value is NaN or infinite or a norm exceeds f16, for the
/// caller's scalar error path.
///
/// Differences from the per-block body, each exact: codes round by `vcvtps2dq` in the
/// default round-half-to-even mode; an all-zero block's `0 / 0 = NaN` quotients convert
/// to `i32::MIN`, which the saturating packs turn into code 0, as the reference's special
/// case does; NaN is detected by a running sum (NaN or Inf makes it non-finite, and so
/// may an overflow, which merely sends the row to the exact scalar path).
#[inline(always)]
unsafe fn quantize_8_blocks(x: *const f32, packed: *mut u8, norm: *mut f16) -> bool {
    let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut v = [_mm256_setzero_ps(); 16];
    let mut sum = _mm256_setzero_ps();
    let mut m = [_mm256_setzero_ps(); 8];
    for b in 0..8 {
        v[2 * b] = _mm256_loadu_ps(x.add(16 * b));
        v[2 * b + 1] = _mm256_loadu_ps(x.add(16 * b + 8));
        sum = _mm256_add_ps(sum, _mm256_add_ps(v[2 * b], v[2 * b + 1]));
        m[b] = _mm256_max_ps(
            _mm256_and_ps(v[2 * b], absm),
            _mm256_and_ps(v[2 * b + 1], absm),
        );
    }
    let n = hmax8(m);
    let finite = _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(sum, absm), _mm256_set1_ps(f32::MAX));
    let fits = _mm256_cmp_ps::<_CMP_LT_OQ>(n, _mm256_set1_ps(F16_ROUNDS_TO_INF));
    if _mm256_movemask_ps(_mm256_and_ps(finite, fits)) != 0xff {
        return false;
    }
    _mm_storeu_si128(norm as *mut __m128i, _mm256_cvtps_ph::<0>(n));
    let fifteen = _mm256_set1_ps(15.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // (c_2i, c_2i+1) -> c_2i + 16 c_2i+1 with one vpmaddubsw.
    let nibble_pair = _mm256_set1_epi16(0x1001);
    for pairs in 0..4 {
        let mut codes = [_mm256_setzero_si256(); 4];
        for h in 0..2 {
            let b = 2 * pairs + h;
            let nb = _mm256_permutevar8x32_ps(n, _mm256_set1_epi32(b as i32));
            let two = _mm256_add_ps(nb, nb);
            for k in 0..2 {
                let q = _mm256_mul_ps(_mm256_div_ps(_mm256_add_ps(v[2 * b + k], nb), two), fifteen);
                codes[2 * h + k] = _mm256_cvtps_epi32(q);
            }
        }
        // Bytes, dwords [A0-3, A8-11, B0-3, B8-11 | A4-7, A12-15, B4-7, B12-15] -> natural.
        let bytes = _mm256_packus_epi16(
            _mm256_packs_epi32(codes[0], codes[1]),
            _mm256_packs_epi32(codes[2], codes[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        let nib = _mm256_maddubs_epi16(bytes, nibble_pair);
        // [A 8 bytes, A dup | B 8 bytes, B dup] -> low 128 bits [A | B].
        let out = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi16(nib, nib));
        _mm_storeu_si128(
            packed.add(16 * pairs) as *mut __m128i,
            _mm256_castsi256_si128(out),
        );
    }
    true
}

#[inline(always)]
unsafe fn quantize_row_body(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
    let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let fmax = _mm256_set1_ps(f32::MAX);
    let fifteen = _mm256_set1_ps(15.0);
    let mask = _mm_set1_epi16(0x00ff);
    for b in 0..x.len() / Q4_BLOCK {
        // SAFETY: block b covers x[16b..16b+16], inside x (checked by the caller).
        let v0 = _mm256_loadu_ps(x.as_ptr().add(b * 16));
        let v1 = _mm256_loadu_ps(x.as_ptr().add(b * 16 + 8));
        let a0 = _mm256_and_ps(v0, absm);
        let a1 = _mm256_and_ps(v1, absm);
        // NaN compares unordered -> true; Inf > MAX.
        let bad = _mm256_or_ps(
            _mm256_cmp_ps(a0, fmax, _CMP_NLE_UQ),
            _mm256_cmp_ps(a1, fmax, _CMP_NLE_UQ),
        );
        if _mm256_movemask_ps(bad) != 0 {
            return false;
        }
        let n = hmax(_mm256_max_ps(a0, a1));
        if n >= F16_ROUNDS_TO_INF {
            return false;
        }
        norm[b] = f16::from_bits(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(n), 0), 0) as u16);
        let dst = packed.as_mut_ptr().add(b * 8);
        if n == 0.0 {
            // SAFETY: 8 bytes of block b inside `packed`.
            _mm_storel_epi64(dst as *mut __m128i, _mm_setzero_si128());
            continue;
        }
        let nv = _mm256_set1_ps(n);
        let two = _mm256_set1_ps(n + n);
        const RND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let q0 = _mm256_round_ps::<RND>(_mm256_mul_ps(
            _mm256_div_ps(_mm256_add_ps(v0, nv), two),
            fifteen,
        ));
        let q1 = _mm256_round_ps::<RND>(_mm256_mul_ps(
            _mm256_div_ps(_mm256_add_ps(v1, nv), two),
            fifteen,
        ));
        let i0 = _mm256_cvtps_epi32(q0);
        let i1 = _mm256_cvtps_epi32(q1);
        // 16 x i16 in element order
        let w = _mm256_packs_epi32(i0, i1); // lanes: [i0lo, i1lo, i0hi, i1hi]
        let w = _mm256_permute4x64_epi64(w, 0b11_01_10_00);
        let w = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)); // 16 u8
                                                                                             // pair bytes into nibbles: u16 lane = c_{2i} | c_{2i+1} << 8
        let p = _mm_and_si128(_mm_or_si128(w, _mm_srli_epi16(w, 4)), mask);
        let p = _mm_packus_epi16(p, p);
        // SAFETY: 8 bytes of block b inside `packed`.
        _mm_storel_epi64(dst as *mut __m128i, p);
    }
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(packed: &[u8], norm: &[f16], out: &mut [f32]) {
    dequantize_body(packed, norm, out)
}

#[inline(always)]
unsafe fn dequantize_body(packed: &[u8], norm: &[f16], out: &mut [f32]) {
    let l = lut();
    let lo = _mm256_loadu_ps(l.as_ptr());
    let hi = _mm256_loadu_ps(l.as_ptr().add(8));
    let mut nf = [0.0f32; 64];
    for (cb, nchunk) in norm.chunks(64).enumerate() {
        f16_to_f32(nchunk, &mut nf[..nchunk.len()]);
        for (j, &n) in nf[..nchunk.len()].iter().enumerate() {
            let b = cb * 64 + j;
            // SAFETY: block b: 8 bytes of packed, 16 floats of out (lengths set by caller).
            let codes = unpack16(packed.as_ptr().add(b * 8));
            let c0 = _mm256_cvtepu8_epi32(codes);
            let c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
            let nv = _mm256_set1_ps(n);
            let r0 = _mm256_sub_ps(_mm256_mul_ps(lut16(lo, hi, c0), nv), nv);
            let r1 = _mm256_sub_ps(_mm256_mul_ps(lut16(lo, hi, c1), nv), nv);
            _mm256_storeu_ps(out.as_mut_ptr().add(b * 16), r0);
            _mm256_storeu_ps(out.as_mut_ptr().add(b * 16 + 8), r1);
        }
    }
}

/// Fused GEMV: `y[j] (+)= W[rows.start + j, :] · x`, 4 rows at a time sharing the loads of
/// `x`. Shapes: W `out x in` (`packed` `[out, in/2]`, `norm` `[out, in/16]`); `prep` is
/// [`Q4Matrix::gemv_prepare`]'s `[in]` even/odd-permuted x followed by the `[in/16]` block
/// sums of x; `y.len() >= rows.len()`. Per row:
/// `Σ_b n_b · ((2/15) · Σ_k code_k x_k − S_b)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv(
    m: &Q4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    gemv_body(m, prep, rows, y, acc)
}

#[inline(always)]
unsafe fn gemv_body(
    m: &Q4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    let nb = m.inn / Q4_BLOCK;
    if prep.len() != m.inn + nb || rows.end > m.out || y.len() < rows.len() {
        return;
    }
    for_row_quads!(
        rows,
        |r| dot_rows::<4>(m, r, prep),
        dot_rows::<1>(m, r, prep)[0],
        crate::kernels::store_row(y, acc)
    );
}

/// Dot products of rows `r0..r0+R` (all `< out`, checked by the caller) with x.
#[inline(always)]
unsafe fn dot_rows<const R: usize>(m: &Q4Matrix, r0: usize, prep: &[f32]) -> [f32; R] {
    let nb = m.inn / Q4_BLOCK;
    let (xp, sums) = (prep.as_ptr(), prep.as_ptr().add(m.inn));
    let packed = m.packed.as_slice().as_ptr();
    let norms = m.norm.f16s();
    let pf = quant_prefetch();
    let mask = _mm256_set1_epi32(15);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut corr = [_mm256_setzero_ps(); R];
    let mut nf = [[0.0f32; 8]; R];
    let mut b = 0;
    while b < nb {
        let nblk = (nb - b).min(8);
        for r in 0..R {
            // Prefetch the same blocks 4 rows on (the next 4-row sweep; never faults), as
            // `crate::cpu::quant_prefetch` says.
            let ahead = (r0 + r + PREFETCH_ROWS) * nb + b;
            prefetch_weights(pf, packed.wrapping_add(ahead * 8));
            prefetch_weights(pf, norms.as_ptr().wrapping_add(ahead) as *const u8);
        }
        for r in 0..R {
            let nr = &norms[(r0 + r) * nb + b..(r0 + r) * nb + b + nblk];
            let (nv, sv) = if nblk == 8 {
                // SAFETY: 8 norms (16 bytes) in `nr`; 8 sums at b..b+8 < nb in prep.
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(nr.as_ptr() as *const __m128i)),
                    _mm256_loadu_ps(sums.add(b)),
                )
            } else {
                let mut n8 = [0.0f32; 8];
                let mut s8 = [0.0f32; 8];
                for t in 0..nblk {
                    n8[t] = nr[t].to_f32();
                    s8[t] = prep[m.inn + b + t];
                }
                (_mm256_loadu_ps(n8.as_ptr()), _mm256_loadu_ps(s8.as_ptr()))
            };
            _mm256_storeu_ps(nf[r].as_mut_ptr(), nv);
            corr[r] = _mm256_fmadd_ps(nv, sv, corr[r]);
        }
        for t in 0..nblk {
            // SAFETY: block b + t < nb: x floats (b+t)*16..+16 inside prep's first `in`.
            let xe = _mm256_loadu_ps(xp.add((b + t) * 16));
            let xo = _mm256_loadu_ps(xp.add((b + t) * 16 + 8));
            for r in 0..R {
                // SAFETY: block (r0 + r, b + t) is inside `packed` (r0 + r < out).
                let q = packed.add(((r0 + r) * nb + b + t) * 8);
                let d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i));
                let ce = _mm256_cvtepi32_ps(_mm256_and_si256(d, mask));
                let co = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(d));
                let tt = _mm256_fmadd_ps(co, xo, _mm256_mul_ps(ce, xe));
                acc[r] = _mm256_fmadd_ps(tt, _mm256_broadcast_ss(&nf[r][t]), acc[r]);
            }
        }
        b += nblk;
    }
    let mut res = [0.0f32; R];
    for (r, o) in res.iter_mut().enumerate() {
        *o = hsum(acc[r]) * (2.0 / 15.0) - hsum(corr[r]);
    }
    res
}

/// Shapes: W rows `r0..r0+rows`, columns `c0..c0+len` (`c0`, `len` multiples of 16, all
/// inside W, checked by the caller) into `dst[p * stride..p * stride + len]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequant_cols(m: &Q4Matrix, b: ColBlock, dst: &mut [f32]) {
    let l = lut();
    let lo = _mm256_loadu_ps(l.as_ptr());
    let hi = _mm256_loadu_ps(l.as_ptr().add(8));
    let packed = m.packed.as_slice().as_ptr();
    let norms = m.norm.f16s().as_ptr() as *const i16;
    let d = dst.as_mut_ptr();
    let (row_bytes, row_blocks) = (m.row_bytes(), m.row_blocks());
    for p in 0..b.rows {
        let s = (b.r0 + p) * row_blocks + b.c0 / Q4_BLOCK;
        let sb = (b.r0 + p) * row_bytes + b.c0 / 2;
        for k in 0..b.len / Q4_BLOCK {
            // SAFETY: whole block c0/16 + k lies in row b.r0 + p of W (checked by the
            // caller), and dst[p * b.stride + 16k..+16] inside dst.
            let codes = unpack16(packed.add(sb + k * 8));
            let nv = _mm256_cvtph_ps(_mm_set1_epi16(*norms.add(s + k)));
            let c0v = _mm256_cvtepu8_epi32(codes);
            let c1v = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
            let r0v = _mm256_sub_ps(_mm256_mul_ps(lut16(lo, hi, c0v), nv), nv);
            let r1v = _mm256_sub_ps(_mm256_mul_ps(lut16(lo, hi, c1v), nv), nv);
            _mm256_storeu_ps(d.add(p * b.stride + k * 16), r0v);
            _mm256_storeu_ps(d.add(p * b.stride + k * 16 + 8), r1v);
        }
    }
}

/// One forward GEMM panel (`FwdPack`), as the AVX-512 tier's `q4::pack_fwd_panel` writes it:
/// `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `rows <= 16`, `c0` and
/// `len` multiples of 16, all inside W, `dst.len() >= len · 16` (checked by the caller:
/// `ColBlock::fits_panel`). Per block, each half of the rows' norms is one vector:
/// `table[code] · n − n` per lane, the reference's bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_fwd_panel(m: &Q4Matrix, b: ColBlock, dst: &mut [f32]) {
    let l = lut();
    let lo = _mm256_loadu_ps(l.as_ptr());
    let hi = _mm256_loadu_ps(l.as_ptr().add(8));
    let packed = m.packed.as_slice().as_ptr();
    let norms = m.norm.f16s();
    let d = dst.as_mut_ptr();
    let (row_bytes, row_blocks) = (m.row_bytes(), m.row_blocks());
    for k in 0..b.len / Q4_BLOCK {
        let blk = b.c0 / Q4_BLOCK + k;
        let mut bits = [0u16; 16];
        for (j, v) in bits.iter_mut().enumerate().take(b.rows) {
            *v = norms[(b.r0 + j) * row_blocks + blk].to_bits();
        }
        // SAFETY: 16 halves in `bits`.
        let nb = _mm256_loadu_si256(bits.as_ptr() as *const __m256i);
        let nv = [
            _mm256_cvtph_ps(_mm256_castsi256_si128(nb)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(nb)),
        ];
        // SAFETY: rows r0 + j < out and block `blk` lie inside W (the caller's checks), so
        // 8 bytes of codes at each row's block; 256 floats of dst at 256k (len · 16 floats).
        store_panel_run(
            b.rows,
            d.add(k * 256),
            |j| {
                let c = unpack16(packed.add((b.r0 + j) * row_bytes + blk * 8));
                [
                    _mm256_cvtepu8_epi32(c),
                    _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(c)),
                ]
            },
            |c, h| _mm256_sub_ps(_mm256_mul_ps(lut16(lo, hi, c), nv[h]), nv[h]),
        );
    }
}
