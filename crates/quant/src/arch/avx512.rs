//! The AVX-512 tier (AVX-512 F + BW + VL, with AVX2, FMA and F16C): every format's 512-bit
//! kernels side by side.
//!
//! A run of 16 weights is one zmm, and a 16-entry f32 table fills one zmm, so a 4-bit code's
//! value is one `vpermps` (`_mm512_permutexvar_ps`, which reads only the low 4 bits of each
//! index lane: the codes need no masking before a lookup). Partial groups of norms or sums are
//! read with masked loads; a row's ragged edge (a partial block, a column range that does not
//! start on a run of 16) is finished by the format's scalar code, which the callers split off.
//! Written as in the tensor crate: thin `#[target_feature]` wrappers around `#[inline(always)]`
//! bodies. Dequantization is bit-identical to the scalar references (a multiply, then a
//! subtract or add, never a fused multiply-add); the GEMVs sum in their own order.
//!
//! Every function is `unsafe`: the caller guarantees that the CPU has this tier
//! ([`crate::cpu::KernelPath::Avx512`] from `usable`) and the lengths each one documents.

use half::f16;
use std::arch::x86_64::*;

use crate::cpu::{prefetch_weights, quant_prefetch, PREFETCH_ROWS};
use crate::int8::{dequantize_ref as int8_dequantize_ref, Int8Matrix};
use crate::kernels::{for_row_quads, ColBlock};
use crate::nf4::{Nf4Matrix, NF4_BLOCK, NF4_LEVELS};
use crate::q4::{lut as q4_lut, Q4Matrix, Q4_BLOCK};

/// Per-lane right shifts that put the nibbles of 8 bytes, each byte duplicated
/// (`[b0, b0, b1, b1, ..]`), in element order when the even element is the low nibble (Q4).
const SHIFTS_LOW_FIRST: [i32; 16] = [0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4];
/// As [`SHIFTS_LOW_FIRST`] when the even element is the high nibble (NF4).
const SHIFTS_HIGH_FIRST: [i32; 16] = [4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0];
/// Per-lane right shifts for 8 bytes loaded twice (`[b0..b7, b0..b7]`): the low nibbles in
/// lanes 0..8, the high nibbles in lanes 8..16.
const SHIFTS_LOW_THEN_HIGH: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4];
/// As [`SHIFTS_LOW_THEN_HIGH`] with the high nibbles first.
const SHIFTS_HIGH_THEN_LOW: [i32; 16] = [4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0];
/// The codes 0..15 as floats (a lookup in it converts a 4-bit code to f32).
const CODE_VALUES: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
];

/// The mask of the first `n` (at most 16) lanes.
#[inline(always)]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Loads a 16-lane table or shift vector.
#[inline(always)]
unsafe fn load_i32x16(v: &[i32; 16]) -> __m512i {
    // SAFETY: 16 readable i32.
    unsafe { _mm512_loadu_epi32(v.as_ptr()) }
}

/// The 16 nibbles of 8 bytes at `p` as i32 lanes in element order, each byte's pair split by
/// `shifts` ([`SHIFTS_LOW_FIRST`] or [`SHIFTS_HIGH_FIRST`]); bits above the low 4 are not
/// cleared (a `vpermps` lookup ignores them).
#[inline(always)]
unsafe fn nibbles_in_order(p: *const u8, shifts: __m512i) -> __m512i {
    // SAFETY: (caller) 8 readable bytes at `p`.
    unsafe {
        let b = _mm_loadl_epi64(p as *const __m128i);
        _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts)
    }
}

/// The 16 nibbles of 8 bytes at `p` split into halves by `shifts` ([`SHIFTS_LOW_THEN_HIGH`]
/// or [`SHIFTS_HIGH_THEN_LOW`]: lanes 0..8 one nibble of bytes 0..8, lanes 8..16 the other),
/// the order of the even/odd-permuted x the 4-bit GEMVs read; high bits not cleared.
#[inline(always)]
unsafe fn nibbles_split(p: *const u8, shifts: __m512i) -> __m512i {
    // SAFETY: (caller) 8 readable bytes at `p`.
    unsafe {
        let b = _mm_loadl_epi64(p as *const __m128i);
        _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, b)), shifts)
    }
}

/// The first `n` (at most 16) f16 values at `p` as f32 lanes, zeros after them.
#[inline(always)]
unsafe fn halves16(p: *const f16, n: usize) -> __m512 {
    // SAFETY: (caller) `n` readable halves at `p`; masked-off lanes are not read.
    unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p as *const i16)) }
}

/// Writes the lanes of `v` to an array (for scalar broadcasts out of it).
#[inline(always)]
unsafe fn lanes(v: __m512) -> [f32; 16] {
    let mut a = [0.0f32; 16];
    // SAFETY: 16 writable floats.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a
}

/// How a 4-bit kernel takes the high nibble of each byte of a zmm, as a byte `0..=15`.
pub(crate) trait HighNibbles {
    /// `c >> 4` in every byte.
    ///
    /// # Safety
    /// The implementation's CPU features (AVX-512 BW, and GFNI for [`Gf2Affine`]).
    unsafe fn high(c: __m512i) -> __m512i;
}

/// A 16-bit shift and a mask (AVX-512 BW).
pub(crate) struct ShiftMask;

impl HighNibbles for ShiftMask {
    #[inline(always)]
    unsafe fn high(c: __m512i) -> __m512i {
        // SAFETY: register-only; the caller's target features include AVX-512 BW.
        unsafe { _mm512_and_si512(_mm512_srli_epi16::<4>(c), _mm512_set1_epi8(0x0f)) }
    }
}

/// One `vgf2p8affineqb` (GFNI): each byte times the bit matrix of a right shift by 4.
pub(crate) struct Gf2Affine;

/// The 8x8 bit matrix of `x >> 4` for `vgf2p8affineqb`: bit `i` of the result is the parity
/// of `x & byte[7 − i]`, so bytes 7..4 pick bits 4..7 (`i = 0..3`) and bytes 3..0 are zero.
const SHIFT_RIGHT_4: i64 = 0x1020_4080_0000_0000;

impl HighNibbles for Gf2Affine {
    #[inline(always)]
    unsafe fn high(c: __m512i) -> __m512i {
        // SAFETY: register-only; the caller's target features include AVX-512 F and GFNI.
        unsafe { _mm512_gf2p8affine_epi64_epi8::<0>(c, _mm512_set1_epi64(SHIFT_RIGHT_4)) }
    }
}

/// [`crate::act8::fold16`] on a zmm: halves added, then quarters, then the pairs (the same
/// bits).
#[inline(always)]
unsafe fn fold16(a: __m512) -> f32 {
    // SAFETY: register-only; the caller's target features include AVX-512 F.
    unsafe {
        let lo = _mm512_castps512_ps256(a);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
        let f = _mm256_add_ps(lo, hi);
        let g = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps::<1>(f));
        let h = _mm_add_ps(g, _mm_movehl_ps(g, g));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }
}

/// For `a = [row 0 | row 1]` and `b = [row 2 | row 3]` (8 lanes a row): quarter `r` (lanes
/// `4r..4r + 4`) of the result holds row r's lanes `0..4` plus its lanes `4..8`.
#[inline(always)]
unsafe fn add_row_halves(a: __m512, b: __m512) -> __m512 {
    // SAFETY: register-only; the caller's target features include AVX-512 F.
    unsafe {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    }
}

/// Lane 0 of each 128-bit quarter of `s`.
#[inline(always)]
unsafe fn quarter_firsts(s: __m512) -> [f32; 4] {
    // SAFETY: register-only but for the store into a local array; the caller's target
    // features include AVX-512 F.
    unsafe {
        let picked = _mm512_permutexvar_ps(
            _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            s,
        );
        let mut out = [0.0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(picked));
        out
    }
}

/// [`fold16`] of four rows' accumulators at once, side by side in registers: each row's
/// lanes `l + 8` onto `l`, then `l + 4` onto `l`, then `(0 + 2) + (1 + 3)`: the same additions
/// on the same operands (each sum of two values is the same bits in either order).
#[inline(always)]
unsafe fn fold16_quad(a: &[__m512; 4]) -> [f32; 4] {
    // SAFETY: register-only; the caller's target features include AVX-512 F.
    unsafe {
        // [row 0 lanes 0..8 | row 1 lanes 0..8] + [row 0 lanes 8..16 | row 1 lanes 8..16].
        let f01 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a[0], a[1]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a[0], a[1]),
        );
        let f23 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a[2], a[3]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a[2], a[3]),
        );
        // Quarter q: row q's f[0..4] + f[4..8].
        let g = add_row_halves(f01, f23);
        // Lane 4q: (g0 + g2) + (g1 + g3).
        let h = _mm512_add_ps(g, _mm512_permute_ps::<0b01_00_11_10>(g));
        quarter_firsts(_mm512_add_ps(h, _mm512_permute_ps::<0b10_11_00_01>(h)))
    }
}

/// `_mm512_reduce_add_ps` of each row's accumulator, in a loop here rather than a closure
/// (closures do not inherit the target features: an intrinsic in one can become a call).
#[inline(always)]
unsafe fn reduce_rows<const R: usize>(acc: &[__m512; R]) -> [f32; R] {
    let mut out = [0.0f32; R];
    for (o, &a) in out.iter_mut().zip(acc) {
        // SAFETY: register-only; the caller's target features include AVX-512 F.
        *o = unsafe { _mm512_reduce_add_ps(a) };
    }
    out
}

/// [`fold16`] of each of `N` rows' accumulators, four at a time ([`fold16_quad`]).
#[inline(always)]
unsafe fn fold16_rows<const N: usize>(acc: &[__m512; N]) -> [f32; N] {
    let mut out = [0.0f32; N];
    let mut q = 0;
    // SAFETY: register work on the caller's target features (AVX-512 F).
    unsafe {
        while q + 4 <= N {
            let quad: &[__m512; 4] = acc[q..q + 4].try_into().expect("four rows");
            out[q..q + 4].copy_from_slice(&fold16_quad(quad));
            q += 4;
        }
        while q < N {
            out[q] = fold16(acc[q]);
            q += 1;
        }
    }
    out
}

/// [`crate::act8::TailTile`] on AVX-512: `y[r, c] += Σ_p h[r · rank + p] · bt[c / 16 ·
/// panel + p · 16 + c % 16]` for `r < rows <= 6`, `c < cols <= 64`, each sum a fused
/// multiply-add chain from 0 with `p` in order, added to y last (the f32 GEMM's bits). Rows
/// past `rows` repeat the last row's h and are not stored; the last panel's lanes past `cols`
/// are masked.
///
/// # Safety
/// The CPU has AVX-512 F; `h` holds `rows` rows of `rank` values; `bt` holds the panels of
/// columns `0..cols` (`panel` floats apart, `rank · 16` each); y's `rows` rows (`ldy` apart)
/// hold `cols` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn low_rank_tile(tile: crate::act8::TailTile) {
    const P: usize = crate::act8::TAIL_PANELS;
    if tile.rows == 0 || tile.cols == 0 {
        return;
    }
    // SAFETY: the caller's contract, for the panels there are (one kernel per count, so the
    // loop over K carries no test of the panel count).
    unsafe {
        match tile.cols.div_ceil(16).min(P) {
            1 => low_rank_panels::<1>(tile),
            2 => low_rank_panels::<2>(tile),
            3 => low_rank_panels::<3>(tile),
            _ => low_rank_panels::<P>(tile),
        }
    }
}

/// [`low_rank_tile`] for `NP` panels (`16 · (NP − 1) < cols <= 16 · NP`): y's lines of the
/// tile are fetched into L1 while the sums run (its rows lie 4 KiB apart at 1024 columns,
/// where L1 keeps few of them), then added to.
///
/// # Safety
/// As [`low_rank_tile`], with `tile.cols.div_ceil(16) == NP`.
#[inline(always)]
unsafe fn low_rank_panels<const NP: usize>(tile: crate::act8::TailTile) {
    const R: usize = crate::act8::TAIL_ROWS;
    // SAFETY: the caller's contract: h's rows below `rows` (clamped), bt's panels below
    // `NP`, y's rows below `rows` and columns below `cols` (masked; prefetches never fault).
    unsafe {
        for r in 0..tile.rows {
            for u in 0..NP {
                _mm_prefetch::<_MM_HINT_T0>(tile.y.add(r * tile.ldy + 16 * u) as *const i8);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); NP]; R];
        let hr: [*const f32; R] =
            std::array::from_fn(|r| tile.h.add(r.min(tile.rows - 1) * tile.rank));
        for p in 0..tile.rank {
            let b: [__m512; NP] =
                std::array::from_fn(|u| _mm512_loadu_ps(tile.bt.add(u * tile.panel + p * 16)));
            for r in 0..R {
                let hv = _mm512_set1_ps(*hr[r].add(p));
                for u in 0..NP {
                    acc[r][u] = _mm512_fmadd_ps(hv, b[u], acc[r][u]);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate().take(tile.rows) {
            for (u, &a) in accr.iter().enumerate() {
                let mask = first_lanes(tile.cols - 16 * u);
                let d = tile.y.add(r * tile.ldy + 16 * u);
                let v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), a);
                _mm512_mask_storeu_ps(d, mask, v);
            }
        }
    }
}

/// `a · b` over `min(len)` elements: four zmm accumulators, the last partial run of 16 by a
/// masked load.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut k = 0;
    // SAFETY: every load below reads elements k.. < n of both slices (masked at the end).
    unsafe {
        while k + 64 <= n {
            for (u, accu) in acc.iter_mut().enumerate() {
                let (x, y) = (
                    _mm512_loadu_ps(pa.add(k + 16 * u)),
                    _mm512_loadu_ps(pb.add(k + 16 * u)),
                );
                *accu = _mm512_fmadd_ps(x, y, *accu);
            }
            k += 64;
        }
        while k < n {
            let m = first_lanes(n - k);
            let (x, y) = (
                _mm512_maskz_loadu_ps(m, pa.add(k)),
                _mm512_maskz_loadu_ps(m, pb.add(k)),
            );
            acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
            k += 16;
        }
        let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(v)
    }
}

