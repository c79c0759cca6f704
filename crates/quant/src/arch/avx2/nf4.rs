//! The AVX2 + FMA + F16C kernels of [`crate::nf4`].

use super::{hsum, load16, lut16, lut16_sel, store_panel_run};
use crate::kernels::for_row_quads;
use crate::nf4::*;
use std::arch::x86_64::*;

use crate::kernels::ColBlock;

/// 16 codes (8 bytes at `p`, first element in the high nibble) as element-order bytes.
#[inline(always)]
unsafe fn unpack16(p: *const u8) -> __m128i {
    // SAFETY: (caller) 8 readable bytes at `p`.
    let b = _mm_loadl_epi64(p as *const __m128i);
    let m = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(b, m);
    let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    _mm_unpacklo_epi8(hi, lo)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize(
    x: &[f32],
    packed: &mut [u8],
    absmax: &mut [f32],
) -> std::result::Result<(), usize> {
    let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let fmax = _mm256_set1_ps(f32::MAX);
    for b in 0..x.len() / NF4_BLOCK {
        let p = x.as_ptr().add(b * NF4_BLOCK);
        let mut v = [_mm256_setzero_ps(); 8];
        let mut m = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        for (j, vj) in v.iter_mut().enumerate() {
            // SAFETY: block b lies inside x.
            *vj = _mm256_loadu_ps(p.add(8 * j));
            let a = _mm256_and_ps(*vj, absm);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));
            m = _mm256_max_ps(m, a);
        }
        if _mm256_movemask_ps(bad) != 0 {
            return quantize_ref(x, packed, absmax);
        }
        let mut t = [0.0f32; 8];
        _mm256_storeu_ps(t.as_mut_ptr(), m);
        let am = t.iter().fold(0.0f32, |a, &v| a.max(v));
        absmax[b] = am;
        let mut codes = [7u8; NF4_BLOCK];
        if am != 0.0 {
            let inv = _mm256_set1_ps(1.0 / am.max(ABSMAX_FLOOR));
            for (j, vj) in v.iter().enumerate() {
                let xn = _mm256_mul_ps(*vj, inv);
                let mut cnt = _mm256_setzero_si256();
                for th in NF4_THRESHOLDS {
                    let gt = _mm256_castps_si256(_mm256_cmp_ps(xn, _mm256_set1_ps(th), _CMP_GT_OQ));
                    cnt = _mm256_sub_epi32(cnt, gt);
                }
                let mut c = [0i32; 8];
                _mm256_storeu_si256(c.as_mut_ptr() as *mut __m256i, cnt);
                for k in 0..8 {
                    codes[j * 8 + k] = c[k] as u8;
                }
            }
        }
        for (i, o) in packed[b * 32..b * 32 + 32].iter_mut().enumerate() {
            *o = (codes[2 * i] << 4) | codes[2 * i + 1];
        }
    }
    Ok(())
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(packed: &[u8], scale: impl Fn(usize) -> f32, out: &mut [f32]) {
    let lo = _mm256_loadu_ps(NF4_LEVELS.as_ptr());
    let hi = _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8));
    for g in 0..out.len() / 16 {
        // SAFETY: run g: 8 bytes of packed, 16 floats of out (lengths set by the caller).
        let codes = unpack16(packed.as_ptr().add(g * 8));
        let s = _mm256_set1_ps(scale(g));
        let c0 = _mm256_cvtepu8_epi32(codes);
        let c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
        _mm256_storeu_ps(
            out.as_mut_ptr().add(g * 16),
            _mm256_mul_ps(lut16(lo, hi, c0), s),
        );
        _mm256_storeu_ps(
            out.as_mut_ptr().add(g * 16 + 8),
            _mm256_mul_ps(lut16(lo, hi, c1), s),
        );
    }
}

/// Fused GEMV: `y[j] (+)= W[rows.start + j, :] · x`, 4 rows at a time sharing the loads of
/// `x`. Shapes: W `out x in` (`packed` `[out·in/2]`, one absmax per 64); `xp` is
/// [`Nf4Matrix::gemv_prepare`]'s `[in]` x with each run of 16 reordered as its 8 even then
/// 8 odd elements (the high / low nibbles); `y.len() >= rows.len()`. Per row:
/// `Σ_b absmax_b · Σ_k level[code_k] x_k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv(
    m: &Nf4Matrix,
    xp: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    gemv_body(m, xp, rows, y, acc)
}

