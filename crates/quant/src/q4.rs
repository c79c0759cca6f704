//! Q4: the reference's 4-bit format (`q4_quantize` / `q4_dequantize` in `bignet_ref.py`),
//! bit-exact.
//!
//! Blocks of [`Q4_BLOCK`] = 16 consecutive weights of a row; when `in` is not a multiple of 16
//! the last block of each row is partial (its norm is the max over the elements it has). With
//! `n = max |v|` (f32):
//! `code = round_half_even((v + n) / (2n) * 15)`, computed in f32 in exactly that order; `n` is
//! rounded to f16 only for storage. Dequantizing uses the stored f16 `n` as f32:
//! `v' = ((code / 15) · 2) · n − n`.
//!
//! Storage (two packed arrays, as in the safetensors checkpoints):
//! - `packed`: u8 `[out, ceil(in/2)]`, element `2i` of a row in the low nibble of byte `i`,
//!   `2i+1` in the high nibble ([`BlockQ4`] is one block's 8 bytes); each row starts on a byte,
//!   and an odd `in` leaves the high nibble of the row's last byte 0;
//! - `norm`: f16 `[out, ceil(in/16)]`, little-endian.
//!
//! Special cases: an all-zero block stores `n = 0` and codes 0 (so `v' = 0`; the reference
//! would compute 0/0); a NaN/Inf weight is an error naming its (row, col); a block whose
//! `n` exceeds f16's largest finite value 65504 is an error
//! ([`QuantError::ScaleOverflow`]) rather than a clamp, because a clamped `n` would silently
//! move every weight of the block. A tiny `n` that rounds to 0 (or a subnormal) in f16 simply
//! dequantizes to that stored value.

use half::f16;
use nibble_tensor::Tensor;
use rayon::prelude::*;

use crate::bytes::{check_part, Bytes};
use crate::cpu::{kernel_path, usable, KernelPath};
use crate::error::{QuantError, Result};
use crate::kernels::{self, ColBlock, QuantRows};

/// Weights per Q4 block.
pub const Q4_BLOCK: usize = 16;

/// One block's codes: 16 nibbles, element `2i` in the low nibble of `qs[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4 {
    /// The packed codes.
    pub qs: [u8; Q4_BLOCK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4>() == 8);

const F16_MAX: f32 = 65504.0;

/// `(c / 15) · 2` for each code, exactly as the reference computes it.
fn lut() -> [f32; 16] {
    std::array::from_fn(|c| (c as f32 / 15.0) * 2.0)
}

fn fault(op: &'static str, row: usize, x: &[f32]) -> QuantError {
    for (c, &v) in x.iter().enumerate() {
        if !v.is_finite() {
            return QuantError::NonFinite {
                op,
                row,
                col: c,
                value: v,
            };
        }
    }
    for (b, blk) in x.chunks(Q4_BLOCK).enumerate() {
        let n = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        if n > F16_MAX {
            return QuantError::ScaleOverflow {
                op,
                row,
                col: b * Q4_BLOCK,
                value: n,
                storage: "f16",
            };
        }
    }
    QuantError::Shape {
        op,
        shape: vec![x.len()],
        what: "unexpected fault".into(),
    }
}