/// Transposes 16 zmm rows: `out[c][r] = rows[r][c]`. (Plain loops, no closures: a closure
/// would not inherit the caller's target features.)
#[inline(always)]
unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
    // SAFETY: register-only shuffles (the caller's target features).
    unsafe {
        // 32-bit interleave of row pairs: per 128-bit lane [a0 b0 a1 b1], [a2 b2 a3 b3].
        let mut t = [_mm512_setzero_ps(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // 64-bit interleave: u[4i + c], lane L = rows 4i..4i+4 at column 4L + c.
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            for h in 0..2 {
                let a = _mm512_castps_pd(t[4 * i + h]);
                let b = _mm512_castps_pd(t[4 * i + 2 + h]);
                u[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                u[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            }
        }
        // 128-bit lanes: row 4L + c = [u[c].L, u[4 + c].L, u[8 + c].L, u[12 + c].L].
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
            let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
            let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
            out[8 + c] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
        }
        out
    }
}

/// Shapes: `src` is `NR` (16) rows of `stride` floats (row `j` = panel column `j`), `dst` is
/// `len x NR`: `dst[p * NR + j] = src[j * stride + p]` for `p < len` (16x16 transposes, the
/// last `len % 16` columns by scalar copies). Does nothing if the lengths do not hold.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn transpose_panel(src: &[f32], stride: usize, len: usize, dst: &mut [f32]) {
    use nibble_tensor::gemm::NR;
    const _: () = assert!(NR == 16);
    if src.len() < (NR - 1) * stride + len || dst.len() < len * NR || len > stride {
        return;
    }
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut p = 0;
    while p + 16 <= len {
        // SAFETY: rows 0..16 of src, columns p..p+16 <= len <= stride (checked above); dst
        // rows p..p+16 of NR floats inside len * NR.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for (q, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(s.add(q * stride + p));
            }
            for (q, v) in transpose16(&r).iter().enumerate() {
                _mm512_storeu_ps(d.add((p + q) * NR), *v);
            }
        }
        p += 16;
    }
    for p in p..len {
        for j in 0..NR {
            dst[p * NR + j] = src[j * stride + p];
        }
    }
}

/// One forward GEMM panel's run of 16 columns from 16 rows of codes: `codes[j]` holds row `j`'s
/// 16 values (any lanes past `rows` ignored); transposed, lane `j` of column `q` goes through
/// `value(column, q)` (the format's lookup and scale, per lane, so the per-row scales of the
/// run apply as one vector) and is stored, zeros past `rows`, at `dst + q · 16`. Shapes: the
/// caller's `ColBlock::fits_panel`.
#[inline(always)]
unsafe fn store_panel_run(
    codes: &[__m512; 16],
    rows: usize,
    dst: *mut f32,
    value: impl Fn(__m512) -> __m512,
) {
    // SAFETY: register shuffles, then 16 stores of 16 floats at dst + q · 16 (the caller's
    // 256 floats).
    unsafe {
        let keep = first_lanes(rows);
        for (q, c) in transpose16(codes).iter().enumerate() {
            _mm512_storeu_ps(dst.add(q * 16), _mm512_maskz_mov_ps(keep, value(*c)));
        }
    }
}

/// Q4's 512-bit kernels (see [`crate::q4`] for the format).
pub(crate) mod q4 {
    use super::*;

    /// One block's 16 weights: `table[code] · n − n` (the reference's order).
    #[inline(always)]
    unsafe fn block(p: *const u8, n: __m512, table: __m512, shifts: __m512i) -> __m512 {
        // SAFETY: (caller) 8 readable bytes at `p`.
        unsafe {
            let v = _mm512_permutexvar_ps(nibbles_in_order(p, shifts), table);
            _mm512_sub_ps(_mm512_mul_ps(v, n), n)
        }
    }

    /// Dequantizes the whole blocks of `out` (`min(out/16, packed/8, norm)` of them),
    /// bit-identical to [`crate::q4::dequantize_ref`]; the caller finishes a partial block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dequantize(packed: &[u8], norm: &[f16], out: &mut [f32]) {
        let nb = norm.len().min(packed.len() / 8).min(out.len() / Q4_BLOCK);
        let table = q4_lut();
        // SAFETY: blocks b < nb: 8 bytes of packed, 16 floats of out, a norm each.
        unsafe {
            let table = _mm512_loadu_ps(table.as_ptr());
            let shifts = load_i32x16(&SHIFTS_LOW_FIRST);
            let (p, o) = (packed.as_ptr(), out.as_mut_ptr());
            for g in (0..nb).step_by(16) {
                let cnt = (nb - g).min(16);
                let nf = lanes(halves16(norm.as_ptr().add(g), cnt));
                for t in 0..cnt {
                    let b = g + t;
                    let v = block(p.add(b * 8), _mm512_set1_ps(nf[t]), table, shifts);
                    _mm512_storeu_ps(o.add(b * Q4_BLOCK), v);
                }
            }
        }
    }

    /// Shapes: W rows `r0..r0+rows`, columns `c0..c0+len` (`c0`, `len` multiples of 16, all
    /// inside W, checked by the caller: `ColBlock::fits`) into
    /// `dst[p * stride..p * stride + len]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dequant_cols(m: &Q4Matrix, b: ColBlock, dst: &mut [f32]) {
        let table = q4_lut();
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s().as_ptr();
        let d = dst.as_mut_ptr();
        let (row_bytes, row_blocks) = (m.row_bytes(), m.row_blocks());
        let nk = b.len / Q4_BLOCK;
        // SAFETY: whole blocks c0/16 + k < c0/16 + nk of rows r0 + p < out lie inside W (the
        // caller's `fits`), and dst[p * stride + 16k..+16] inside dst.
        unsafe {
            let table = _mm512_loadu_ps(table.as_ptr());
            let shifts = load_i32x16(&SHIFTS_LOW_FIRST);
            for p in 0..b.rows {
                let s = (b.r0 + p) * row_blocks + b.c0 / Q4_BLOCK;
                let sb = (b.r0 + p) * row_bytes + b.c0 / 2;
                for g in (0..nk).step_by(16) {
                    let cnt = (nk - g).min(16);
                    let nf = lanes(halves16(norms.add(s + g), cnt));
                    for t in 0..cnt {
                        let k = g + t;
                        let v = block(packed.add(sb + k * 8), _mm512_set1_ps(nf[t]), table, shifts);
                        _mm512_storeu_ps(d.add(p * b.stride + k * 16), v);
                    }
                }
            }
        }
    }

    /// One forward GEMM panel (`FwdPack`): `dst[p · 16 + j] = W[r0 + j, c0 + p]` for
    /// `p < len`, `j < rows`, and 0 for `rows <= j < 16`. Shapes: `rows <= 16`, `c0` and
    /// `len` multiples of 16, all inside W, `dst.len() >= len · 16` (checked by the caller:
    /// `ColBlock::fits_panel`). Per block of 16 columns, the 16 rows' codes are transposed as
    /// i32 lanes, so a zmm holds one column's codes of the 16 rows and the block's 16 norms
    /// apply as one vector: the reference's `table[code] · n − n` per lane, bit for bit, with
    /// no f32 tile written and read back.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn pack_fwd_panel(m: &Q4Matrix, b: ColBlock, dst: &mut [f32]) {
        let table = q4_lut();
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s().as_ptr();
        let d = dst.as_mut_ptr();
        let (row_bytes, row_blocks) = (m.row_bytes(), m.row_blocks());
        let nk = b.len / Q4_BLOCK;
        // SAFETY: rows r0 + j < out (j < rows <= 16) and whole blocks c0/16 + k < c0/16 + nk
        // lie inside W (the caller's `fits_panel`); dst[(16k + q) · 16..+16] lies inside
        // len · 16 floats. Rows past `rows` are not read.
        unsafe {
            let table = _mm512_loadu_ps(table.as_ptr());
            let shifts = load_i32x16(&SHIFTS_LOW_FIRST);
            for g in (0..nk).step_by(16) {
                let cnt = (nk - g).min(16);
                // Norm rows: lane t of `nrm_rows[j]` = norm of row j's block g + t; after the
                // transpose, `nrm[t]` holds block g + t's norms of the 16 rows.
                let mut nrm_rows = [_mm512_setzero_ps(); 16];
                for (j, v) in nrm_rows.iter_mut().enumerate().take(b.rows) {
                    let s = (b.r0 + j) * row_blocks + b.c0 / Q4_BLOCK + g;
                    *v = halves16(norms.add(s), cnt);
                }
                let nrm = transpose16(&nrm_rows);
                for (t, &n) in nrm.iter().enumerate().take(cnt) {
                    let k = g + t;
                    let mut codes = [_mm512_setzero_ps(); 16];
                    for (j, c) in codes.iter_mut().enumerate().take(b.rows) {
                        let sb = (b.r0 + j) * row_bytes + b.c0 / 2 + k * 8;
                        *c = _mm512_castsi512_ps(nibbles_in_order(packed.add(sb), shifts));
                    }
                    store_panel_run(&codes, b.rows, d.add(k * 256), |c| {
                        let v = _mm512_permutexvar_ps(_mm512_castps_si512(c), table);
                        _mm512_sub_ps(_mm512_mul_ps(v, n), n)
                    });
                }
            }
        }
    }

    /// Fused GEMV: `y[j] (+)= W[rows.start + j, :] · x`, 4 rows at a time sharing the loads
    /// of `x`. Shapes: `in % 16 == 0`; `prep` is [`Q4Matrix`]'s `[in]` even/odd-permuted x
    /// followed by the `[in/16]` block sums of x (as on the AVX2 path); `y.len() >=
    /// rows.len()`; anything else writes nothing. Per row:
    /// `(2/15) · Σ_b n_b · Σ_k code_k x_k − Σ_b n_b · S_b`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn gemv(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        let nb = m.inn / Q4_BLOCK;
        if m.inn % Q4_BLOCK != 0
            || prep.len() != m.inn + nb
            || rows.end > m.out
            || y.len() < rows.len()
        {
            return;
        }
        // SAFETY: rows < out and prep checked above.
        unsafe {
            for_row_quads!(
                rows,
                |r| dot_rows::<4>(m, r, prep),
                dot_rows::<1>(m, r, prep)[0],
                crate::kernels::store_row(y, acc)
            );
        }
    }

    /// `out[v · stride + j] = W[rows.start + j, :] · x_v` for the `preps.len()` (2 to 8)
    /// vectors, each prepared as [`gemv`] takes it: a small batch with each block's codes
    /// decoded once for every vector, each (row, vector) through [`gemv`]'s steps, so its
    /// bits. `false`, with nothing written, for another count or shapes [`gemv`] declines.
    ///
    /// # Safety
    /// The CPU has the AVX-512 tier; `stride >= rows.len()` and
    /// `out.len() >= (preps.len() - 1) · stride + rows.len()`.
    pub(crate) unsafe fn gemv_batch(
        m: &Q4Matrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        let nb = m.inn / Q4_BLOCK;
        if m.inn % Q4_BLOCK != 0 || rows.end > m.out || preps.iter().any(|p| p.len() != m.inn + nb)
        {
            return false;
        }
        with_batch_count!(preps, V, preps_v =>
            // SAFETY: the caller's contract and the shapes just checked, for the V vectors.
            unsafe { rows_batch::<V>(m, preps_v, rows, out, stride) }
        )
    }

    /// [`gemv_batch`] for `V` vectors, one row at a time (`V` accumulators of products and
    /// `V` of corrections).
    ///
    /// # Safety
    /// As [`gemv_batch`], with its shapes checked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn rows_batch<const V: usize>(
        m: &Q4Matrix,
        preps: [&[f32]; V],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let nb = m.inn / Q4_BLOCK;
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s().as_ptr();
        let pf = quant_prefetch();
        // SAFETY: (whole body) blocks (r, b + t), b + t < nb, of each row r of `rows` lie in
        // W; each prep holds `in` floats of x then `nb` block sums; prefetches never fault.
        unsafe {
            let values = _mm512_loadu_ps(CODE_VALUES.as_ptr());
            let shifts = load_i32x16(&SHIFTS_LOW_THEN_HIGH);
            for (j, r) in rows.enumerate() {
                let mut acc = [_mm512_setzero_ps(); V];
                let mut corr = [_mm512_setzero_ps(); V];
                let mut b = 0;
                while b < nb {
                    let cnt = (nb - b).min(16);
                    let ahead = (r + PREFETCH_ROWS) * nb + b;
                    prefetch_weights(pf, packed.wrapping_add(ahead * 8));
                    prefetch_weights(pf, packed.wrapping_add(ahead * 8 + 64));
                    prefetch_weights(pf, norms.wrapping_add(ahead) as *const u8);
                    let nv = halves16(norms.add(r * nb + b), cnt);
                    let nf = lanes(nv);
                    for (c, p) in corr.iter_mut().zip(&preps) {
                        let sv = _mm512_maskz_loadu_ps(first_lanes(cnt), p.as_ptr().add(m.inn + b));
                        *c = _mm512_fmadd_ps(nv, sv, *c);
                    }
                    for (t, &n) in nf.iter().enumerate().take(cnt) {
                        let q = packed.add((r * nb + b + t) * 8);
                        let c = _mm512_permutexvar_ps(nibbles_split(q, shifts), values);
                        let nt = _mm512_set1_ps(n);
                        for (a, p) in acc.iter_mut().zip(&preps) {
                            let xv = _mm512_loadu_ps(p.as_ptr().add((b + t) * 16));
                            *a = _mm512_fmadd_ps(_mm512_mul_ps(c, xv), nt, *a);
                        }
                    }
                    b += cnt;
                }
                let (sums, corrs) = (reduce_rows(&acc), reduce_rows(&corr));
                for (v, (s, c)) in sums.iter().zip(&corrs).enumerate() {
                    out[v * stride + j] = s * (2.0 / 15.0) - c;
                }
            }
        }
    }

    /// Dot products of rows `r0..r0+R` (all `< out`) with x (`prep` as [`gemv`] checks it).
    #[inline(always)]
    unsafe fn dot_rows<const R: usize>(m: &Q4Matrix, r0: usize, prep: &[f32]) -> [f32; R] {
        let nb = m.inn / Q4_BLOCK;
        let (xp, sums) = (prep.as_ptr(), prep.as_ptr().wrapping_add(m.inn));
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s().as_ptr();
        let pf = quant_prefetch();
        // SAFETY: blocks (r0 + r, b + t) with b + t < nb lie in W; x and sums in prep.
        unsafe {
            let values = _mm512_loadu_ps(CODE_VALUES.as_ptr());
            let shifts = load_i32x16(&SHIFTS_LOW_THEN_HIGH);
            let mut acc = [_mm512_setzero_ps(); R];
            let mut corr = [_mm512_setzero_ps(); R];
            let mut nf = [[0.0f32; 16]; R];
            let mut b = 0;
            while b < nb {
                let cnt = (nb - b).min(16);
                for r in 0..R {
                    // Prefetch the same blocks a 4-row sweep on (never faults), as
                    // `crate::cpu::quant_prefetch` says.
                    let ahead = (r0 + r + PREFETCH_ROWS) * nb + b;
                    prefetch_weights(pf, packed.wrapping_add(ahead * 8));
                    prefetch_weights(pf, packed.wrapping_add(ahead * 8 + 64));
                    prefetch_weights(pf, norms.wrapping_add(ahead) as *const u8);
                }
                let sv = _mm512_maskz_loadu_ps(first_lanes(cnt), sums.add(b));
                for r in 0..R {
                    let nv = halves16(norms.add((r0 + r) * nb + b), cnt);
                    nf[r] = lanes(nv);
                    corr[r] = _mm512_fmadd_ps(nv, sv, corr[r]);
                }
                for t in 0..cnt {
                    let xv = _mm512_loadu_ps(xp.add((b + t) * 16));
                    for r in 0..R {
                        let q = packed.add(((r0 + r) * nb + b + t) * 8);
                        let c = _mm512_permutexvar_ps(nibbles_split(q, shifts), values);
                        acc[r] =
                            _mm512_fmadd_ps(_mm512_mul_ps(c, xv), _mm512_set1_ps(nf[r][t]), acc[r]);
                    }
                }
                b += cnt;
            }
            let (sums, corrs) = (reduce_rows(&acc), reduce_rows(&corr));
            std::array::from_fn(|r| sums[r] * (2.0 / 15.0) - corrs[r])
        }
    }
}