#[inline(always)]
unsafe fn gemv_body(
    m: &Nf4Matrix,
    xp: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    if xp.len() != m.inn || rows.end > m.out || y.len() < rows.len() {
        return;
    }
    for_row_quads!(
        rows,
        |r| dot_rows::<4>(m, r, xp),
        dot_rows::<1>(m, r, xp)[0],
        crate::kernels::store_row(y, acc)
    );
}

/// Dot products of rows `r0..r0+R` (all `< out`, checked by the caller) with x.
#[inline(always)]
unsafe fn dot_rows<const R: usize>(m: &Nf4Matrix, r0: usize, xp: &[f32]) -> [f32; R] {
    const CH: usize = 32;
    let lo = _mm256_loadu_ps(NF4_LEVELS.as_ptr());
    let hi = _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8));
    let nb = m.inn / NF4_BLOCK;
    let packed = m.packed.as_slice().as_ptr();
    let x = xp.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut am = [[0.0f32; CH]; R];
    let mut b = 0;
    while b < nb {
        let cnt = (nb - b).min(CH);
        for r in 0..R {
            m.fill_absmax((r0 + r) * nb + b, &mut am[r][..cnt]);
        }
        for t in 0..cnt {
            let mut te = [_mm256_setzero_ps(); R];
            let mut to = [_mm256_setzero_ps(); R];
            for g in 0..4 {
                // SAFETY: run g of block b + t < nb: 16 floats inside xp (len in).
                let xo_ = x.add((b + t) * NF4_BLOCK + g * 16);
                let xe = _mm256_loadu_ps(xo_);
                let xo = _mm256_loadu_ps(xo_.add(8));
                for r in 0..R {
                    // SAFETY: flat block (r0 + r)·nb + b + t lies inside `packed`.
                    let q = packed.add((((r0 + r) * nb + b + t) * 32) + g * 8);
                    let d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q as *const __m128i));
                    let ev = lut16_sel(
                        lo,
                        hi,
                        _mm256_srli_epi32::<4>(d),
                        _mm256_slli_epi32::<24>(d),
                    );
                    let od = lut16_sel(lo, hi, d, _mm256_slli_epi32::<28>(d));
                    te[r] = _mm256_fmadd_ps(ev, xe, te[r]);
                    to[r] = _mm256_fmadd_ps(od, xo, to[r]);
                }
            }
            for r in 0..R {
                acc[r] = _mm256_fmadd_ps(
                    _mm256_add_ps(te[r], to[r]),
                    _mm256_broadcast_ss(&am[r][t]),
                    acc[r],
                );
            }
        }
        b += cnt;
    }
    // A loop, not a closure: closures do not inherit the target features.
    let mut out = [0.0f32; R];
    for (o, &a) in out.iter_mut().zip(&acc) {
        *o = hsum(a);
    }
    out
}

/// Shapes: W rows `r0..r0+rows`, columns `c0..c0+len` (`c0`, `len` multiples of 16, all
/// inside W, checked by the caller) into `dst[p * stride..p * stride + len]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequant_cols(m: &Nf4Matrix, b: ColBlock, dst: &mut [f32]) {
    let lo = _mm256_loadu_ps(NF4_LEVELS.as_ptr());
    let hi = _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8));
    let packed = m.packed.as_slice().as_ptr();
    let d = dst.as_mut_ptr();
    for p in 0..b.rows {
        let s = (b.r0 + p) * m.inn + b.c0;
        let mut cur = usize::MAX;
        let mut sv = _mm256_setzero_ps();
        for k in 0..b.len / 16 {
            let e = s + k * 16;
            if e / NF4_BLOCK != cur {
                cur = e / NF4_BLOCK;
                sv = _mm256_set1_ps(m.block_absmax(cur));
            }
            // SAFETY: run e..e+16 lies in row b.r0 + p of W (checked by the caller), and
            // dst[p * b.stride + 16k..+16] inside dst.
            let codes = unpack16(packed.add(e / 2));
            let c0v = _mm256_cvtepu8_epi32(codes);
            let c1v = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
            _mm256_storeu_ps(
                d.add(p * b.stride + k * 16),
                _mm256_mul_ps(lut16(lo, hi, c0v), sv),
            );
            _mm256_storeu_ps(
                d.add(p * b.stride + k * 16 + 8),
                _mm256_mul_ps(lut16(lo, hi, c1v), sv),
            );
        }
    }
}