/// Scalar ground truth: quantizes one row `x` (any length; a partial last block of
/// `len % 16` weights) into `packed` (`ceil(len/2)` bytes) and `norm` (`ceil(len/16)`). `row`
/// only labels errors.
pub fn quantize_row_ref(row: usize, x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> Result<()> {
    check_row(x, packed, norm)?;
    if quantize_blocks_ref(x, packed, norm) {
        Ok(())
    } else {
        Err(fault("q4_quantize", row, x))
    }
}

/// The reference rule over the blocks of `x` (the last may be partial); `false` (for the
/// caller's error path) on a non-finite weight or an overflowing norm. Lengths as
/// [`quantize_row_ref`] checks them.
fn quantize_blocks_ref(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
    for (b, blk) in x.chunks(Q4_BLOCK).enumerate() {
        let mut n = 0.0f32;
        for &v in blk {
            if !v.is_finite() {
                return false;
            }
            n = n.max(v.abs());
        }
        if n > F16_MAX {
            return false;
        }
        norm[b] = f16::from_f32(n);
        let out = &mut packed[b * 8..b * 8 + blk.len().div_ceil(2)];
        if n == 0.0 {
            out.fill(0);
            continue;
        }
        let two = n + n;
        let code = |v: f32| ((v + n) / two * 15.0).round_ties_even() as u8;
        for (i, o) in out.iter_mut().enumerate() {
            let hi = blk.get(2 * i + 1).map_or(0, |&v| code(v));
            *o = code(blk[2 * i]) | (hi << 4);
        }
    }
    true
}

fn check_row(x: &[f32], packed: &[u8], norm: &[f16]) -> Result<()> {
    if packed.len() != x.len().div_ceil(2) || norm.len() != x.len().div_ceil(Q4_BLOCK) {
        return Err(QuantError::Shape {
            op: "q4_quantize_row",
            shape: vec![x.len(), packed.len(), norm.len()],
            what: "a row of len weights needs packed = ceil(len/2), norm = ceil(len/16)".into(),
        });
    }
    Ok(())
}

/// Quantizes one row with the given kernel path (bit-identical to [`quantize_row_ref`]).
pub fn quantize_row(
    path: KernelPath,
    row: usize,
    x: &[f32],
    packed: &mut [u8],
    norm: &mut [f16],
) -> Result<()> {
    check_row(x, packed, norm)?;
    // Whole blocks on the path's kernel, a partial last block by the reference rule.
    let full = x.len() / Q4_BLOCK * Q4_BLOCK;
    let (xf, xt) = x.split_at(full);
    let (pf, pt) = packed.split_at_mut(full / 2);
    let (nf, nt) = norm.split_at_mut(full / Q4_BLOCK);
    let whole = match usable(path) {
        KernelPath::Scalar => quantize_blocks_ref(xf, pf, nf),
        KernelPath::Portable => portable::quantize_row(xf, pf, nf),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2, so the CPU has AVX2, FMA and F16C; the slices hold
        // whole blocks (full/2 bytes, full/16 norms).
        KernelPath::Avx2Fma => unsafe { avx2::quantize_row(xf, pf, nf) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2Fma => portable::quantize_row(xf, pf, nf),
        // `usable` maps Avx512 to Avx2Fma (no 512-bit code here yet); portable is the safe fallback.
        KernelPath::Avx512 => portable::quantize_row(xf, pf, nf),
    };
    if whole && quantize_blocks_ref(xt, pt, nt) {
        Ok(())
    } else {
        Err(fault("q4_quantize", row, x))
    }
}

/// Scalar ground truth: dequantizes the weights of `out` (blocks of 16 from its start, the last
/// possibly partial) from their codes and norms. Weights whose code or norm is missing
/// (`packed` shorter than `ceil(len/2)`, `norm` than `ceil(len/16)`) are left untouched.
pub fn dequantize_ref(packed: &[u8], norm: &[f16], out: &mut [f32]) {
    let len = out.len().min(packed.len() * 2).min(norm.len() * Q4_BLOCK);
    for (b, o) in out[..len].chunks_mut(Q4_BLOCK).enumerate() {
        let n = norm[b].to_f32();
        for (e, w) in o.iter_mut().enumerate() {
            let c = ((packed[b * 8 + e / 2] >> (4 * (e % 2))) & 15) as f32;
            *w = ((c / 15.0) * 2.0) * n - n;
        }
    }
}

/// Dequantizes with the given path (bit-identical to [`dequantize_ref`], with the same
/// lengths): whole blocks on the path's kernel, a partial last block by the scalar code.
pub fn dequantize(path: KernelPath, packed: &[u8], norm: &[f16], out: &mut [f32]) {
    let len = out.len().min(packed.len() * 2).min(norm.len() * Q4_BLOCK);
    let nb = len / Q4_BLOCK;
    let (out, tail) = out[..len].split_at_mut(nb * Q4_BLOCK);
    dequantize_ref(&packed[nb * 8..], &norm[nb..], tail);
    let (packed, norm) = (&packed[..nb * 8], &norm[..nb]);
    match usable(path) {
        KernelPath::Scalar => dequantize_ref(packed, norm, out),
        KernelPath::Portable => portable::dequantize(packed, norm, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2, so the CPU has AVX2, FMA and F16C.
        KernelPath::Avx2Fma => unsafe { avx2::dequantize(packed, norm, out) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2Fma => portable::dequantize(packed, norm, out),
        // `usable` maps Avx512 to Avx2Fma (no 512-bit code here yet).
        KernelPath::Avx512 => dequantize(KernelPath::Avx2Fma, packed, norm, out),
    }
}

/// The old name of [`crate::act8::ActivationMode`] (Q4 was the first format with int8
/// activations; the mode now covers every format and batch size).
pub type Q4Activations = crate::act8::ActivationMode;

/// The old name of [`crate::act8::set_activations`].
pub fn set_q4_activations(mode: Q4Activations) {
    crate::act8::set_activations(mode);
}

/// The old name of [`crate::act8::activations`].
pub fn q4_activations() -> Q4Activations {
    crate::act8::activations()
}

mod portable {
    use super::*;
    use wide::f32x8;

    fn arr(s: &[f32]) -> f32x8 {
        f32x8::from(<[f32; 8]>::try_from(s).unwrap_or([0.0; 8]))
    }

    /// Returns false on a non-finite weight or an overflowing norm.
    pub(super) fn quantize_row(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
        for (b, blk) in x.chunks_exact(Q4_BLOCK).enumerate() {
            let (v0, v1) = (arr(&blk[..8]), arr(&blk[8..]));
            if !(v0.is_finite() & v1.is_finite()).all() {
                return false;
            }
            let n = v0
                .abs()
                .max(v1.abs())
                .to_array()
                .iter()
                .fold(0.0f32, |a, &v| a.max(v));
            if n > F16_MAX {
                return false;
            }
            norm[b] = f16::from_f32(n);
            let out = &mut packed[b * 8..b * 8 + 8];
            if n == 0.0 {
                out.fill(0);
                continue;
            }
            let (nv, two, fifteen) = (f32x8::splat(n), f32x8::splat(n + n), f32x8::splat(15.0));
            let q0 = ((v0 + nv) / two * fifteen).round().to_array();
            let q1 = ((v1 + nv) / two * fifteen).round().to_array();
            for i in 0..4 {
                out[i] = q0[2 * i] as u8 | ((q0[2 * i + 1] as u8) << 4);
                out[4 + i] = q1[2 * i] as u8 | ((q1[2 * i + 1] as u8) << 4);
            }
        }
        true
    }

    pub(super) fn dequantize(packed: &[u8], norm: &[f16], out: &mut [f32]) {
        let l = lut();
        for (b, (q, o)) in packed
            .chunks_exact(8)
            .zip(out.chunks_exact_mut(Q4_BLOCK))
            .enumerate()
        {
            let n = f32x8::splat(norm[b].to_f32());
            let mut c = [0.0f32; 16];
            for i in 0..8 {
                c[2 * i] = l[(q[i] & 15) as usize];
                c[2 * i + 1] = l[(q[i] >> 4) as usize];
            }
            let r0 = (arr(&c[..8]) * n - n).to_array();
            let r1 = (arr(&c[8..]) * n - n).to_array();
            o[..8].copy_from_slice(&r0);
            o[8..].copy_from_slice(&r1);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::kernels::avx2::{f16_to_f32, hmax, hsum, lut16};
    use crate::kernels::for_row_quads;
    use std::arch::x86_64::*;

    /// The GEMV kernels prefetch each row's codes and norms this many rows ahead (one 4-row
    /// sweep, as the f32 GEMV does).
    const Q4_PF_ROWS: usize = 4;

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
    pub(super) unsafe fn quantize_row(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
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
        let finite =
            _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(sum, absm), _mm256_set1_ps(f32::MAX));
        let fits = _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_set1_ps(F16_MAX));
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
                    let q =
                        _mm256_mul_ps(_mm256_div_ps(_mm256_add_ps(v[2 * b + k], nb), two), fifteen);
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
            if n > F16_MAX {
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
    pub(super) unsafe fn dequantize(packed: &[u8], norm: &[f16], out: &mut [f32]) {
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
    pub(super) unsafe fn gemv(
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
            |j: usize, _row: usize, v: f32| y[j] = if acc { y[j] + v } else { v }
        );
    }

    /// Dot products of rows `r0..r0+R` (all `< out`, checked by the caller) with x.
    #[inline(always)]
    unsafe fn dot_rows<const R: usize>(m: &Q4Matrix, r0: usize, prep: &[f32]) -> [f32; R] {
        let nb = m.inn / Q4_BLOCK;
        let (xp, sums) = (prep.as_ptr(), prep.as_ptr().add(m.inn));
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s();
        let mask = _mm256_set1_epi32(15);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut corr = [_mm256_setzero_ps(); R];
        let mut nf = [[0.0f32; 8]; R];
        let mut b = 0;
        while b < nb {
            let nblk = (nb - b).min(8);
            for r in 0..R {
                // Prefetch the same blocks 4 rows on (the next 4-row sweep; never faults),
                // non-temporal: the weights are read once per forward (see act8.rs).
                let ahead = (r0 + r + Q4_PF_ROWS) * nb + b;
                _mm_prefetch::<_MM_HINT_NTA>(packed.wrapping_add(ahead * 8) as *const i8);
                _mm_prefetch::<_MM_HINT_NTA>(norms.as_ptr().wrapping_add(ahead) as *const i8);
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
    pub(super) unsafe fn dequant_cols(m: &Q4Matrix, b: ColBlock, dst: &mut [f32]) {
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
}

/// A Q4-quantized `out x in` weight matrix (see the [module docs](self) for the format).
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Matrix {
    out: usize,
    inn: usize,
    packed: Bytes,
    norm: Bytes,
}

impl Q4Matrix {
    /// Quantizes an `out x in` f32 matrix (any shape; see the [module docs](self) for a
    /// partial last block) with the detected kernel path.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        Self::quantize_with(w, kernel_path())
    }

    /// Quantizes with an explicit kernel path (rows in parallel; identical results on every
    /// path and thread count).
    pub fn quantize_with(w: &Tensor, path: KernelPath) -> Result<Self> {
        let (o, i) = w.dims2("q4_quantize")?;
        let (row_bytes, row_blocks) = (i.div_ceil(2), i.div_ceil(Q4_BLOCK));
        let mut packed = vec![0u8; o * row_bytes];
        let mut norm = vec![f16::ZERO; o * row_blocks];
        if i > 0 {
            let res: Vec<Result<()>> = w
                .data()
                .par_chunks(i)
                .zip(packed.par_chunks_mut(row_bytes))
                .zip(norm.par_chunks_mut(row_blocks))
                .enumerate()
                .with_min_len(8)
                .map(|(r, ((x, p), n))| quantize_row(path, r, x, p, n))
                .collect();
            kernels::first_error(res)?;
        }
        Ok(Q4Matrix {
            out: o,
            inn: i,
            packed: Bytes::from_vec(packed),
            norm: Bytes::from_f16(norm),
        })
    }

    /// Builds from raw parts: `packed` u8 `[out, ceil(in/2)]`, `norm` f16 `[out, ceil(in/16)]`
    /// (little-endian). Borrowed parts stay borrowed; a misaligned `norm` is copied.
    pub fn from_parts(out: usize, inn: usize, packed: Bytes, norm: Bytes) -> Result<Self> {
        const OP: &str = "Q4Matrix::from_parts";
        let size = |per_row: usize, elem: usize| {
            out.checked_mul(per_row)
                .and_then(|v| v.checked_mul(elem))
                .ok_or_else(|| QuantError::Shape {
                    op: OP,
                    shape: vec![out, inn],
                    what: "size overflows".into(),
                })
        };
        check_part(OP, "packed", out, inn, &packed, size(inn.div_ceil(2), 1)?)?;
        check_part(
            OP,
            "norm",
            out,
            inn,
            &norm,
            size(inn.div_ceil(Q4_BLOCK), 2)?,
        )?;
        Ok(Q4Matrix {
            out,
            inn,
            packed,
            norm: norm.aligned(2),
        })
    }

    /// Rows (`out`) and columns (`in`).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inn)
    }

    /// The raw `packed` part (u8 `[out, ceil(in/2)]`).
    pub fn packed_bytes(&self) -> &[u8] {
        self.packed.as_slice()
    }

    /// The raw `norm` part (f16 `[out, ceil(in/16)]`, little-endian bytes).
    pub fn norm_bytes(&self) -> &[u8] {
        self.norm.as_slice()
    }

    /// The block norms.
    pub fn norms(&self) -> &[f16] {
        self.norm.f16s()
    }

    /// The `(packed, norm)` buffers (to share or write them).
    pub fn parts(&self) -> (&Bytes, &Bytes) {
        (&self.packed, &self.norm)
    }

    /// Bits per weight, scales included (5.0).
    pub fn bits_per_weight(&self) -> f64 {
        self.parts_len() as f64 * 8.0 / (self.out * self.inn).max(1) as f64
    }

    /// The whole matrix dequantized with an explicit kernel path.
    pub fn dequantize_with(&self, path: KernelPath) -> Tensor {
        kernels::to_f32(self, path)
    }

    /// Batch-1 `y (+)= W · x` with int8 activations (what `matmul_t` runs under
    /// [`crate::act8::ActivationMode::Int8`]), on the detected tier.
    ///
    /// x is quantized per 128 elements to `round(x · 127 / max|x|)`, so each row's result
    /// carries an extra error of at most `Σ_k |w'_k| · max|x|_group(k) / 254` (see
    /// [`crate::act8`]); the inner product runs in exact integer arithmetic. An x with a NaN or
    /// infinity goes through the f32 path, so that it propagates exactly as there.
    ///
    /// Shapes: `x` `[in]`, `y` `[out]`; any other length is an error.
    pub fn gemv_int8(&self, x: &[f32], y: &mut [f32], accumulate: bool) -> Result<()> {
        self.gemv_int8_with(kernel_path(), x, y, accumulate)
    }

    /// [`Q4Matrix::gemv_int8`] on an explicit kernel path (every path gives the same bits).
    pub fn gemv_int8_with(
        &self,
        path: KernelPath,
        x: &[f32],
        y: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        if x.len() != self.inn || y.len() != self.out {
            return Err(QuantError::Shape {
                op: "Q4Matrix::gemv_int8",
                shape: vec![self.out, self.inn, x.len(), y.len()],
                what: "x must have `in` elements and y `out`".into(),
            });
        }
        let tier = crate::act8::IntTier::for_path(path);
        if !crate::act8::forward(tier, self, x, 1, y, accumulate) {
            kernels::matmul_t(self, x, 1, y, accumulate)?;
        }
        Ok(())
    }

    fn parts_len(&self) -> usize {
        self.packed.len() + self.norm.len()
    }

    /// Bytes of one row of `packed` (`ceil(in/2)`).
    fn row_bytes(&self) -> usize {
        self.inn.div_ceil(2)
    }

    /// Blocks (norms) of one row (`ceil(in/16)`).
    fn row_blocks(&self) -> usize {
        self.inn.div_ceil(Q4_BLOCK)
    }
}

impl QuantRows for Q4Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    /// f32 activations: the GEMV wins up to 4 vectors (1024², 2 threads, GEMVs against tiles:
    /// m = 4 0.47 / 0.55 ms, m = 6 0.73 / 0.58 ms).
    fn tiles_min_m(&self) -> usize {
        5
    }
    fn act8_view(&self) -> Option<&dyn crate::act8::IntCodes> {
        Some(self)
    }
    fn seg_align(&self) -> usize {
        Q4_BLOCK
    }
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]) {
        // c0 is a multiple of 16, so the segment starts on a byte and a block of row r.
        let (pb, nb) = (r * self.row_bytes(), r * self.row_blocks());
        dequantize(
            path,
            &self.packed.as_slice()[pb + c0 / 2..pb + (c0 + len).div_ceil(2)],
            &self.norms()[nb + c0 / Q4_BLOCK..nb + (c0 + len).div_ceil(Q4_BLOCK)],
            &mut dst[..len],
        );
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dequant_cols_avx2(&self, b: ColBlock, dst: &mut [f32]) -> bool {
        // SAFETY: the trait's contract (AVX2/FMA/F16C; the request fits in whole blocks).
        unsafe { avx2::dequant_cols(self, b, dst) };
        true
    }
    /// AVX2 path: appends x with each block of 16 reordered as its 8 even then 8 odd
    /// elements (the low / high nibbles of the block's bytes), then the `in/16` block sums.
    fn gemv_prepare(&self, path: KernelPath, x: &[f32], prep: &mut Vec<f32>) {
        if usable(path) == KernelPath::Avx2Fma && self.inn % Q4_BLOCK == 0 {
            // (A ragged `in` takes the generic GEMV, which needs no preparation.)
            kernels::push_even_odd16(x, prep);
            prep.extend(x.chunks_exact(Q4_BLOCK).map(|c| c.iter().sum::<f32>()));
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv_avx2(
        &self,
        _x: &[f32],
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) -> bool {
        if self.inn % Q4_BLOCK == 0 && prep.len() == self.inn + self.inn / Q4_BLOCK {
            // SAFETY: the trait's contract (AVX2/FMA/F16C; rows and y checked) and this prep.
            unsafe { avx2::gemv(self, prep, rows, y, acc) };
        } else {
            return false;
        }
        true
    }
}

/// Int8 activations: codes 0..15 in units of one block, `w' = (2n/15) · c − n`.
impl crate::act8::IntCodes for Q4Matrix {
    fn int_dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn int_layout(&self) -> Option<crate::act8::IntLayout> {
        Some(crate::act8::IntLayout {
            unit: Q4_BLOCK,
            kind: crate::act8::CodeKind::Nibble,
        })
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        let row = &self.packed.as_slice()[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        crate::act8::unpack_nibbles_low_first(row, &mut dst[..self.inn]);
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        let nb = self.row_blocks();
        crate::act8::f16_to_f32(&self.norms()[r * nb..(r + 1) * nb], &mut offset[..nb]);
        for (s, o) in scale[..nb].iter_mut().zip(&mut offset[..nb]) {
            (*s, *o) = (*o * (2.0 / 15.0), -*o);
        }
    }
}

kernels::impl_weight_matrix!(Q4Matrix, "q4");