/// NF4's 512-bit kernels, plain and double-quantized absmax alike (see [`crate::nf4`]; the
/// absmax of each block comes from [`Nf4Matrix::fill_absmax`] / `block_absmax`).
pub(crate) mod nf4 {
    use super::*;

    /// Dequantizes `out.len() / 16` runs of 16 (from a multiple of 16, codes in `packed`),
    /// `scale(g)` the absmax of run `g`, bit-identical to [`crate::nf4::dequantize_ref`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dequantize(packed: &[u8], scale: impl Fn(usize) -> f32, out: &mut [f32]) {
        let runs = (out.len() / 16).min(packed.len() / 8);
        // SAFETY: run g < runs: 8 bytes of packed, 16 floats of out.
        unsafe {
            let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
            let shifts = load_i32x16(&SHIFTS_HIGH_FIRST);
            for g in 0..runs {
                let v = _mm512_permutexvar_ps(
                    nibbles_in_order(packed.as_ptr().add(g * 8), shifts),
                    levels,
                );
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(g * 16),
                    _mm512_mul_ps(v, _mm512_set1_ps(scale(g))),
                );
            }
        }
    }

    /// Shapes: W rows `r0..r0+rows`, columns `c0..c0+len` (`c0`, `len` multiples of 16, `in`
    /// a multiple of 16, all inside W: checked by the caller) into
    /// `dst[p * stride..p * stride + len]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dequant_cols(m: &Nf4Matrix, b: ColBlock, dst: &mut [f32]) {
        let packed = m.packed.as_slice().as_ptr();
        let d = dst.as_mut_ptr();
        // SAFETY: runs e..e+16 lie in row r0 + p of W (the caller's checks), and
        // dst[p * stride + 16k..+16] inside dst.
        unsafe {
            let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
            let shifts = load_i32x16(&SHIFTS_HIGH_FIRST);
            for p in 0..b.rows {
                let s = (b.r0 + p) * m.inn + b.c0;
                let mut cur = usize::MAX;
                let mut sv = _mm512_setzero_ps();
                for k in 0..b.len / 16 {
                    let e = s + k * 16;
                    if e / NF4_BLOCK != cur {
                        cur = e / NF4_BLOCK;
                        sv = _mm512_set1_ps(m.block_absmax(cur));
                    }
                    let v =
                        _mm512_permutexvar_ps(nibbles_in_order(packed.add(e / 2), shifts), levels);
                    _mm512_storeu_ps(d.add(p * b.stride + k * 16), _mm512_mul_ps(v, sv));
                }
            }
        }
    }

    /// One forward GEMM panel (`FwdPack`), as [`super::q4::pack_fwd_panel`] writes Q4's:
    /// `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `in % 16 == 0` (each
    /// run of 16 then lies in one block), `rows <= 16`, `c0` and `len` multiples of 16, all
    /// inside W, `dst.len() >= len · 16` (checked by the caller). Each run's 16 absmaxes (one
    /// per row) are one vector: `level[code] · absmax` per lane, the reference's bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn pack_fwd_panel(m: &Nf4Matrix, b: ColBlock, dst: &mut [f32]) {
        let packed = m.packed.as_slice().as_ptr();
        let d = dst.as_mut_ptr();
        // SAFETY: runs e..e+16 (e = (r0 + j) · in + c0 + 16k) lie in rows r0 + j < out of W
        // (the caller's checks), and dst[(16k + q) · 16..+16] inside len · 16 floats. Rows
        // past `rows` are not read.
        unsafe {
            let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
            let shifts = load_i32x16(&SHIFTS_HIGH_FIRST);
            let mut absmax = crate::nf4::PanelAbsmax::new();
            for k in 0..b.len / 16 {
                let first = |j: usize| (b.r0 + j) * m.inn + b.c0 + k * 16;
                absmax.at(m, b.rows, first);
                let mut codes = [_mm512_setzero_ps(); 16];
                for (j, c) in codes.iter_mut().enumerate().take(b.rows) {
                    let v = nibbles_in_order(packed.add(first(j) / 2), shifts);
                    *c = _mm512_castsi512_ps(v);
                }
                let sv = _mm512_loadu_ps(absmax.scale.as_ptr());
                store_panel_run(&codes, b.rows, d.add(k * 256), |c| {
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_castps_si512(c), levels), sv)
                });
            }
        }
    }

    /// Fused GEMV: `y[j] (+)= W[rows.start + j, :] · x`, 4 rows at a time sharing the loads
    /// of `x`. Shapes: `in % 64 == 0`; `xp` is the `[in]` x with each run of 16 reordered as
    /// its 8 even then 8 odd elements (as on the AVX2 path); `y.len() >= rows.len()`;
    /// anything else writes nothing. Per row: `Σ_b absmax_b · Σ_k level[code_k] x_k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn gemv(
        m: &Nf4Matrix,
        xp: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        if m.inn % NF4_BLOCK != 0 || xp.len() != m.inn || rows.end > m.out || y.len() < rows.len() {
            return;
        }
        // SAFETY: rows < out and xp checked above.
        unsafe {
            for_row_quads!(
                rows,
                |r| dot_rows::<4>(m, r, xp),
                dot_rows::<1>(m, r, xp)[0],
                crate::kernels::store_row(y, acc)
            );
        }
    }

    /// `out[v · stride + j] = W[rows.start + j, :] · x_v` for the `xps.len()` (2 to 8)
    /// vectors, each prepared as [`gemv`] takes it: a small batch with each run of 16 codes
    /// decoded once for every vector, each (row, vector) through [`gemv`]'s steps (per block
    /// of 64 four fused multiply-adds from 0, then one by the block's absmax), so its bits.
    /// `false`, with nothing written, for another count or shapes [`gemv`] declines.
    ///
    /// # Safety
    /// The CPU has the AVX-512 tier; `rows ⊆ 0..out`, `stride >= rows.len()` and
    /// `out.len() >= (xps.len() - 1) · stride + rows.len()`.
    pub(crate) unsafe fn gemv_batch(
        m: &Nf4Matrix,
        xps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        if m.inn % NF4_BLOCK != 0 || rows.end > m.out || xps.iter().any(|x| x.len() != m.inn) {
            return false;
        }
        with_batch_count!(xps, V, xps_v =>
            // SAFETY: the caller's contract and the shapes just checked, for the V vectors.
            unsafe { rows_batch::<V>(m, xps_v, rows, out, stride) }
        )
    }

    /// [`gemv_batch`] for `V` vectors, one row at a time: the rows' block absmaxes once per
    /// call ([`Nf4Matrix::fill_absmax`], elementwise: the values [`dot_rows`] reads).
    ///
    /// # Safety
    /// As [`gemv_batch`], with its shapes checked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn rows_batch<const V: usize>(
        m: &Nf4Matrix,
        xps: [&[f32]; V],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let nb = m.inn / NF4_BLOCK;
        let packed = m.packed.as_slice().as_ptr();
        let pf = quant_prefetch();
        let mut absmax = crate::kernels::take_row_scales(rows.len() * nb);
        m.fill_absmax(rows.start * nb, &mut absmax);
        // SAFETY: (whole body) each row r of `rows` holds nb blocks of 32 bytes at
        // r · nb · 32; each x holds `in` floats; prefetches never fault.
        unsafe {
            let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
            let shifts = load_i32x16(&SHIFTS_HIGH_THEN_LOW);
            for (j, r) in rows.enumerate() {
                let am = &absmax[j * nb..(j + 1) * nb];
                let mut acc = [_mm512_setzero_ps(); V];
                for (b, &a) in am.iter().enumerate() {
                    prefetch_weights(pf, packed.wrapping_add(((r + PREFETCH_ROWS) * nb + b) * 32));
                    let mut part = [_mm512_setzero_ps(); V];
                    for g in 0..4 {
                        let q = packed.add((r * nb + b) * 32 + g * 8);
                        let v = _mm512_permutexvar_ps(nibbles_split(q, shifts), levels);
                        for (p, x) in part.iter_mut().zip(&xps) {
                            let xv = _mm512_loadu_ps(x.as_ptr().add(b * NF4_BLOCK + g * 16));
                            *p = _mm512_fmadd_ps(v, xv, *p);
                        }
                    }
                    let av = _mm512_set1_ps(a);
                    for (c, p) in acc.iter_mut().zip(part) {
                        *c = _mm512_fmadd_ps(p, av, *c);
                    }
                }
                for (v, &f) in super::reduce_rows(&acc).iter().enumerate() {
                    out[v * stride + j] = f;
                }
            }
        }
        crate::kernels::put_row_scales(absmax);
    }

    /// Dot products of rows `r0..r0+R` (all `< out`) with x.
    #[inline(always)]
    unsafe fn dot_rows<const R: usize>(m: &Nf4Matrix, r0: usize, xp: &[f32]) -> [f32; R] {
        const CH: usize = 32;
        let nb = m.inn / NF4_BLOCK;
        let packed = m.packed.as_slice().as_ptr();
        let x = xp.as_ptr();
        let pf = quant_prefetch();
        let mut am = [[0.0f32; CH]; R];
        // SAFETY: blocks (r0 + r, b + t), b + t < nb, lie in W; x runs inside xp (len in).
        unsafe {
            let levels = _mm512_loadu_ps(NF4_LEVELS.as_ptr());
            let shifts = load_i32x16(&SHIFTS_HIGH_THEN_LOW);
            let mut acc = [_mm512_setzero_ps(); R];
            let mut b = 0;
            while b < nb {
                let cnt = (nb - b).min(CH);
                for r in 0..R {
                    m.fill_absmax((r0 + r) * nb + b, &mut am[r][..cnt]);
                }
                for t in 0..cnt {
                    for r in 0..R {
                        let ahead = ((r0 + r + PREFETCH_ROWS) * nb + b + t) * 32;
                        prefetch_weights(pf, packed.wrapping_add(ahead));
                    }
                    let mut part = [_mm512_setzero_ps(); R];
                    for g in 0..4 {
                        let xv = _mm512_loadu_ps(x.add((b + t) * NF4_BLOCK + g * 16));
                        for r in 0..R {
                            let q = packed.add(((r0 + r) * nb + b + t) * 32 + g * 8);
                            let v = _mm512_permutexvar_ps(nibbles_split(q, shifts), levels);
                            part[r] = _mm512_fmadd_ps(v, xv, part[r]);
                        }
                    }
                    for r in 0..R {
                        acc[r] = _mm512_fmadd_ps(part[r], _mm512_set1_ps(am[r][t]), acc[r]);
                    }
                }
                b += cnt;
            }
            super::reduce_rows(&acc)
        }
    }
}

/// Int8's 512-bit kernels (see [`crate::int8`]).
pub(crate) mod int8 {
    use super::*;

    /// `out[k] = zero + scale · codes[k]` over `min(len)` elements (bit-identical to
    /// [`crate::int8::dequantize_ref`]; the last `len % 16` by the scalar code).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dequantize(codes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
        let n = codes.len().min(out.len());
        let mut k = 0;
        // SAFETY: k + 16 <= n: 16 bytes of codes, 16 floats of out.
        unsafe {
            let (s, z) = (_mm512_set1_ps(scale), _mm512_set1_ps(zero));
            while k + 16 <= n {
                let c =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(k) as *const __m128i));
                let v = _mm512_add_ps(z, _mm512_mul_ps(s, _mm512_cvtepi32_ps(c)));
                _mm512_storeu_ps(out.as_mut_ptr().add(k), v);
                k += 16;
            }
        }
        int8_dequantize_ref(&codes[k..n], scale, zero, &mut out[k..n]);
    }

    /// One forward GEMM panel (`FwdPack`), as [`super::q4::pack_fwd_panel`] writes Q4's:
    /// `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `rows <= 16`, `len`
    /// a multiple of 16 (any `c0`), all inside W, `dst.len() >= len · 16` (checked by the
    /// caller). The rows' scales and zeros are one vector each for the whole panel:
    /// `zero + scale · code` per lane, the reference's bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn pack_fwd_panel(m: &Int8Matrix, b: ColBlock, dst: &mut [f32]) {
        let i = m.inn;
        let codes_p = m.codes.as_slice().as_ptr();
        let (sc, zr) = (m.scales.f32s(), m.zeros.f32s());
        let d = dst.as_mut_ptr();
        let keep = first_lanes(b.rows);
        // SAFETY: rows r0 + j < out (j < rows <= 16) and columns c0 + 16k..+16 < in lie inside
        // W (the caller's checks), so do their scales and zeros (masked loads, rows past
        // `rows` not read); dst[(16k + q) · 16..+16] lies inside len · 16 floats.
        unsafe {
            let s = _mm512_maskz_loadu_ps(keep, sc.as_ptr().add(b.r0));
            let z = _mm512_maskz_loadu_ps(keep, zr.as_ptr().add(b.r0));
            for k in 0..b.len / 16 {
                let mut codes = [_mm512_setzero_ps(); 16];
                for (j, c) in codes.iter_mut().enumerate().take(b.rows) {
                    let p = codes_p.add((b.r0 + j) * i + b.c0 + k * 16);
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                    *c = _mm512_castsi512_ps(v);
                }
                store_panel_run(&codes, b.rows, d.add(k * 256), |c| {
                    _mm512_add_ps(
                        z,
                        _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_castps_si512(c))),
                    )
                });
            }
        }
    }

    /// Fused GEMV, 4 rows at a time sharing the loads of x. Shapes: `x` `[in]`,
    /// `y.len() >= rows.len()`, `rows.end <= out` (else nothing is written). Per row:
    /// `Σ_k (zero + scale · code_k) · x_k`, each weight dequantized in registers as the
    /// reference dequantizes it (a multiply, then an add), so the sum rounds as an f32
    /// product with the dequantized row does, with no `zero · Σx` to cancel against.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
        // SAFETY: rows < out and x checked above.
        unsafe {
            crate::kernels::for_row_octets!(
                rows,
                |r| dot_rows::<8>(m, r, x),
                dot_rows::<4>(m, r, x),
                dot_rows::<1>(m, r, x)[0],
                crate::kernels::store_row(y, acc)
            );
        }
    }

    /// `Σ_k (zero + scale · code_k) · x_k` for rows `r0..r0+R` (`< out`): runs of 16, the
    /// last one masked (its masked-off weights and x lanes are 0).
    #[inline(always)]
    unsafe fn dot_rows<const R: usize>(m: &Int8Matrix, r0: usize, x: &[f32]) -> [f32; R] {
        let i = m.inn;
        let codes = m.codes.as_slice().as_ptr();
        let (sc, zr) = (m.scales.f32s(), m.zeros.f32s());
        let s: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(sc[r0 + r]));
        let z: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(zr[r0 + r]));
        let mut acc = [_mm512_setzero_ps(); R];
        let mut k = 0;
        // SAFETY: lanes k.. < in of x and of each row r0 + r < out (masked at the end).
        unsafe {
            while k < i {
                let mk = first_lanes(i - k);
                let xv = _mm512_maskz_loadu_ps(mk, x.as_ptr().add(k));
                for r in 0..R {
                    let p = codes.add((r0 + r) * i + k);
                    let c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                        mk,
                        p as *const i8,
                    )));
                    let w = _mm512_maskz_add_ps(mk, z[r], _mm512_mul_ps(s[r], c));
                    acc[r] = _mm512_fmadd_ps(w, xv, acc[r]);
                }
                k += 16;
            }
            super::reduce_rows(&acc)
        }
    }
}