/// One forward GEMM panel (`FwdPack`), as the AVX-512 tier's `nf4::pack_fwd_panel` writes
/// it: `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `in % 16 == 0`,
/// `rows <= 16`, `c0` and `len` multiples of 16, all inside W, `dst.len() >= len · 16`
/// (checked by the caller). `level[code] · absmax` per lane, the reference's bits.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_fwd_panel(m: &Nf4Matrix, b: ColBlock, dst: &mut [f32]) {
    let lo = _mm256_loadu_ps(NF4_LEVELS.as_ptr());
    let hi = _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8));
    let packed = m.packed.as_slice().as_ptr();
    let d = dst.as_mut_ptr();
    let mut absmax = PanelAbsmax::new();
    for k in 0..b.len / 16 {
        let first = |j: usize| (b.r0 + j) * m.inn + b.c0 + k * 16;
        absmax.at(m, b.rows, first);
        let sv = load16(&absmax.scale);
        // SAFETY: runs first(j)..+16 lie in rows r0 + j < out of W (the caller's checks), so
        // 8 bytes of codes each; 256 floats of dst at 256k (len · 16 floats).
        store_panel_run(
            b.rows,
            d.add(k * 256),
            |j| {
                let c = unpack16(packed.add(first(j) / 2));
                [
                    _mm256_cvtepu8_epi32(c),
                    _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(c)),
                ]
            },
            |c, h| _mm256_mul_ps(lut16(lo, hi, c), sv[h]),
        );
    }
}

/// [`Nf4Matrix::fill_absmax`]'s double-quantized case for blocks `b0..b0 + 8·k` (the largest
/// whole runs of 8 in `dst`): `dst[j] = map[codes[b0 + j]] · scale[(b0 + j) / 256] + offset`,
/// each table read by a gather, the product and the sum rounded apart as the scalar loop
/// rounds them: the same values. Returns how many of `dst` it wrote.
///
/// # Safety
/// The CPU has AVX2; `codes` holds `b0 + dst.len()` codes, `scale` an entry for every block
/// of 256 they reach, and `b0 + dst.len() <= i32::MAX`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn absmax_double(
    codes: &[u8],
    b0: usize,
    scale: &[f32],
    map: &[f32; 256],
    offset: f32,
    dst: &mut [f32],
) -> usize {
    const _: () = assert!(DQ_BLOCK == 256, "the scale index is the block index >> 8");
    let whole = dst.len() / 8 * 8;
    let off = _mm256_set1_ps(offset);
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for k in (0..whole).step_by(8) {
        let b = b0 + k;
        // SAFETY: codes b..b + 8 and the scales of their blocks of 256 exist and every index
        // fits an i32 (the caller's contract); dst has k + 8 elements.
        unsafe {
            let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(b) as *const __m128i));
            let v = _mm256_i32gather_ps::<4>(map.as_ptr(), c);
            // The 8 blocks' scales: one broadcast where they lie in one block of 256 (always,
            // for runs that start on a multiple of 8), else a gather.
            let s = if b / DQ_BLOCK == (b + 7) / DQ_BLOCK {
                _mm256_set1_ps(*scale.get_unchecked(b / DQ_BLOCK))
            } else {
                let si =
                    _mm256_srli_epi32::<8>(_mm256_add_epi32(_mm256_set1_epi32(b as i32), iota));
                _mm256_i32gather_ps::<4>(scale.as_ptr(), si)
            };
            _mm256_storeu_ps(
                dst.as_mut_ptr().add(k),
                _mm256_add_ps(_mm256_mul_ps(v, s), off),
            );
        }
    }
    whole
}