/// Lower's 512-bit kernels (see [`crate::lower`]): 16 codes of a 3- or 4-bit row per zmm by
/// the byte gather of the AVX2 tier's `Gather16`, whose two 256-bit halves of constants are
/// one 512-bit register here (`vpshufb` works within 128-bit lanes, and every lane holds the
/// same 16-byte window). Dequantization only: a 512-bit GEMV written the same way measured
/// slower than the AVX2 one (16-core Xeon, 1024², batch 1: 285 against 196 µs on 1 thread,
/// 37.7 against 25.5 µs on 16), so the AVX-512 tier runs the AVX2 GEMV.
pub(crate) mod lower {
    use super::*;
    use crate::lower::{
        dequantize_row_ref, GatherTables, LowerMatrix, GATHER3, GATHER4, LOWER_GROUP,
    };

    /// The constants that turn a 16-byte window into 16 codes `code · 2^s`.
    struct Gather {
        ctrl: __m512i,
        mask: __m512i,
        /// `2^−s` per lane.
        unshift: __m512,
    }

    impl Gather {
        #[inline(always)]
        unsafe fn new(bits: u8) -> Self {
            let t: &GatherTables = if bits == 4 { &GATHER4 } else { &GATHER3 };
            // SAFETY: each table is two 32-byte arrays, 64 contiguous bytes.
            unsafe {
                Gather {
                    ctrl: _mm512_loadu_epi8(t.ctrl.as_ptr() as *const i8),
                    mask: _mm512_loadu_epi32(t.mask.as_ptr() as *const i32),
                    unshift: _mm512_castsi512_ps(_mm512_loadu_epi32(
                        t.unshift.as_ptr() as *const i32
                    )),
                }
            }
        }

        /// `code · 2^s` for the 16 codes whose first byte is `codes[p]`; bytes past the end
        /// of `codes` read as zero.
        #[inline(always)]
        unsafe fn codes(&self, codes: &[u8], p: usize) -> __m512 {
            let avail = codes.len().saturating_sub(p).min(16);
            // SAFETY: the masked load reads only the `avail` bytes at p inside `codes`.
            unsafe {
                let win = _mm_maskz_loadu_epi8(
                    first_lanes(avail),
                    codes.as_ptr().wrapping_add(p) as *const i8,
                );
                let win = _mm512_broadcast_i32x4(win);
                let c = _mm512_and_si512(_mm512_shuffle_epi8(win, self.ctrl), self.mask);
                _mm512_cvtepi32_ps(c)
            }
        }
    }

    /// Shapes: columns `c0..c0+out.len()` of one row; `c0` and `out.len()` multiples of 8 and
    /// covered by `codes`, `scales`, `mins` (checked by the caller). Bit-identical to
    /// [`dequantize_row_ref`] (`(scale · 2^−s) · (code · 2^s)` is `scale · code` exactly);
    /// a run of 8 at a group's edge by that scalar code.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dequantize_row(
        bits: u8,
        codes: &[u8],
        scales: &[f16],
        mins: &[f16],
        c0: usize,
        out: &mut [f32],
    ) {
        // SAFETY: this function's target features.
        let gather = unsafe { Gather::new(bits) };
        let mut t = 0;
        while t < out.len() {
            let g = (c0 + t) / LOWER_GROUP;
            let gend = ((g + 1) * LOWER_GROUP - c0).min(out.len());
            // SAFETY: t + 16 <= gend <= out.len() for each store.
            unsafe {
                let s = _mm512_set1_ps(scales[g].to_f32());
                let m = _mm512_set1_ps(mins[g].to_f32());
                let su = _mm512_mul_ps(s, gather.unshift);
                while t + 16 <= gend {
                    let c = gather.codes(codes, (c0 + t) * usize::from(bits) / 8);
                    _mm512_storeu_ps(
                        out.as_mut_ptr().add(t),
                        _mm512_add_ps(m, _mm512_mul_ps(su, c)),
                    );
                    t += 16;
                }
            }
            if t < gend {
                dequantize_row_ref(bits, codes, scales, mins, c0 + t, &mut out[t..gend]);
                t = gend;
            }
        }
    }

    /// One forward GEMM panel (`FwdPack`), as [`super::q4::pack_fwd_panel`] writes Q4's:
    /// `dst[p · 16 + j] = W[r0 + j, c0 + p]`, zeros past `rows`. Shapes: `rows <= 16`, `c0`
    /// and `len` multiples of 16 (a run never crosses a group), all inside W,
    /// `dst.len() >= len · 16` (checked by the caller). Each row's run is gathered at its own
    /// width and turned back into codes (`· 2^−s`, exact); transposed, the rows' group scales
    /// and mins apply as one vector each: `min + scale · code` per lane, the reference's bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn pack_fwd_panel(m: &LowerMatrix, b: ColBlock, dst: &mut [f32]) {
        let (all, bits) = (m.codes.as_slice(), m.bits.as_slice());
        let d = dst.as_mut_ptr();
        // SAFETY: this function's target features.
        let gather = unsafe { [Gather::new(3), Gather::new(4)] };
        let mut params = crate::lower::PanelGroup::new();
        for k in 0..b.len / 16 {
            let col = b.c0 + 16 * k;
            params.at(m, b.r0, b.rows, col);
            // SAFETY: the gathers read inside `all` (masked at its end); rows r0 + j < out
            // (the caller's checks); 256 floats of dst at 256k (len · 16 floats).
            unsafe {
                let sv = _mm512_loadu_ps(params.scale.as_ptr());
                let zv = _mm512_loadu_ps(params.min.as_ptr());
                let mut codes = [_mm512_setzero_ps(); 16];
                for (j, c) in codes.iter_mut().enumerate().take(b.rows) {
                    let r = b.r0 + j;
                    let w = usize::from(bits[r]);
                    let u = &gather[usize::from(w == 4)];
                    let p = m.offsets[r] as usize + col * w / 8;
                    *c = _mm512_mul_ps(u.codes(all, p), u.unshift);
                }
                store_panel_run(&codes, b.rows, d.add(k * 256), |c| {
                    _mm512_add_ps(zv, _mm512_mul_ps(sv, c))
                });
            }
        }
    }
}

/// Q4's fused int8-activation GEMV ([`crate::q4::act8`]) on AVX-512 VNNI, the twin of
/// [`super::avx2::q4_int8`]: per row and group of 128 weights one 64-byte load of codes and
/// two `vpdpbusd` (low nibbles by the even elements, high by the odd ones), where the AVX2
/// code takes two loads, four `vpmaddubsw`, two `vpaddw`, a `vphaddw` and a
/// `vpmaddwd`. The exact block sums are put in block order and two rows share each f32 step:
/// per block the AVX2 kernel's operations, and a row's chains summed in the pairs its
/// horizontal sum adds (`fold_block_chains`): the same bits.
pub(crate) mod q4_int8 {
    use super::{Gf2Affine, HighNibbles, ShiftMask};
    use crate::act8::avx2::Maddubs;
    use crate::cpu::{
        quant_prefetch, HintNta, HintOff, HintT0, PrefetchHint, QuantPrefetch, PREFETCH_ROWS,
    };
    use crate::q4::act8::{tail_ref, RowOperands, BLOCKS_PER_GROUP, CS_SLOT, GROUP};
    use crate::q4::tiles::{split_at_tiles, Q4Tiles, TILE_BLOCK_BYTES, TILE_ROWS};
    use crate::q4::Q4Matrix;
    use std::arch::x86_64::*;

    /// `vpermt2d` indices that gather, from the `vpdpbusd` lanes of rows A and B (lanes
    /// `2t, 2t + 1` hold block t's two halves; B's lanes are 16..32), the first (`odd = 0`)
    /// or second half of each block, A's blocks in order then B's.
    const fn halves(odd: i32) -> [i32; 16] {
        let mut idx = [0i32; 16];
        let mut t = 0;
        while t < BLOCKS_PER_GROUP {
            idx[t] = 2 * t as i32 + odd;
            idx[8 + t] = 16 + 2 * t as i32 + odd;
            t += 1;
        }
        idx
    }
    const FIRST_HALVES: [i32; 16] = halves(0);
    const SECOND_HALVES: [i32; 16] = halves(1);
    /// `vpermps` indices that put a group's 8 corrections (`cs`, in `CS_SLOT` order) in
    /// block order, twice (one copy per row of a pair).
    const CS_IN_BLOCK_ORDER: [i32; 16] = {
        let mut idx = [0i32; 16];
        let mut t = 0;
        while t < BLOCKS_PER_GROUP {
            idx[t] = CS_SLOT[t] as i32;
            idx[8 + t] = CS_SLOT[t] as i32;
            t += 1;
        }
        idx
    };

    /// The 512-bit twin of [`crate::arch::avx2::q4_int8::prepare_group`]: one whole group of
    /// 128 elements of x into its 128 bytes of `xq` (its 64 even elements, then its 64 odd
    /// ones) and 8 block corrections `cs` (in `CS_SLOT` order); returns the group's `xs`. Each
    /// block of 16 is one register: the same maximum, the same rounding (`vcvtps2dq`, to
    /// nearest even), block sums of at most 16 · 127 that are exact in f32 whatever the order
    /// of the additions, so the same bytes and bits as the AVX2 code and the scalar
    /// `prepare_group_ref` (`simd_prepare_matches_scalar`). About a third of the AVX2 code's
    /// time per group (2-core Xeon, 2026-12-05: 1024 elements 0.36 → 0.13 µs).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL; `grp` holds 128 finite values, `xq` 128 bytes, `cs` 8.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn prepare_group(grp: &[f32], xq: &mut [u8], cs: &mut [f32]) -> f32 {
        debug_assert!(grp.len() == GROUP && xq.len() >= GROUP && cs.len() >= BLOCKS_PER_GROUP);
        // SAFETY: (whole body) the caller's contract: 128 readable floats, 128 writable bytes
        // (the stores below cover 0..128), 8 slots of cs.
        unsafe {
            let p = grp.as_ptr();
            let mut v = [_mm512_setzero_ps(); BLOCKS_PER_GROUP];
            for (t, vt) in v.iter_mut().enumerate() {
                *vt = _mm512_loadu_ps(p.add(16 * t));
            }
            let mut m = _mm512_abs_ps(v[0]);
            for vt in &v[1..] {
                m = _mm512_max_ps(m, _mm512_abs_ps(*vt));
            }
            let amax = _mm512_reduce_max_ps(m);
            let sx = amax / 127.0;
            let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
            let mut q = [_mm512_setzero_si512(); BLOCKS_PER_GROUP];
            let mut qf = [_mm512_setzero_ps(); BLOCKS_PER_GROUP];
            for t in 0..BLOCKS_PER_GROUP {
                // Clamping before rounding to the integers ±127 equals clamping after.
                let c = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(v[t], inv), hi), lo);
                q[t] = _mm512_cvtps_epi32(c);
                qf[t] = _mm512_cvtepi32_ps(q[t]);
            }
            let sums = super::fold16_rows(&qf);
            for (t, &sum) in sums.iter().enumerate() {
                cs[CS_SLOT[t]] = sx * sum;
            }
            // Two blocks (32 elements) at a time: their 16 even elements, then their 16 odd
            // ones, as bytes at their places among the group's evens and odds.
            let evens =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
            let out = xq.as_mut_ptr();
            for pair in 0..BLOCKS_PER_GROUP / 2 {
                let (a, b) = (q[2 * pair], q[2 * pair + 1]);
                let e = _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a, evens, b));
                let o = _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(a, odds, b));
                _mm_storeu_si128(out.add(16 * pair) as *mut __m128i, e);
                _mm_storeu_si128(out.add(GROUP / 2 + 16 * pair) as *mut __m128i, o);
            }
            sx * (2.0 / 15.0)
        }
    }

    /// Shapes as [`crate::arch::avx2::q4_int8::gemv`]: W `out x in` (`in % 16 == 0`), `prep`
    /// `[prep_len(in)]`, `rows ⊆ 0..out`, `y` `[rows.len()]`. Eight rows at a time share the
    /// loads of x, then four (a row left over takes the AVX2 kernel: the same bits). Eight
    /// against four: one 1024² layer back to back, 2-core Xeon, three rounds in turns
    /// (2026-12-05, with the 512-bit preparation of x): 2 threads 9.81–9.98 against
    /// 10.63–11.11 µs, 1 thread 15.0–15.7 against 16.1–16.5.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI, AVX2, FMA and F16C; the shapes above.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn gemv(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        // SAFETY: the caller's contract.
        unsafe { gemv_with::<ShiftMask>(m, prep, rows, y, acc) }
    }

    /// [`gemv`] with each byte's high nibble taken by one GFNI affine transform
    /// ([`Gf2Affine`]) instead of a shift and a mask: the same bytes, so the same bits, one
    /// instruction fewer per row and group (one 1024² layer on one thread of the 2-core Xeon,
    /// back to back: 16.0–17.6 µs without it, 15.5–16.2 with it, three rounds in turns,
    /// 2026-12-05).
    ///
    /// # Safety
    /// As [`gemv`], and the CPU has GFNI ([`crate::act8::has_avx512_gfni`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,gfni")]
    pub(crate) unsafe fn gemv_gfni(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        // SAFETY: the caller's contract.
        unsafe { gemv_with::<Gf2Affine>(m, prep, rows, y, acc) }
    }

    /// [`gemv`]'s body on the high-nibble step `H`.
    ///
    /// # Safety
    /// As [`gemv`], and `H`'s CPU features.
    #[inline(always)]
    unsafe fn gemv_with<H: HighNibbles>(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        let ops = RowOperands::new(m, prep);
        // The prefetch mode chosen once per call: a branch-free inner loop per mode.
        match ops.prefetch {
            // SAFETY: the caller's contract.
            QuantPrefetch::T0 => unsafe { sweep::<H, HintT0>(&ops, m, prep, rows, y, acc) },
            // SAFETY: the caller's contract.
            QuantPrefetch::Nta => unsafe { sweep::<H, HintNta>(&ops, m, prep, rows, y, acc) },
            // SAFETY: the caller's contract.
            QuantPrefetch::Off => unsafe { sweep::<H, HintOff>(&ops, m, prep, rows, y, acc) },
        }
    }

    /// [`gemv_with`] on the prefetch hint `F`.
    ///
    /// # Safety
    /// As [`gemv`], and `H`'s CPU features.
    #[inline(always)]
    unsafe fn sweep<H: HighNibbles, F: PrefetchHint>(
        ops: &RowOperands,
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        // Eight rows at a time (four pairs: the loads of x and the group's corrections shared
        // by twice the rows), then four, then one. The common widths take a sweep compiled for
        // their number of blocks (see `dot_rows`).
        let (start, mut r8) = (rows.start, rows.start);
        while r8 + 8 <= rows.end {
            // SAFETY: the caller's contract; rows r8..r8 + 8 lie inside W.
            let v = unsafe {
                match ops.nb {
                    64 => dot_rows::<H, F, 4, 8, 64>(ops, m, r8, prep),
                    128 => dot_rows::<H, F, 4, 8, 128>(ops, m, r8, prep),
                    256 => dot_rows::<H, F, 4, 8, 256>(ops, m, r8, prep),
                    _ => dot_rows::<H, F, 4, 8, 0>(ops, m, r8, prep),
                }
            };
            for (t, &vt) in v.iter().enumerate() {
                let j = r8 - start + t;
                y[j] = if acc { y[j] + vt } else { vt };
            }
            r8 += 8;
        }
        let y = &mut y[r8 - start..];
        crate::kernels::for_row_quads!(
            r8..rows.end,
            // SAFETY: the caller's contract; the rows handed over lie inside W.
            |r| unsafe { dot_rows::<H, F, 2, 4, 0>(ops, m, r, prep) },
            // SAFETY: the caller's contract (the AVX2 kernel's features are a subset).
            unsafe { crate::arch::avx2::q4_int8::dot_rows::<Maddubs, 1>(ops, m, r, prep)[0] },
            crate::kernels::store_row(y, acc)
        );
    }

    /// [`gemv`] reading the matrix's row-interleaved copy ([`crate::q4::tiles`], built here on
    /// the first call): each whole tile of 16 rows inside `rows` by [`tile_dot`], the rows
    /// before the first and after the last whole tile by the row kernel. The same bits as
    /// [`gemv`] (`vnni_gemvs_match_avx2`); where the matrix has no copy (no whole tile or
    /// group), [`gemv`] itself. (`NIBBLE_Q4_TILES=0` is honoured by the dispatch, which then
    /// calls [`gemv`].)
    ///
    /// # Safety
    /// As [`gemv`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn gemv_tiles(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        // SAFETY: the caller's contract.
        unsafe { tiles_with::<ShiftMask>(m, prep, rows, y, acc) }
    }

    /// [`gemv_tiles`] with the high nibbles by GFNI ([`gemv_gfni`]): the same bits.
    ///
    /// # Safety
    /// As [`gemv_gfni`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,gfni")]
    pub(crate) unsafe fn gemv_tiles_gfni(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        // SAFETY: the caller's contract.
        unsafe { tiles_with::<Gf2Affine>(m, prep, rows, y, acc) }
    }

    /// [`gemv_tiles`]'s body on the high-nibble step `H`.
    ///
    /// # Safety
    /// As [`gemv`], and `H`'s CPU features.
    #[inline(always)]
    unsafe fn tiles_with<H: HighNibbles>(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        let copy = m.tiles.get(m);
        let Some((t, (head, tiles, tail))) =
            copy.and_then(|t| split_at_tiles(rows.clone(), t.tiles).map(|s| (t, s)))
        else {
            // SAFETY: the caller's contract.
            return unsafe { gemv_with::<H>(m, prep, rows, y, acc) };
        };
        let (y_head, rest) = y.split_at_mut(head.len());
        let (y_tiles, y_tail) = rest.split_at_mut(tiles.len() * TILE_ROWS);
        if !head.is_empty() {
            // SAFETY: the caller's contract; the rows before the first tile lie inside W.
            unsafe { gemv_with::<H>(m, prep, head, y_head, acc) };
        }
        // (Direct calls, so that the sweep is inlined into this call's target features.)
        // SAFETY: the caller's contract; the tiles lie inside the copy.
        unsafe {
            match quant_prefetch() {
                QuantPrefetch::T0 => tile_sweep::<H, HintT0>(m, t, prep, tiles, y_tiles, acc),
                QuantPrefetch::Nta => tile_sweep::<H, HintNta>(m, t, prep, tiles, y_tiles, acc),
                QuantPrefetch::Off => tile_sweep::<H, HintOff>(m, t, prep, tiles, y_tiles, acc),
            }
        };
        if !tail.is_empty() {
            // SAFETY: the caller's contract; the rows after the last tile lie inside W.
            unsafe { gemv_with::<H>(m, prep, tail, y_tail, acc) };
        }
    }

    /// `y[16k + i] (+)= W[16 (t0 + k) + i, :] · x'` for the tiles `t0..t1` (`tiles`) of the
    /// copy `t`, on the prefetch hint `F`; each row adds [`tail_ref`] for the blocks past the
    /// copy's.
    ///
    /// # Safety
    /// As [`gemv`], and `H`'s CPU features; `tiles.end <= t.tiles`, `y` 16 values per tile.
    #[inline(always)]
    unsafe fn tile_sweep<H: HighNibbles, F: PrefetchHint>(
        m: &Q4Matrix,
        t: &Q4Tiles,
        prep: &[f32],
        tiles: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        debug_assert!(tiles.end <= t.tiles && y.len() >= tiles.len() * TILE_ROWS);
        let (xq, xs, cs) = crate::q4::act8::parts(m.inn, prep);
        let full = t.nb / BLOCKS_PER_GROUP;
        for (yt, tile) in y.chunks_exact_mut(TILE_ROWS).zip(tiles) {
            // SAFETY: tile < t.tiles, so its nb blocks of codes and norms lie inside the copy;
            // the prepared x holds `full` whole groups (the caller's contract).
            let v = unsafe {
                tile_dot::<H, F>(
                    t.code_bytes().as_ptr().add(tile * t.nb * TILE_BLOCK_BYTES),
                    t.norm_halves().as_ptr().add(tile * t.nb * TILE_ROWS),
                    (xq.as_ptr(), xs.as_ptr(), cs.as_ptr()),
                    full,
                )
            };
            for (i, (o, &vi)) in yt.iter_mut().zip(&v).enumerate() {
                // (The blocks past the copy's, from the checkpoint layout, as the row kernel.)
                let vi = vi + tail_ref(m, tile * TILE_ROWS + i, t.nb, prep);
                *o = if acc { *o + vi } else { vi };
            }
        }
    }

    /// One tile's 16 dot products over its `full` whole groups: codes `[nb, 2, 16, 4]` at
    /// `codes`, norms `[nb, 16]` at `norms` ([`crate::q4::tiles`]), the prepared x's
    /// `(xq, xs, cs)`. Lane i is row i throughout: block b's integer sum is four `vpdpbusd`
    /// (low and high nibbles of each half against broadcast words of x's even and odd bytes),
    /// then `n_b · (xs_g · I_b − cs_b)` added to the chain of the block's place in its group,
    /// and the 8 chains folded as [`fold_block_chains`] folds them: the row kernel's steps and
    /// bits.
    ///
    /// # Safety
    /// `H`'s CPU features and AVX-512 F/BW + VNNI, F16C; the pointers hold what they say for
    /// `full` groups.
    #[inline(always)]
    unsafe fn tile_dot<H: HighNibbles, F: PrefetchHint>(
        codes: *const u8,
        norms: *const half::f16,
        (xq, xs, cs): (*const u8, *const f32, *const f32),
        full: usize,
    ) -> [f32; TILE_ROWS] {
        // Prefetch one group (8 blocks) ahead: its codes (two lines a block) and norms (one
        // line per two blocks).
        const AHEAD: usize = BLOCKS_PER_GROUP * TILE_BLOCK_BYTES;
        // SAFETY: g < full, k < 8: block 8g + k's 128 code bytes and 16 norms lie inside the
        // tile; x's group g holds 128 bytes, xs[g], cs[8g..8g + 8]; prefetches never fault.
        unsafe {
            let mask = _mm512_set1_epi8(0x0f);
            let mut chains = [_mm512_setzero_ps(); BLOCKS_PER_GROUP];
            for g in 0..full {
                let x = xq.add(g * GROUP);
                let xsv = _mm512_set1_ps(*xs.add(g));
                // The word of x's bytes at byte offset `o` of the group, in every lane.
                let word = |o: usize| _mm512_set1_epi32((x.add(o) as *const i32).read_unaligned());
                for (k, chain) in chains.iter_mut().enumerate() {
                    let b = g * BLOCKS_PER_GROUP + k;
                    let cp = codes.add(b * TILE_BLOCK_BYTES);
                    F::line(cp.wrapping_add(AHEAD));
                    F::line(cp.wrapping_add(AHEAD + 64));
                    if k % 2 == 0 {
                        F::line(norms.wrapping_add(b * TILE_ROWS + AHEAD / 8) as *const u8);
                    }
                    // (Aligned lines: `Line`.)
                    let c0 = _mm512_load_si512(cp as *const _);
                    let c1 = _mm512_load_si512(cp.add(64) as *const _);
                    // Block k's even elements are x's even bytes 8k..8k + 8, its odd ones the
                    // odd bytes (at 64 + 8k): 4 of each per half.
                    let mut s = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        _mm512_and_si512(c0, mask),
                        word(8 * k),
                    );
                    s = _mm512_dpbusd_epi32(s, H::high(c0), word(GROUP / 2 + 8 * k));
                    s = _mm512_dpbusd_epi32(s, _mm512_and_si512(c1, mask), word(8 * k + 4));
                    s = _mm512_dpbusd_epi32(s, H::high(c1), word(GROUP / 2 + 8 * k + 4));
                    let csv = _mm512_set1_ps(*cs.add(g * BLOCKS_PER_GROUP + CS_SLOT[k]));
                    let tk = _mm512_fmsub_ps(xsv, _mm512_cvtepi32_ps(s), csv);
                    let nv = _mm512_cvtph_ps(_mm256_loadu_si256(
                        norms.add(b * TILE_ROWS) as *const __m256i
                    ));
                    *chain = _mm512_fmadd_ps(nv, tk, *chain);
                }
            }
            // (b0 + b2) + (b4 + b6), (b1 + b3) + (b5 + b7), then those two.
            let c = &chains;
            let even = _mm512_add_ps(_mm512_add_ps(c[0], c[2]), _mm512_add_ps(c[4], c[6]));
            let odd = _mm512_add_ps(_mm512_add_ps(c[1], c[3]), _mm512_add_ps(c[5], c[7]));
            let mut out = [0.0f32; TILE_ROWS];
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(even, odd));
            out
        }
    }

    /// `out[v · stride + j] = W[rows.start + j, :] · x'_v` for the `preps.len()` (2 to 8)
    /// prepared vectors (each from [`crate::q4::act8::prepare`]): a small batch with each
    /// block of each whole tile of the row-interleaved copy ([`crate::q4::tiles`]) loaded and
    /// its nibbles split once for every vector, each (tile, vector) through [`tile_dot`]'s
    /// steps (so the bits of [`gemv_tiles`] and every other Q4 int8 GEMV), the rows outside
    /// whole tiles vector by vector on the row kernel. `false`, with nothing written, for
    /// another count or where the matrix has no copy.
    ///
    /// # Safety
    /// As [`gemv`] for every prepared vector; `stride >= rows.len()` and
    /// `out.len() >= (preps.len() - 1) · stride + rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn gemv_batch(
        m: &Q4Matrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        // SAFETY: the caller's contract.
        unsafe { batch_with::<ShiftMask>(m, preps, rows, out, stride) }
    }

    /// [`gemv_batch`] with the high nibbles by GFNI ([`gemv_gfni`]): the same bits.
    ///
    /// # Safety
    /// As [`gemv_batch`], and the CPU has GFNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,gfni")]
    pub(crate) unsafe fn gemv_batch_gfni(
        m: &Q4Matrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        // SAFETY: the caller's contract.
        unsafe { batch_with::<Gf2Affine>(m, preps, rows, out, stride) }
    }

    /// [`gemv_batch`]'s body on the high-nibble step `H`.
    ///
    /// # Safety
    /// As [`gemv_batch`], and `H`'s CPU features.
    #[inline(always)]
    unsafe fn batch_with<H: HighNibbles>(
        m: &Q4Matrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        if !(2..=8).contains(&preps.len()) {
            return false;
        }
        let Some((t, (head, tiles, tail))) = m
            .tiles
            .get(m)
            .and_then(|t| split_at_tiles(rows.clone(), t.tiles).map(|s| (t, s)))
        else {
            return false;
        };
        // The rows outside whole tiles, vector by vector on the row kernel (its bits).
        for (v, prep) in preps.iter().enumerate() {
            for part in [head.clone(), tail.clone()] {
                if !part.is_empty() {
                    let j = part.start - rows.start;
                    let y = &mut out[v * stride + j..v * stride + j + part.len()];
                    // SAFETY: the caller's contract; the rows lie inside `rows`.
                    unsafe { gemv_with::<H>(m, prep, part, y, false) };
                }
            }
        }
        with_batch_count!(preps, V, preps_v =>
            // SAFETY: the caller's contract, for the V vectors of the arm; the tiles lie
            // inside the copy.
            unsafe { tiles_batch::<H, V>(m, t, preps_v, tiles, &mut out[head.len()..], stride) }
        )
    }

    /// The tiles `tiles` of the copy `t` against `V` prepared vectors: `out[v · stride + 16k +
    /// i]` = row `16 (tiles.start + k) + i`'s product with vector v. Per tile, each chain of
    /// [`tile_dot`] (block place `k` of every group) runs for every vector in one pass over
    /// the blocks at place `k`, while the next tile's lines of the same blocks are fetched.
    ///
    /// # Safety
    /// AVX-512 F/BW + VNNI, F16C and `H`'s features; every prep holds the whole groups of
    /// `t` (`prep_len(m.inn)`); `tiles.end <= t.tiles`; `out` holds `(V - 1) · stride +
    /// 16 · tiles.len()` values.
    #[inline(always)]
    unsafe fn tiles_batch<H: HighNibbles, const V: usize>(
        m: &Q4Matrix,
        t: &Q4Tiles,
        preps: [&[f32]; V],
        tiles: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let xs: [(&[u8], &[f32], &[f32]); V] =
            std::array::from_fn(|v| crate::q4::act8::parts(m.inn, preps[v]));
        let full = t.nb / BLOCKS_PER_GROUP;
        let tile_codes = t.nb * TILE_BLOCK_BYTES;
        // SAFETY: (whole body) the caller's contract: for tile < t.tiles and g < full the
        // block 8g + k's 128 code bytes and 16 norms lie inside the copy, each prepared x
        // holds 128 bytes at g·128, xs[g] and cs[8g..8g + 8]; prefetches never fault.
        unsafe {
            let mask = _mm512_set1_epi8(0x0f);
            for (n, tile) in tiles.enumerate() {
                let codes = t.code_bytes().as_ptr().add(tile * tile_codes);
                let norms = t.norm_halves().as_ptr().add(tile * t.nb * TILE_ROWS);
                let mut chains = [[_mm512_setzero_ps(); BLOCKS_PER_GROUP]; V];
                for k in 0..BLOCKS_PER_GROUP {
                    let mut acc = [_mm512_setzero_ps(); V];
                    for g in 0..full {
                        let b = g * BLOCKS_PER_GROUP + k;
                        let cp = codes.add(b * TILE_BLOCK_BYTES);
                        // The next tile's lines of this block.
                        let np = cp.wrapping_add(tile_codes);
                        prefetch_t0(np);
                        prefetch_t0(np.wrapping_add(64));
                        if k % 2 == 0 {
                            prefetch_t0(
                                norms.wrapping_add(t.nb * TILE_ROWS + b * TILE_ROWS) as *const u8
                            );
                        }
                        let c0 = _mm512_load_si512(cp as *const _);
                        let c1 = _mm512_load_si512(cp.add(64) as *const _);
                        let (l0, h0) = (_mm512_and_si512(c0, mask), H::high(c0));
                        let (l1, h1) = (_mm512_and_si512(c1, mask), H::high(c1));
                        let nv = _mm512_cvtph_ps(_mm256_loadu_si256(
                            norms.add(b * TILE_ROWS) as *const __m256i
                        ));
                        for (a, &(xq, xsg, cs)) in acc.iter_mut().zip(&xs) {
                            let x = xq.as_ptr().add(g * GROUP);
                            let word = |o: usize| {
                                _mm512_set1_epi32((x.add(o) as *const i32).read_unaligned())
                            };
                            let mut s =
                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, word(8 * k));
                            s = _mm512_dpbusd_epi32(s, h0, word(GROUP / 2 + 8 * k));
                            s = _mm512_dpbusd_epi32(s, l1, word(8 * k + 4));
                            s = _mm512_dpbusd_epi32(s, h1, word(GROUP / 2 + 8 * k + 4));
                            let xsv = _mm512_set1_ps(*xsg.get_unchecked(g));
                            let csv = _mm512_set1_ps(
                                *cs.get_unchecked(g * BLOCKS_PER_GROUP + CS_SLOT[k]),
                            );
                            let tk = _mm512_fmsub_ps(xsv, _mm512_cvtepi32_ps(s), csv);
                            *a = _mm512_fmadd_ps(nv, tk, *a);
                        }
                    }
                    for (c, a) in chains.iter_mut().zip(acc) {
                        c[k] = a;
                    }
                }
                for (v, c) in chains.iter().enumerate() {
                    // (b0 + b2) + (b4 + b6), (b1 + b3) + (b5 + b7), then those two: as
                    // `tile_dot`.
                    let even = _mm512_add_ps(_mm512_add_ps(c[0], c[2]), _mm512_add_ps(c[4], c[6]));
                    let odd = _mm512_add_ps(_mm512_add_ps(c[1], c[3]), _mm512_add_ps(c[5], c[7]));
                    let mut lanes = [0.0f32; TILE_ROWS];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_add_ps(even, odd));
                    let y = &mut out[v * stride + n * TILE_ROWS..][..TILE_ROWS];
                    for (i, (o, &li)) in y.iter_mut().zip(&lanes).enumerate() {
                        // (The blocks past the copy's, from the checkpoint layout.)
                        *o = li + tail_ref(m, tile * TILE_ROWS + i, t.nb, preps[v]);
                    }
                }
            }
        }
    }

    /// A T0 prefetch of the line at `p` (never faults).
    #[inline(always)]
    fn prefetch_t0(p: *const u8) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
    }

    /// Integer block sums of one row's group (64 code bytes at `q`) with x's even (`xe`) and
    /// odd (`xo`) bytes: lane `2t + h` holds half `h` of block t.
    #[inline(always)]
    unsafe fn group_sums<H: HighNibbles>(q: *const u8, xe: __m512i, xo: __m512i) -> __m512i {
        // SAFETY: the caller's contract (64 readable bytes at q; AVX-512 BW + VNNI and H's
        // features).
        unsafe {
            let c = _mm512_loadu_si512(q as *const _);
            let lo = _mm512_and_si512(c, _mm512_set1_epi8(0x0f));
            let hi = H::high(c);
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe), hi, xo)
        }
    }

    /// The four rows' sums of their 8 block chains (`a = [row 0 | row 1]`, `b = [row 2 |
    /// row 3]`, lane t of a row block t's chain) added as [`crate::kernels::avx2::hsum`] adds
    /// the AVX2 kernel's lanes, which hold the chains in `CS_SLOT` order `[b0, b1, b4, b5, b2,
    /// b3, b6, b7]`: `(b0 + b2)`, `(b1 + b3)`, `(b4 + b6)`, `(b5 + b7)` (its lanes `i` and
    /// `i + 4`), then `(b0 + b2) + (b4 + b6)` and `(b1 + b3) + (b5 + b7)`, then those two: the
    /// same additions of the same values, so the same bits.
    #[inline(always)]
    unsafe fn fold_block_chains(a: __m512, b: __m512) -> [f32; 4] {
        // SAFETY: register-only; the caller's target features include AVX-512 F.
        unsafe {
            // In each 128-bit quarter [b0 b1 b2 b3] (or [b4 .. b7]): lanes 0, 1 <- b0 + b2,
            // b1 + b3.
            let sa = _mm512_add_ps(a, _mm512_permute_ps::<0b01_00_11_10>(a));
            let sb = _mm512_add_ps(b, _mm512_permute_ps::<0b01_00_11_10>(b));
            // Quarter r: row r's first quarter plus its second.
            let w = super::add_row_halves(sa, sb);
            super::quarter_firsts(_mm512_add_ps(w, _mm512_permute_ps::<0b00_00_00_01>(w)))
        }
    }

    /// Dot products of rows `r0..r0 + R` (all `< out`; `R = 2 P`, a multiple of 4) with the
    /// prepared x, `ops` resolved from `m` and `prep` (which the tail past the last whole
    /// group reads): `P` pairs of rows, each pair's f32 steps side by side in one register.
    ///
    /// `NB`, where not 0, is `ops.nb` known at compile time: each of the 8 rows' codes and
    /// norms then lie at a constant offset from one pointer. With `nb` known only at run time
    /// LLVM keeps a pointer per row (codes, norms, their prefetches) live across the loop over
    /// groups, more than the 16 general registers, and reloads them from the stack: one
    /// 1024² layer back to back on the 2-core Xeon, three rounds in turns (2026-12-05, a noisy
    /// hour): 1 thread 13.3–14.1 against 14.8–15.4 µs, 2 threads 9.10–9.11 (one round 13.8)
    /// against 9.39–9.77 (ggml's AMX Q4_0 10.10 then). Sweeps for other widths, and the
    /// other 4-row calls, keep `nb` a run-time value (`NB = 0`).
    #[inline(always)]
    unsafe fn dot_rows<
        H: HighNibbles,
        F: PrefetchHint,
        const P: usize,
        const R: usize,
        const NB: usize,
    >(
        ops: &RowOperands,
        m: &Q4Matrix,
        r0: usize,
        prep: &[f32],
    ) -> [f32; R] {
        let (packed, norms, xq, xs, cs, nb, full, _) = ops.all();
        debug_assert!(NB == 0 || NB == nb);
        // (`full` stays a run-time count: a loop over groups unrolled whole grew the code
        // past what the batch-1 forward keeps in its instruction caches.)
        let nb = if NB > 0 { NB } else { nb };
        // One sweep ahead: the rows after this call's `R`, in bytes of codes and in norms.
        let ahead = R.max(PREFETCH_ROWS) * nb;
        let ahead_codes = ahead * 8;
        // SAFETY: g < full groups: 128 bytes of xq at g·128, xs[g], cs[8g..8g+8]; each row
        // r0 + r < out holds 64 packed bytes and 8 norms at block 8g; prefetches never fault.
        unsafe {
            let first = _mm512_loadu_si512(FIRST_HALVES.as_ptr() as *const _);
            let second = _mm512_loadu_si512(SECOND_HALVES.as_ptr() as *const _);
            let cs_order = _mm512_loadu_si512(CS_IN_BLOCK_ORDER.as_ptr() as *const _);
            // Rows (r0, r0 + 1) and (r0 + 2, r0 + 3): each pair's accumulators side by side,
            // lane t of a row the chain of block t of every group.
            let mut accv = [_mm512_setzero_ps(); P];
            for g in 0..full {
                // The group's 64 even elements, then its 64 odd ones (module docs' layout).
                let x = xq.add(g * GROUP);
                let xe = _mm512_loadu_si512(x as *const _);
                let xo = _mm512_loadu_si512(x.add(GROUP / 2) as *const _);
                let xsv = _mm512_set1_ps(*xs.add(g));
                let c8 = _mm512_castps256_ps512(_mm256_loadu_ps(cs.add(g * BLOCKS_PER_GROUP)));
                let csv = _mm512_permutexvar_ps(cs_order, c8);
                for (p, a) in accv.iter_mut().enumerate() {
                    let blk = |k: usize| (r0 + 2 * p + k) * nb + g * BLOCKS_PER_GROUP;
                    let (ba, bb) = (blk(0), blk(1));
                    let (pa, pb) = (packed.add(ba * 8), packed.add(bb * 8));
                    F::line(pa.wrapping_add(ahead_codes));
                    F::line(pb.wrapping_add(ahead_codes));
                    F::line(norms.wrapping_add(ba + ahead) as *const u8);
                    F::line(norms.wrapping_add(bb + ahead) as *const u8);
                    let qa = group_sums::<H>(pa, xe, xo);
                    let qb = group_sums::<H>(pb, xe, xo);
                    let s = _mm512_add_epi32(
                        _mm512_permutex2var_epi32(qa, first, qb),
                        _mm512_permutex2var_epi32(qa, second, qb),
                    );
                    let n16 = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(norms.add(ba) as *const __m128i)),
                        _mm_loadu_si128(norms.add(bb) as *const __m128i),
                    );
                    let nv = _mm512_cvtph_ps(n16);
                    let t = _mm512_fmsub_ps(xsv, _mm512_cvtepi32_ps(s), csv);
                    *a = _mm512_fmadd_ps(nv, t, *a);
                }
            }
            let mut res = [0.0f32; R];
            for (q, out) in res.chunks_exact_mut(4).enumerate() {
                out.copy_from_slice(&fold_block_chains(accv[2 * q], accv[2 * q + 1]));
            }
            for (r, o) in res.iter_mut().enumerate() {
                *o += tail_ref(m, r0 + r, full * BLOCKS_PER_GROUP, prep);
            }
            res
        }
    }
}

/// NF4's fused int8-activation GEMV at batch 1 ([`crate::nf4::act8`]) on AVX-512 VNNI: per
/// pair of blocks of 64 weights one 64-byte load of codes, each nibble through `vpshufb` on
/// the offset level table and a `vpdpbusd` against the prepared x; the f32 steps lane for
/// lane those of [`crate::nf4::act8::dot_ref`]: the same bits.
pub(crate) mod nf4_int8 {
    use crate::cpu::{prefetch_weights, quant_prefetch, PREFETCH_ROWS};
    use crate::nf4::act8::{block_scale, parts, BIASED_LEVELS};
    use crate::nf4::{with_absmax_reader, AbsmaxAt, Nf4Matrix, NF4_BLOCK};
    use std::arch::x86_64::*;

    /// `y[j] (+)= W[rows.start + j, :] · x'` (`x'` prepared by [`crate::nf4::act8::prepare`]):
    /// four rows at a time (four independent chains of f32 steps, one load of x's bytes for
    /// the four), a row left over on its own (the same steps).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI, AVX2 and FMA; `m.inn % 64 == 0`, `prep` holds
    /// `prep_len(m.inn)` slots, `rows ⊆ 0..out`, `y.len() >= rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(crate) unsafe fn gemv(
        m: &Nf4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        with_absmax_reader!(m, am => crate::kernels::for_row_quads!(
            rows,
            // SAFETY: the caller's contract; the rows handed over lie inside W.
            |r| unsafe { rows_n::<4>(m, am, prep, r) },
            // SAFETY: the caller's contract; the row handed over lies inside W.
            unsafe { rows_n::<1>(m, am, prep, r)[0] },
            crate::kernels::store_row(y, acc)
        ))
    }

    /// `out[v · stride + j] = W[rows.start + j, :] · x'_v` for the `preps.len()` (2 to 8)
    /// prepared vectors (each from [`crate::nf4::act8::prepare`]): a small batch with each
    /// row's codes loaded and looked up once for every vector, each (row, vector) through
    /// [`gemv`]'s steps, so its bits. `false`, with nothing written, for another count.
    ///
    /// # Safety
    /// As [`gemv`] for every prepared vector; `stride >= rows.len()` and
    /// `out.len() >= (preps.len() - 1) · stride + rows.len()`.
    pub(crate) unsafe fn gemv_batch(
        m: &Nf4Matrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        with_batch_count!(preps, V, preps_v =>
            // SAFETY: the caller's contract, for the V vectors of the arm.
            unsafe { rows_batch::<V>(m, preps_v, rows, out, stride) }
        )
    }

    /// [`gemv_batch`] for `V` vectors, one row at a time (`V` accumulators): the rows' block
    /// absmaxes once per call, each vector's block scales formed from them as
    /// [`crate::nf4::act8::block_scale`] forms them.
    ///
    /// # Safety
    /// As [`gemv_batch`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn rows_batch<const V: usize>(
        m: &Nf4Matrix,
        preps: [&[f32]; V],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let nb = m.inn / NF4_BLOCK;
        let row_bytes = m.inn / 2;
        let xs: [(&[i8], &[i32], &[f32]); V] = std::array::from_fn(|v| parts(m.inn, preps[v]));
        let pf = quant_prefetch();
        let mut absmax = crate::kernels::take_row_scales(rows.len() * nb);
        m.fill_absmax(rows.start * nb, &mut absmax);
        // SAFETY: (whole body) the CPU features are enabled by the caller; each row r of
        // `rows` holds `row_bytes` packed bytes at r · row_bytes (32 per block; an odd last
        // block's pair is loaded with its second half masked off); each prepared x holds 128
        // bytes and 16 i32 per pair and nb scales; prefetches never fault.
        unsafe {
            let table = _mm512_broadcast_i32x4(_mm_loadu_si128(BIASED_LEVELS.as_ptr() as *const _));
            let low4 = _mm512_set1_epi8(0x0f);
            for (j, r) in rows.enumerate() {
                let row = m.packed.as_slice().as_ptr().add(r * row_bytes);
                let am = &absmax[j * nb..(j + 1) * nb];
                let mut acc = [_mm512_setzero_ps(); V];
                let mut b = 0;
                while b < nb {
                    let p = b / 2;
                    let whole = b + 1 < nb;
                    prefetch_weights(pf, row.wrapping_add(PREFETCH_ROWS * row_bytes + b * 32));
                    let codes = if whole {
                        _mm512_loadu_si512(row.add(b * 32) as *const _)
                    } else {
                        _mm512_maskz_loadu_epi8(0xFFFF_FFFF, row.add(b * 32) as *const i8)
                    };
                    let hi = _mm512_shuffle_epi8(
                        table,
                        _mm512_and_si512(_mm512_srli_epi16::<4>(codes), low4),
                    );
                    let lo = _mm512_shuffle_epi8(table, _mm512_and_si512(codes, low4));
                    for (a, &(xd, corr, su)) in acc.iter_mut().zip(&xs) {
                        let xe = _mm512_loadu_si512(xd.as_ptr().add(p * 128) as *const _);
                        let xo = _mm512_loadu_si512(xd.as_ptr().add(p * 128 + 64) as *const _);
                        let cv = _mm512_loadu_si512(corr.as_ptr().add(p * 16) as *const _);
                        let sums = _mm512_dpbusd_epi32(
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xe),
                            lo,
                            xo,
                        );
                        let sums = _mm512_sub_epi32(sums, cv);
                        let s0 = _mm512_set1_ps(block_scale(am[b], *su.get_unchecked(b)));
                        let s = if whole {
                            let s1 =
                                _mm512_set1_ps(block_scale(am[b + 1], *su.get_unchecked(b + 1)));
                            _mm512_mask_blend_ps(0xFF00, s0, s1)
                        } else {
                            _mm512_maskz_mov_ps(0x00FF, s0)
                        };
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, *a);
                    }
                    b += 2;
                }
                let folded = super::fold16_rows(&acc);
                for (v, &f) in folded.iter().enumerate() {
                    out[v * stride + j] = f;
                }
            }
        }
        crate::kernels::put_row_scales(absmax);
    }

    /// The dot products of rows `r0..r0 + N` with the prepared x, each block's scale formed
    /// from its absmax (read through `am`) as the pair is reached.
    ///
    /// # Safety
    /// As [`gemv`], rows `r0..r0 + N` inside W, `am` W's absmax reader.
    #[inline(always)]
    unsafe fn rows_n<const N: usize>(
        m: &Nf4Matrix,
        am: impl AbsmaxAt,
        prep: &[f32],
        r0: usize,
    ) -> [f32; N] {
        let nb = m.inn / NF4_BLOCK;
        let row_bytes = m.inn / 2;
        let (xd, corr, su) = parts(m.inn, prep);
        let pf = quant_prefetch();
        // SAFETY: (whole body) the CPU features are enabled by the caller; rows r0..r0 + N
        // hold `row_bytes` packed bytes each at r · row_bytes (32 per block; an odd last
        // block's pair is loaded with its second half masked off) and nb blocks of absmaxes
        // from (r0 + q) · nb; xd holds 128 bytes and corr 16 i32 per pair, su nb scales;
        // prefetches never fault.
        unsafe {
            let table = _mm512_broadcast_i32x4(_mm_loadu_si128(BIASED_LEVELS.as_ptr() as *const _));
            let low4 = _mm512_set1_epi8(0x0f);
            let base = m.packed.as_slice().as_ptr().add(r0 * row_bytes);
            let mut accv = [_mm512_setzero_ps(); N];
            let mut b = 0;
            while b < nb {
                let p = b / 2;
                let whole = b + 1 < nb;
                let xe = _mm512_loadu_si512(xd.as_ptr().add(p * 128) as *const _);
                let xo = _mm512_loadu_si512(xd.as_ptr().add(p * 128 + 64) as *const _);
                let cv = _mm512_loadu_si512(corr.as_ptr().add(p * 16) as *const _);
                for (q, a) in accv.iter_mut().enumerate() {
                    let row = base.add(q * row_bytes);
                    prefetch_weights(pf, row.wrapping_add(PREFETCH_ROWS * row_bytes + b * 32));
                    let codes = if whole {
                        _mm512_loadu_si512(row.add(b * 32) as *const _)
                    } else {
                        _mm512_maskz_loadu_epi8(0xFFFF_FFFF, row.add(b * 32) as *const i8)
                    };
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(codes), low4);
                    let lo = _mm512_and_si512(codes, low4);
                    let sums = _mm512_dpbusd_epi32(
                        _mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            _mm512_shuffle_epi8(table, hi),
                            xe,
                        ),
                        _mm512_shuffle_epi8(table, lo),
                        xo,
                    );
                    let sums = _mm512_sub_epi32(sums, cv);
                    let blk = (r0 + q) * nb + b;
                    let s0 = _mm512_set1_ps(block_scale(am.at(blk), *su.get_unchecked(b)));
                    let s = if whole {
                        let s1 =
                            _mm512_set1_ps(block_scale(am.at(blk + 1), *su.get_unchecked(b + 1)));
                        _mm512_mask_blend_ps(0xFF00, s0, s1)
                    } else {
                        _mm512_maskz_mov_ps(0x00FF, s0)
                    };
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, *a);
                }
                b += 2;
            }
            super::fold16_rows(&accv)
        }
    }
}

/// Lower's fused int8-activation GEMV at batch 1 ([`crate::lower::act8`]) on AVX-512 VNNI:
/// per row and group of 128 codes one 64-byte word of nibbles (a 4-bit row's bytes as they
/// lie; a 3-bit row's 48 bytes spread to one run of 8 codes per 32-bit lane, then each code
/// moved to its nibble), two `vpdpbusd` against the prepared x and one fused multiply-add per
/// lane: lane for lane the steps of [`crate::lower::act8::dot_ref`], the same bits.
pub(crate) mod lower_int8 {
    use crate::cpu::{prefetch_weights, quant_prefetch, PREFETCH_ROWS};
    use crate::lower::act8::{
        group_step_ref, groups, min_term, parts, row_parts, SPREAD3_RUNS, SPREAD3_STEPS,
    };
    use crate::lower::{LowerMatrix, LOWER_GROUP};
    use std::arch::x86_64::*;

    /// `y[j] (+)= W[rows.start + j, :] · x'` (`x'` prepared by [`crate::lower::act8::prepare`]),
    /// four rows at a time (four independent chains, one load of x's bytes for the four), a
    /// row left over on its own (the same steps).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI, AVX2, FMA and F16C; `prep` holds
    /// `prep_len(m.inn)` slots, `rows ⊆ 0..out`, `y.len() >= rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn gemv(
        m: &LowerMatrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        let ng = groups(m.inn);
        // Room for four rows' factors `scale_g · sx_g` and mins, in whole runs of 8 groups.
        let ng8 = ng.div_ceil(8) * 8;
        let mut params = crate::kernels::take_row_scales(8 * ng8);
        let (xd, sx, xs) = parts(m.inn, prep);
        let ctx = Ctx {
            m,
            xd,
            sx,
            xs,
            ng,
            ng8,
            bits: m.bits.as_slice(),
            codes: m.codes.as_slice(),
            scales: m.scales.f16s(),
            mins: m.mins.f16s(),
            pf: quant_prefetch(),
        };
        crate::kernels::for_row_quads!(
            rows,
            // SAFETY: the caller's contract; the rows handed over lie inside W and
            // `params` holds 8 · ng8 floats.
            |r| unsafe { rows_n::<4>(&ctx, r, &mut params) },
            // SAFETY: the caller's contract; the rows handed over lie inside W and
            // `params` holds 8 · ng8 floats.
            unsafe { rows_n::<1>(&ctx, r, &mut params)[0] },
            crate::kernels::store_row(y, acc)
        );
        crate::kernels::put_row_scales(params);
    }

    /// `out[v · stride + j] = W[rows.start + j, :] · x'_v` for the `preps.len()` (2 to 8)
    /// prepared vectors (each from [`crate::lower::act8::prepare`]): a small batch with each
    /// row's codes loaded (and a 3-bit row's spread to nibbles) once for every vector, each
    /// (row, vector) through [`gemv`]'s steps, so its bits. `false`, with nothing written, for
    /// another count.
    ///
    /// # Safety
    /// As [`gemv`] for every prepared vector; `stride >= rows.len()` and
    /// `out.len() >= (preps.len() - 1) · stride + rows.len()`.
    pub(crate) unsafe fn gemv_batch(
        m: &LowerMatrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        with_batch_count!(preps, V, preps_v =>
            // SAFETY: the caller's contract, for the V vectors of the arm.
            unsafe { rows_batch::<V>(m, preps_v, rows, out, stride) }
        )
    }

    /// [`gemv_batch`] for `V` vectors, one row at a time (`V` accumulators): each row's
    /// scales and mins as f32 once ([`row_parts`]), each vector's factors `scale_g · sx_g`
    /// formed from them as [`gemv`] forms them (one product each).
    ///
    /// # Safety
    /// As [`gemv_batch`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn rows_batch<const V: usize>(
        m: &LowerMatrix,
        preps: [&[f32]; V],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let ng = groups(m.inn);
        let whole = m.inn / LOWER_GROUP;
        let xs: [(&[i8], &[f32], &[f32]); V] = std::array::from_fn(|v| parts(m.inn, preps[v]));
        let pf = quant_prefetch();
        let mut params = crate::kernels::take_row_scales(2 * ng);
        let (scale, min) = params.split_at_mut(ng);
        let base = m.codes.as_slice().as_ptr();
        // SAFETY: (whole body) the CPU features are enabled by the caller; for g < whole each
        // row holds group g's 64 (4-bit) or 48 (3-bit) bytes at g · gbytes, and each xd 128
        // bytes at g · 128; each sx holds ng values; prefetches never fault.
        unsafe {
            let low4 = _mm512_set1_epi8(0x0f);
            for (j, r) in rows.enumerate() {
                let (bits, codes) = row_parts(m, r, scale, min);
                let gbytes = if bits == 4 { 64 } else { 48 };
                let ahead = m.offsets[(r + PREFETCH_ROWS).min(m.out)] as usize;
                let mut acc = [_mm512_setzero_ps(); V];
                for g in 0..whole {
                    prefetch_weights(pf, base.wrapping_add(ahead + g * 48));
                    let p = codes.as_ptr().add(g * gbytes);
                    let z = if bits == 4 {
                        _mm512_loadu_si512(p as *const _)
                    } else {
                        spread3(p)
                    };
                    let lo = _mm512_and_si512(z, low4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(z), low4);
                    for (a, &(xd, sx, _)) in acc.iter_mut().zip(&xs) {
                        let xe = _mm512_loadu_si512(xd.as_ptr().add(g * 128) as *const _);
                        let xo = _mm512_loadu_si512(xd.as_ptr().add(g * 128 + 64) as *const _);
                        let sums = _mm512_dpbusd_epi32(
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe),
                            hi,
                            xo,
                        );
                        let f = *scale.get_unchecked(g) * *sx.get_unchecked(g);
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(f), *a);
                    }
                }
                if whole < ng {
                    // A partial last group: the reference's steps on each vector's lanes.
                    for (a, &(xd, sx, _)) in acc.iter_mut().zip(&xs) {
                        let mut l = super::lanes(*a);
                        for g in whole..ng {
                            group_step_ref(bits, codes, m.inn, g, xd, scale[g] * sx[g], &mut l);
                        }
                        *a = _mm512_loadu_ps(l.as_ptr());
                    }
                }
                let folded = super::fold16_rows(&acc);
                for (v, (&f, &(_, _, xsum))) in folded.iter().zip(&xs).enumerate() {
                    out[v * stride + j] = f + min_term(min, xsum);
                }
            }
        }
        crate::kernels::put_row_scales(params);
    }

    /// What every row of a call reads: the matrix's parts and the prepared x's.
    struct Ctx<'a> {
        m: &'a LowerMatrix,
        xd: &'a [i8],
        sx: &'a [f32],
        xs: &'a [f32],
        ng: usize,
        ng8: usize,
        bits: &'a [u8],
        codes: &'a [u8],
        scales: &'a [half::f16],
        mins: &'a [half::f16],
        pf: crate::cpu::QuantPrefetch,
    }

    /// 64 bytes of nibbles (element `2b` of the group low in byte `b`) from a 3-bit row's
    /// group of 128 codes: 48 bytes at `p`, 8 codes little-endian in each 3.
    #[inline(always)]
    unsafe fn spread3(p: *const u8) -> __m512i {
        // SAFETY: the caller's contract (48 readable bytes at p; the load masks the rest);
        // AVX-512 F/BW enabled by the caller.
        unsafe {
            let v = _mm512_maskz_loadu_epi8(0x0000_FFFF_FFFF_FFFF, p as *const i8);
            // 128-bit lane k: source bytes 12k..12k + 12 (dwords 3k..3k + 3).
            let v = _mm512_permutexvar_epi32(
                _mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0),
                v,
            );
            // Each dword: one run of 3 bytes (8 codes, code j at bits 3j..3j + 3).
            let [r0, r1, r2, r3] = SPREAD3_RUNS;
            let runs = _mm512_shuffle_epi8(v, _mm512_set4_epi32(r3, r2, r1, r0));
            // Codes 0..4 stay at bits 0..12, codes 4..8 move to bits 16..28; then each 12
            // bits to two 6-bit pairs at bytes; then each 6 bits to two codes at nibbles.
            let [(_, k0, m0), (_, k1, m1), (_, k2, m2)] = SPREAD3_STEPS;
            let x = spread_step::<{ SPREAD3_STEPS[0].0 }>(runs, k0, m0);
            let x = spread_step::<{ SPREAD3_STEPS[1].0 }>(x, k1, m1);
            spread_step::<{ SPREAD3_STEPS[2].0 }>(x, k2, m2)
        }
    }

    /// `(x & keep) | ((x & moved) << BY)` on each 32-bit lane. (A function, not a closure:
    /// closures do not inherit the caller's target features.)
    #[inline(always)]
    unsafe fn spread_step<const BY: u32>(x: __m512i, keep: i32, moved: i32) -> __m512i {
        // SAFETY: register-only; AVX-512 F enabled by the caller.
        unsafe {
            let k = _mm512_and_si512(x, _mm512_set1_epi32(keep));
            let m = _mm512_and_si512(x, _mm512_set1_epi32(moved));
            _mm512_or_si512(k, _mm512_slli_epi32::<BY>(m))
        }
    }

    /// The dot products of rows `r0..r0 + N` with the prepared x; `params` holds `8 · ng8`
    /// floats of room (each row's factors and mins).
    ///
    /// # Safety
    /// As [`gemv`], rows `r0..r0 + N` inside W.
    #[inline(always)]
    unsafe fn rows_n<const N: usize>(c: &Ctx<'_>, r0: usize, params: &mut [f32]) -> [f32; N] {
        let (m, ng, ng8) = (c.m, c.ng, c.ng8);
        let whole = m.inn / LOWER_GROUP;
        let (f, min) = params.split_at_mut(4 * ng8);
        let bits: [u8; N] = std::array::from_fn(|q| c.bits[r0 + q]);
        let codes: [&[u8]; N] = std::array::from_fn(|q| {
            &c.codes[m.offsets[r0 + q] as usize..m.offsets[r0 + q + 1] as usize]
        });
        let gbytes: [usize; N] = std::array::from_fn(|q| if bits[q] == 4 { 64 } else { 48 });
        let ahead = m.offsets[(r0 + PREFETCH_ROWS).min(m.out)] as usize;
        // SAFETY: (whole body) the CPU features are enabled by the caller; each row has ng
        // scales and mins (a run of 8 reads ng % 8 of them through a mask) and sx ng values;
        // f and min hold whole runs of 8 per row; for g < whole each row holds group g's 64
        // (4-bit) or 48 (3-bit) bytes at g · gbytes, and xd 128 bytes at g · 128; prefetches
        // never fault.
        unsafe {
            // f_g = scale_g · sx_g and min_g as f32 (exact conversions, one product each: the
            // reference's values).
            for q in 0..N {
                let (sc, mn) = (&c.scales[(r0 + q) * ng..], &c.mins[(r0 + q) * ng..]);
                for g0 in (0..ng).step_by(8) {
                    let n = (ng - g0).min(8);
                    let k: u8 = if n == 8 { 0xFF } else { (1u8 << n) - 1 };
                    let s8 = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(
                        k,
                        sc.as_ptr().add(g0) as *const i16,
                    ));
                    let m8 = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(
                        k,
                        mn.as_ptr().add(g0) as *const i16,
                    ));
                    let sxv = _mm256_maskz_loadu_ps(k, c.sx.as_ptr().add(g0));
                    _mm256_storeu_ps(f.as_mut_ptr().add(q * ng8 + g0), _mm256_mul_ps(s8, sxv));
                    _mm256_storeu_ps(min.as_mut_ptr().add(q * ng8 + g0), m8);
                }
            }
            let low4 = _mm512_set1_epi8(0x0f);
            let base = c.codes.as_ptr();
            let mut accv = [_mm512_setzero_ps(); N];
            for g in 0..whole {
                let xe = _mm512_loadu_si512(c.xd.as_ptr().add(g * 128) as *const _);
                let xo = _mm512_loadu_si512(c.xd.as_ptr().add(g * 128 + 64) as *const _);
                for q in 0..N {
                    prefetch_weights(c.pf, base.wrapping_add(ahead + (q * whole + g) * 48));
                    let p = codes[q].as_ptr().add(g * gbytes[q]);
                    let z = if bits[q] == 4 {
                        _mm512_loadu_si512(p as *const _)
                    } else {
                        spread3(p)
                    };
                    let lo = _mm512_and_si512(z, low4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(z), low4);
                    let sums = _mm512_dpbusd_epi32(
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe),
                        hi,
                        xo,
                    );
                    accv[q] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(sums),
                        _mm512_set1_ps(*f.get_unchecked(q * ng8 + g)),
                        accv[q],
                    );
                }
            }
            if whole < ng {
                // A partial last group: the reference's steps on each row's lanes.
                for (q, a) in accv.iter_mut().enumerate() {
                    let mut l = super::lanes(*a);
                    for g in whole..ng {
                        let fg = f[q * ng8 + g];
                        group_step_ref(bits[q], codes[q], m.inn, g, c.xd, fg, &mut l);
                    }
                    *a = _mm512_loadu_ps(l.as_ptr());
                }
            }
            // Folded here, not in a closure (closures do not inherit the target features).
            let folded = super::fold16_rows(&accv);
            std::array::from_fn(|q| folded[q] + min_term(&min[q * ng8..q * ng8 + ng], c.xs))
        }
    }
}

/// The int8 format's fused int8-activation GEMV at batch 1 ([`crate::int8::act8`]) on AVX-512
/// VNNI: per row and group of 128 two 64-byte loads of codes and two `vpdpbusd` against the
/// prepared x, one fused multiply-add per lane, four rows at a time: lane for lane the steps of
/// [`crate::int8::act8::dot_ref`], the same bits.
pub(crate) mod int8_int8 {
    use crate::act8::GROUP;
    use crate::cpu::{prefetch_weights, quant_prefetch, QuantPrefetch, PREFETCH_ROWS};
    use crate::int8::act8::{finish, group_step_ref, parts};
    use crate::int8::Int8Matrix;
    use std::arch::x86_64::*;

    /// `y[j] (+)= W[rows.start + j, :] · x'` (`x'` prepared by [`crate::int8::act8::prepare`]),
    /// four rows at a time (four independent chains, one load of x for the four), a row left
    /// over on its own (the same steps).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI, AVX2 and FMA; `prep` holds `prep_len(m.inn)` slots,
    /// `rows ⊆ 0..out`, `y.len() >= rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(crate) unsafe fn gemv(
        m: &Int8Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        // The matrix's parts once per call (each is a call through its shared owner).
        let ctx = Ctx {
            inn: m.inn,
            codes: m.codes.as_slice(),
            scales: m.scales.f32s(),
            zeros: m.zeros.f32s(),
            prep: parts(m.inn, prep),
            pf: quant_prefetch(),
        };
        crate::kernels::for_row_quads!(
            rows,
            // SAFETY: the caller's contract; the rows handed over lie inside W.
            |r| unsafe { rows_n::<4>(&ctx, r) },
            // SAFETY: the caller's contract; the rows handed over lie inside W.
            unsafe { rows_n::<1>(&ctx, r)[0] },
            crate::kernels::store_row(y, acc)
        );
    }

    /// `out[b · stride + j] = W[rows.start + j, :] · x'_b` for the `preps.len()` (2 to 8)
    /// prepared vectors (each from [`crate::int8::act8::prepare`]): a small
    /// batch with each row's codes loaded once for every vector, each (row, vector) through
    /// [`gemv`]'s steps, so its bits. `false`, with nothing written, for another count.
    ///
    /// # Safety
    /// As [`gemv`] for every prepared vector; `stride >= rows.len()` and
    /// `out.len() >= (preps.len() - 1) · stride + rows.len()`.
    pub(crate) unsafe fn gemv_batch(
        m: &Int8Matrix,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        with_batch_count!(preps, V, preps_v =>
            // SAFETY: the caller's contract, for the V vectors of the arm.
            unsafe { rows_batch::<V>(m, preps_v, rows, out, stride) }
        )
    }

    /// [`gemv_batch`] for `V` vectors, one row at a time (`V` accumulators). BigNet's int8
    /// format with int8 activations, 2 threads of the 2-core Xeon, three rounds in turns
    /// against one vector after another (the batch-1 kernel over the same 64-row tiles), ms,
    /// batch 2 / 3 / 4 / 5 / 7: 0.534–0.548 / 0.652–0.664 / 0.791–0.815 / 0.938–0.940 /
    /// 1.227–1.259 → 0.441–0.467 / 0.540–0.557 / 0.664–0.684 / 0.738–0.823 / 0.985–1.082.
    ///
    /// # Safety
    /// As [`gemv_batch`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    unsafe fn rows_batch<const V: usize>(
        m: &Int8Matrix,
        preps: [&[f32]; V],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) {
        let (inn, codes, pf) = (m.inn, m.codes.as_slice(), quant_prefetch());
        let (scales, zeros) = (m.scales.f32s(), m.zeros.f32s());
        let xs: [(&[i8], &[f32], f32); V] = std::array::from_fn(|v| parts(inn, preps[v]));
        let whole = inn / GROUP;
        for (j, r) in rows.enumerate() {
            // SAFETY: (whole body) the CPU features are enabled; row r holds 128 codes at
            // r · inn + g · 128 for g < whole and each xq 128 bytes at g · 128; prefetches never
            // fault.
            unsafe {
                let row = codes.as_ptr().add(r * inn);
                let mut acc = [_mm512_setzero_ps(); V];
                for g in 0..whole {
                    let (c0, c1) = group_codes(row.add(g * GROUP), inn, pf);
                    for (a, &(xq, sx, _)) in acc.iter_mut().zip(&xs) {
                        let x0 = _mm512_loadu_si512(xq.as_ptr().add(g * GROUP) as *const _);
                        let x1 = _mm512_loadu_si512(xq.as_ptr().add(g * GROUP + 64) as *const _);
                        step(c0, c1, x0, x1, _mm512_set1_ps(*sx.get_unchecked(g)), a);
                    }
                }
                let row_codes = &codes[r * inn..(r + 1) * inn];
                for (a, &(xq, sx, _)) in acc.iter_mut().zip(&xs) {
                    partial_group(row_codes, whole, xq, sx, a);
                }
                let folded = super::fold16_rows(&acc);
                for (v, (&f, &(_, _, total))) in folded.iter().zip(&xs).enumerate() {
                    out[v * stride + j] = finish(scales[r], zeros[r], f, total);
                }
            }
        }
    }

    /// A group's 128 codes of a row from `p` (two 64-byte loads), prefetching the same group
    /// [`PREFETCH_ROWS`] rows (of `inn` codes) ahead.
    ///
    /// # Safety
    /// AVX-512 F enabled by the caller; `p` holds 128 readable bytes.
    #[inline(always)]
    unsafe fn group_codes(p: *const u8, inn: usize, pf: QuantPrefetch) -> (__m512i, __m512i) {
        let ahead = p.wrapping_add(PREFETCH_ROWS * inn);
        prefetch_weights(pf, ahead);
        prefetch_weights(pf, ahead.wrapping_add(64));
        // SAFETY: the caller's contract.
        unsafe {
            (
                _mm512_loadu_si512(p as *const _),
                _mm512_loadu_si512(p.add(64) as *const _),
            )
        }
    }

    /// A whole group's step on one (row, vector) pair's 16 lanes: `a += P · s`, `P` the lane
    /// sums of the codes `c0`, `c1` against x's bytes `x0`, `x1` (two `vpdpbusd`), `s` x's
    /// scale of the group.
    ///
    /// # Safety
    /// AVX-512 F and VNNI enabled by the caller.
    #[inline(always)]
    unsafe fn step(c0: __m512i, c1: __m512i, x0: __m512i, x1: __m512i, s: __m512, a: &mut __m512) {
        // SAFETY: register work on the caller's target features.
        unsafe {
            let sums =
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, x0), c1, x1);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, *a);
        }
    }

    /// A partial last group of `row` (its codes), if x has one past the `whole` groups: the
    /// reference's steps on the lanes of `a`.
    ///
    /// # Safety
    /// AVX-512 F enabled by the caller.
    #[inline(always)]
    unsafe fn partial_group(row: &[u8], whole: usize, xq: &[i8], sx: &[f32], a: &mut __m512) {
        if whole < sx.len() {
            // SAFETY: register and stack work on the caller's target features.
            unsafe {
                let mut l = super::lanes(*a);
                for (g, &s) in sx.iter().enumerate().skip(whole) {
                    group_step_ref(row, row.len(), g, xq, s, &mut l);
                }
                *a = _mm512_loadu_ps(l.as_ptr());
            }
        }
    }

    /// What every row of a call reads: the matrix's parts and the prepared x's (`xq`, `sx`,
    /// `X`).
    struct Ctx<'a> {
        inn: usize,
        codes: &'a [u8],
        scales: &'a [f32],
        zeros: &'a [f32],
        prep: (&'a [i8], &'a [f32], f32),
        pf: crate::cpu::QuantPrefetch,
    }

    /// The dot products of rows `r0..r0 + N` with the prepared x.
    ///
    /// # Safety
    /// As [`gemv`], rows `r0..r0 + N` inside W.
    #[inline(always)]
    unsafe fn rows_n<const N: usize>(c: &Ctx<'_>, r0: usize) -> [f32; N] {
        let (inn, codes, pf) = (c.inn, c.codes, c.pf);
        let (xq, sx, total) = c.prep;
        let whole = inn / GROUP;
        // SAFETY: (whole body) the CPU features are enabled by the caller; for g < whole each
        // row r0 + q holds 128 codes at (r0 + q) · inn + g · 128 and xq 128 bytes at g · 128;
        // prefetches never fault.
        unsafe {
            let base = codes.as_ptr().add(r0 * inn);
            let mut accv = [_mm512_setzero_ps(); N];
            for g in 0..whole {
                let x0 = _mm512_loadu_si512(xq.as_ptr().add(g * GROUP) as *const _);
                let x1 = _mm512_loadu_si512(xq.as_ptr().add(g * GROUP + 64) as *const _);
                let s = _mm512_set1_ps(*sx.get_unchecked(g));
                for (q, a) in accv.iter_mut().enumerate() {
                    let (c0, c1) = group_codes(base.add(q * inn + g * GROUP), inn, pf);
                    step(c0, c1, x0, x1, s, a);
                }
            }
            for (q, a) in accv.iter_mut().enumerate() {
                let r = r0 + q;
                partial_group(&codes[r * inn..(r + 1) * inn], whole, xq, sx, a);
            }
            // Folded here, not in a closure (closures do not inherit the target features:
            // an intrinsic there is a call per row).
            let folded = super::fold16_rows(&accv);
            std::array::from_fn(|q| finish(c.scales[r0 + q], c.zeros[r0 + q], folded[q], total))
        }
    }
}
