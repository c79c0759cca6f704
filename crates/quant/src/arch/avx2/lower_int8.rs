//! The 256-bit tier of lower's fused int8-activation GEMV ([`crate::lower::act8`]: the prepared
//! x, the scalar reference [`crate::lower::act8::dot_ref`] and the dispatch), on AVX-VNNI
//! (`vpdpbusd` on ymm) and on plain AVX2 (`vpmaddubsw` pairs summed in i16, widened by
//! `vpmaddwd`: a nibble times an int8 is at most `15 · 128` in magnitude, a lane's four products
//! at most 7680, so the i16 sums are exact).
//!
//! A row's 16 f32 lanes are those of the AVX-512 VNNI kernel ([`crate::arch::avx512::lower_int8`])
//! held as two ymm: lane `l` is dword `l` of a group's 64-byte word of nibbles (element `2b` in
//! the low nibble of byte `b`, element `2b + 1` in the high one), bytes `0..32` in lanes 0–7 and
//! bytes `32..64` in lanes 8–15; x's even elements (the group's bytes `0..64` of `xd`) and odd
//! ones (`64..128`) split the same way. A 4-bit row's group is two 32-byte loads; a 3-bit row's
//! 48 bytes are 24 per ymm (two 32-byte loads inside the group, at bytes 0 and 16), spread by
//! `vpermd` and `vpshufb` to one run of 8 codes (3 bytes) per dword and moved to nibbles by
//! the AVX-512 kernel's three shift-and-mask steps. Each lane's integer sum covers the same
//! eight products (exact), is converted and added by one fused multiply-add per group in group
//! order with the factor `scale_g · sx_g`, a partial last group runs the reference's steps on
//! the lanes, the lanes fold in [`crate::act8::fold16`]'s tree and the min term is added last:
//! the same bits as the AVX-512 kernel and the reference.
//!
//! Shapes: W `out x in` (any `in`; row `r`'s codes `codes[offsets[r]..offsets[r + 1]]`, 3 or 4
//! bits a code, `ceil(in · bits / 8)` bytes: 48 or 64 per whole group, the rows one after
//! another in one buffer), `scales` and `mins` `[out, ceil(in/128)]` (f16), `prep`
//! `[prep_len(in)]` from [`crate::lower::act8::prepare`], `rows ⊆ 0..out`, `y` `[rows.len()]`:
//! `y[j] (+)= W[r, :] · x'` for row `r = rows.start + j`; small batches (2 to 8 vectors):
//! `out[v · stride + j]`. The rows' scales and mins become f32 once per call; then row after
//! row, one sweep over its groups per part of at most four vectors (batch 1: one part of one),
//! the row's width chosen once per sweep (a loop for 4-bit rows, one for 3-bit rows); per
//! group: two 32-byte loads (and for a 3-bit row the spread), then per vector four byte-dot
//! steps, two conversions and two fused multiply-adds. (Not the AVX-512 kernel's four rows at
//! a time: with two widths to branch on per row and group, the compiler kept that loop rolled
//! with the accumulators on the stack, 2.3x this sweep's time on one 1024² layer.)

use super::{batch_parts, finish_lanes, fused_gemv_entry_points, part_lanes, Lanes16};
use crate::act8::avx2::ByteDot;
use crate::cpu::{prefetch_weights, quant_prefetch, QuantPrefetch, PREFETCH_ROWS};
use crate::lower::act8::{group_step_ref, groups, min_term, parts, SPREAD3_RUNS, SPREAD3_STEPS};
use crate::lower::{LowerMatrix, LOWER_GROUP};
use std::arch::x86_64::*;

fused_gemv_entry_points!(LowerMatrix, crate::act8::avx2::Maddubs);

/// A group's 64-byte word of nibbles as two ymm (bytes 0–31, 32–63) from its codes at `p` in a
/// row of `BITS` (3 or 4) bits a code: a 4-bit row's 64 bytes as they lie, a 3-bit row's 48
/// bytes spread ([`spread3`]).
///
/// # Safety
/// AVX2 enabled by the caller; `p` holds the group's `16 · BITS` readable bytes.
#[inline(always)]
unsafe fn group_nibbles<const BITS: u8>(p: *const u8) -> [__m256i; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        if BITS == 4 {
            [
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
            ]
        } else {
            // Half 0: source bytes 0..24 (dwords 0..6 of the load at 0), half 1: bytes 24..48
            // (dwords 2..8 of the load at 16); both loads lie inside the group's 48 bytes.
            let a = _mm256_loadu_si256(p as *const __m256i);
            let b = _mm256_loadu_si256(p.add(16) as *const __m256i);
            [
                spread3(a, _mm256_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0)),
                spread3(b, _mm256_setr_epi32(2, 3, 4, 0, 5, 6, 7, 0)),
            ]
        }
    }
}

/// 32 bytes of nibbles from 24 bytes of 3-bit codes (8 codes little-endian in each 3), the
/// dwords of `v` that hold them picked by `pick` so that 128-bit lane `k` holds the 12 bytes
/// `12k..12k + 12` in its first three dwords: each dword then takes one run of 3 bytes
/// ([`SPREAD3_RUNS`], the AVX-512 kernel's pattern in each 128-bit lane) and its 8 codes move
/// to nibbles by the AVX-512 kernel's three steps ([`SPREAD3_STEPS`]).
///
/// # Safety
/// AVX2 enabled by the caller.
#[inline(always)]
unsafe fn spread3(v: __m256i, pick: __m256i) -> __m256i {
    // SAFETY: register work on the caller's target features.
    unsafe {
        let v = _mm256_permutevar8x32_epi32(v, pick);
        let [r0, r1, r2, r3] = SPREAD3_RUNS;
        let runs = _mm256_shuffle_epi8(v, _mm256_setr_epi32(r0, r1, r2, r3, r0, r1, r2, r3));
        let [(_, k0, m0), (_, k1, m1), (_, k2, m2)] = SPREAD3_STEPS;
        let x = spread_step::<{ SPREAD3_STEPS[0].0 as i32 }>(runs, k0, m0);
        let x = spread_step::<{ SPREAD3_STEPS[1].0 as i32 }>(x, k1, m1);
        spread_step::<{ SPREAD3_STEPS[2].0 as i32 }>(x, k2, m2)
    }
}

/// `(x & keep) | ((x & moved) << BY)` on each 32-bit lane.
///
/// # Safety
/// AVX2 enabled by the caller.
#[inline(always)]
unsafe fn spread_step<const BY: i32>(x: __m256i, keep: i32, moved: i32) -> __m256i {
    // SAFETY: register work on the caller's target features.
    unsafe {
        let k = _mm256_and_si256(x, _mm256_set1_epi32(keep));
        let m = _mm256_and_si256(x, _mm256_set1_epi32(moved));
        _mm256_or_si256(k, _mm256_slli_epi32::<BY>(m))
    }
}

/// The low and the high nibbles of a group's word `z` as bytes: `[low 0, low 1, high 0, high
/// 1]` (halves 0 and 1), the operands for x's even and odd elements.
///
/// # Safety
/// AVX2 enabled by the caller.
#[inline(always)]
unsafe fn split_nibbles(z: [__m256i; 2]) -> [__m256i; 4] {
    // SAFETY: register work on the caller's target features.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        [
            _mm256_and_si256(z[0], low4),
            _mm256_and_si256(z[1], low4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(z[0]), low4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(z[1]), low4),
        ]
    }
}

/// Group `g`'s 128 bytes of x (`xd`, a whole preparation's bytes) as four ymm: the even
/// elements' halves 0 and 1, then the odd elements'.
///
/// # Safety
/// AVX2 enabled by the caller; `xd` holds group `g`.
#[inline(always)]
unsafe fn load_x(xd: &[i8], g: usize) -> [__m256i; 4] {
    // SAFETY: the caller's contract: 128 bytes at g · 128.
    unsafe {
        let p = xd.as_ptr().add(g * LOWER_GROUP) as *const __m256i;
        [
            _mm256_loadu_si256(p),
            _mm256_loadu_si256(p.add(1)),
            _mm256_loadu_si256(p.add(2)),
            _mm256_loadu_si256(p.add(3)),
        ]
    }
}

/// A whole group's step on one (row, vector) pair's lanes: half `h` adds `P_h · f`, `P_h` the
/// lane sums of the nibbles `c` ([`split_nibbles`]) against x's bytes `x` ([`load_x`]): low
/// nibbles by the even elements, high ones by the odd ones (the AVX-512 kernel's two
/// `vpdpbusd` as one run of two steps per half).
///
/// # Safety
/// `D`'s CPU features, AVX2 and FMA enabled by the caller.
#[inline(always)]
unsafe fn step<D: ByteDot>(c: &[__m256i; 4], x: &[__m256i; 4], f: f32, a: &mut Lanes16) {
    // SAFETY: register work on the caller's target features.
    unsafe {
        let (z, fv) = (_mm256_setzero_si256(), _mm256_set1_ps(f));
        for (h, ah) in a.iter_mut().enumerate() {
            let run = D::run_add(D::run_start(z, c[h], x[h]), c[2 + h], x[2 + h]);
            let sums = D::run_end(run, z);
            *ah = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), fv, *ah);
        }
    }
}

/// A prepared vector's parts ([`parts`]): `xd`, `sx` and `sx_g · Q_g`.
type XParts<'a> = (&'a [i8], &'a [f32], &'a [f32]);

/// Batch 1 on the step `D` (the entry points' body): row after row, each one sweep
/// ([`Sweep::row`]) and its finish ([`Sweep::finish`]).
///
/// # Safety
/// `D`'s CPU features, AVX2 and FMA; the shapes of the module docs.
#[inline(always)]
unsafe fn gemv_with<D: ByteDot>(
    m: &LowerMatrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    let sweep = Sweep::new(m);
    let params = RowParams::take(m, rows.clone());
    let x = [parts(m.inn, prep)];
    let mut put = crate::kernels::store_row(y, acc);
    for (j, r) in rows.enumerate() {
        let (scale, min) = params.row(j);
        // SAFETY: the caller's contract: row r lies inside W, prep is a whole preparation of
        // its width; the CPU features are enabled.
        let v = unsafe {
            let a = sweep.row::<D, 1>(r, scale, &x);
            sweep.finish(&a[0], r, scale, min, x[0])
        };
        put(j, r, v);
    }
    params.give_back();
}

/// 2 to 8 vectors on the step `D` (the entry points' body): each row's scales and mins as f32
/// once per call ([`RowParams`]), each vector's factors `scale_g · sx_g` formed from them as
/// batch 1 forms them (one product each); each row in parts of at most four vectors (sizes
/// differing by at most one), each part one sweep over the row's codes with its accumulators
/// in registers.
///
/// # Safety
/// As the small-batch entry points', with `D`'s CPU features.
#[inline(always)]
unsafe fn rows_batch<D: ByteDot, const V: usize>(
    m: &LowerMatrix,
    preps: [&[f32]; V],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let xs: [XParts<'_>; V] = std::array::from_fn(|v| parts(m.inn, preps[v]));
    let sweep = Sweep::new(m);
    let params = RowParams::take(m, rows.clone());
    for (j, r) in rows.enumerate() {
        let (scale, min) = params.row(j);
        for vs in batch_parts(V) {
            let (v0, part) = (vs.start, &xs[vs]);
            let acc: [Lanes16; 4] = part_lanes!(part.len(), P => {
                // SAFETY: the caller's contract: row r lies inside W, each prep is a whole
                // preparation of this width; the CPU features are enabled.
                unsafe { sweep.row::<D, P>(r, scale, part) }
            });
            for (q, &x) in part.iter().enumerate() {
                // SAFETY: the CPU features are enabled by the caller; row r inside W.
                out[(v0 + q) * stride + j] = unsafe { sweep.finish(&acc[q], r, scale, min, x) };
            }
        }
    }
    params.give_back();
}

/// The scales and mins of a call's rows as f32 (exact conversions, one pass each), in the
/// thread's row scratch ([`crate::kernels::take_row_scales`]): `[rows, ng]` scales, then as
/// many mins.
struct RowParams {
    v: Vec<f32>,
    ng: usize,
    rows: usize,
}

impl RowParams {
    /// Rows `rows` of `m` (inside it).
    fn take(m: &LowerMatrix, rows: std::ops::Range<usize>) -> RowParams {
        let (ng, n) = (groups(m.inn), rows.len());
        let mut v = crate::kernels::take_row_scales(2 * n * ng);
        let (scale, min) = v.split_at_mut(n * ng);
        let span = rows.start * ng..rows.end * ng;
        crate::act8::f16_to_f32(&m.scales.f16s()[span.clone()], scale);
        crate::act8::f16_to_f32(&m.mins.f16s()[span], min);
        RowParams { v, ng, rows: n }
    }

    /// The `j`-th row's scales and mins.
    fn row(&self, j: usize) -> (&[f32], &[f32]) {
        let (ng, n) = (self.ng, self.rows);
        (
            &self.v[j * ng..(j + 1) * ng],
            &self.v[(n + j) * ng..(n + j + 1) * ng],
        )
    }

    /// Returns the storage to the thread's scratch.
    fn give_back(self) {
        crate::kernels::put_row_scales(self.v);
    }
}

/// What the sweeps of a call read: the matrix's parts (once per call: each is a call through
/// its shared owner), its group counts and the prefetch.
struct Sweep<'a> {
    m: &'a LowerMatrix,
    bits: &'a [u8],
    codes: &'a [u8],
    ng: usize,
    whole: usize,
    pf: QuantPrefetch,
}

impl<'a> Sweep<'a> {
    /// The sweeps over `m`.
    fn new(m: &'a LowerMatrix) -> Self {
        Sweep {
            m,
            bits: m.bits.as_slice(),
            codes: m.codes.as_slice(),
            ng: groups(m.inn),
            whole: m.inn / LOWER_GROUP,
            pf: quant_prefetch(),
        }
    }

    /// Row `r`'s codes.
    fn codes(&self, r: usize) -> &'a [u8] {
        &self.codes[self.m.offsets[r] as usize..self.m.offsets[r + 1] as usize]
    }

    /// Row `r`'s whole groups against the `P` prepared vectors of `xs` (`xs.len() == P`),
    /// `scale` the row's scales: their lanes before the partial group, the fold and the min
    /// term.
    ///
    /// # Safety
    /// `D`'s CPU features, AVX2 and FMA; row `r` inside W; each of `xs` a whole preparation of
    /// W's width.
    #[inline(always)]
    unsafe fn row<D: ByteDot, const P: usize>(
        &self,
        r: usize,
        scale: &[f32],
        xs: &[XParts<'_>],
    ) -> [Lanes16; P] {
        let codes = self.codes(r).as_ptr();
        // The same part of the row PREFETCH_ROWS on (past the end: the prefetch never faults).
        let ahead = self
            .codes
            .as_ptr()
            .wrapping_add(self.m.offsets[(r + PREFETCH_ROWS).min(self.m.out)] as usize);
        // SAFETY: the caller's contract; the row's codes hold its whole groups' bytes.
        unsafe {
            if self.bits[r] == 4 {
                self.groups::<D, P, 4>(codes, ahead, scale, xs)
            } else {
                self.groups::<D, P, 3>(codes, ahead, scale, xs)
            }
        }
    }

    /// [`Sweep::row`] for a row of `BITS` bits a code at `codes`, prefetching from `ahead`.
    ///
    /// # Safety
    /// As [`Sweep::row`]; `codes` holds the row's whole groups (`16 · BITS` bytes each).
    #[inline(always)]
    unsafe fn groups<D: ByteDot, const P: usize, const BITS: u8>(
        &self,
        codes: *const u8,
        ahead: *const u8,
        scale: &[f32],
        xs: &[XParts<'_>],
    ) -> [Lanes16; P] {
        let gbytes = 16 * BITS as usize;
        // SAFETY: (whole body) the caller's contract: for g < whole the row holds group g's
        // gbytes bytes at g · gbytes, each xd 128 bytes at g · 128, each sx and the row's
        // scales a value per group; prefetches never fault.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; P];
            for g in 0..self.whole {
                prefetch_weights(self.pf, ahead.wrapping_add(g * 64));
                let nib = split_nibbles(group_nibbles::<BITS>(codes.add(g * gbytes)));
                let s = *scale.get_unchecked(g);
                for (a, &(xd, sx, _)) in acc.iter_mut().zip(xs) {
                    step::<D>(&nib, &load_x(xd, g), s * *sx.get_unchecked(g), a);
                }
            }
            acc
        }
    }

    /// Row `r`'s result for the vector `x` from its lanes `a` after the whole groups: a
    /// partial last group by the reference's step, the fold, then the min term (`scale` and
    /// `min` the row's).
    ///
    /// # Safety
    /// AVX2 enabled by the caller; row `r` inside W; `x` a whole preparation of W's width.
    #[inline(always)]
    unsafe fn finish(
        &self,
        a: &Lanes16,
        r: usize,
        scale: &[f32],
        min: &[f32],
        x: XParts<'_>,
    ) -> f32 {
        let (xd, sx, xsum) = x;
        let (bits, codes, inn) = (self.bits[r], self.codes(r), self.m.inn);
        let step = |g: usize, l: &mut [f32; 16]| {
            group_step_ref(bits, codes, inn, g, xd, scale[g] * sx[g], l)
        };
        // SAFETY: the caller's target features.
        let folded = unsafe { finish_lanes(a, self.whole..self.ng, step) };
        folded + min_term(min, xsum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act8::{check_batch_kernel, check_fused_kernel, has_avxvnni};
    use crate::lower::act8::{dot_ref, prepare, FUSED};
    use nibble_tensor::{Rng, Tensor};

    type BatchKernel = crate::act8::FusedBatchKernel<LowerMatrix>;

    /// Partial last groups alone (1, 7, 127), whole groups (128, 256, 384, 1024) and both
    /// (129, 255, 1023).
    const WIDTHS: [usize; 10] = [1, 7, 127, 128, 129, 255, 256, 384, 1023, 1024];

    /// The matrix of `w` at the default budget (rows of both widths), and all-3-bit and
    /// all-4-bit ones (the last row of each 3-bit or 4-bit).
    fn quantize(w: &Tensor) -> Vec<LowerMatrix> {
        vec![
            LowerMatrix::quantize(w).unwrap(),
            LowerMatrix::quantize_bits(w, 3.0).unwrap(),
            LowerMatrix::quantize_bits(w, 64.0).unwrap(),
        ]
    }

    /// `quantize` gives all-3-bit and all-4-bit matrices besides the mixed one (else the
    /// kernels' last-row and width cases would go unchecked).
    #[test]
    fn test_matrices_have_the_widths_asked() {
        let w = Tensor::uniform(&[33, 1024], -0.4, 0.4, &mut Rng::new(7));
        let ms = quantize(&w);
        let bits: Vec<&[u8]> = ms.iter().map(|m| m.bits.as_slice()).collect();
        assert!(
            bits[0].contains(&3) && bits[0].contains(&4),
            "{:?}",
            bits[0]
        );
        assert!(bits[1].iter().all(|&b| b == 3), "{:?}", bits[1]);
        assert!(bits[2].iter().all(|&b| b == 4), "{:?}", bits[2]);
    }

    /// The 256-bit batch-1 kernels against the reference bit for bit on awkward widths
    /// ([`check_fused_kernel`]'s shapes: an all-zero group, ±extremes of x, a constant row,
    /// y pre-filled with NaN, written and accumulated), rows mixing 3-bit and 4-bit widths and
    /// matrices of one width (a last row of 3 bits: reads must stay inside the codes): the
    /// AVX2 one on any AVX2 CPU, the AVX-VNNI one where the CPU has it (else a printed skip).
    #[test]
    fn kernels_match_the_reference() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("lower int8 GEMV: 256-bit kernels skipped (this CPU lacks AVX2)");
            return;
        }
        // SAFETY: the CPU has AVX2 and FMA (checked).
        unsafe { check_fused_kernel(&FUSED, "AVX2", gemv_avx2, &WIDTHS, quantize) };
        if has_avxvnni() {
            // SAFETY: the CPU has AVX-VNNI too (checked).
            unsafe { check_fused_kernel(&FUSED, "AVX-VNNI", gemv_avxvnni, &WIDTHS, quantize) };
        } else {
            println!("lower int8 GEMV: AVX-VNNI kernel skipped (this CPU lacks AVX-VNNI)");
        }
    }

    /// The 256-bit batch kernels give every (row, vector) the reference's bits: 2 to 8 vectors
    /// (parts of one and two sweeps), an all-zero vector and one of ±extremes (x's int8 at
    /// ±127), widths with partial groups, mixed and single-width matrices, rows from inside
    /// the matrix and up to its last row, outputs pre-filled with NaN; 1 and 9 vectors are
    /// declined.
    #[test]
    fn batch_kernels_give_each_vector_the_reference_bits() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("lower int8 batch GEMV: 256-bit kernels skipped (this CPU lacks AVX2)");
            return;
        }
        let mut kernels: Vec<(&str, BatchKernel)> = vec![("AVX2", gemv_batch_avx2)];
        if has_avxvnni() {
            kernels.push(("AVX-VNNI", gemv_batch_avxvnni));
        } else {
            println!("lower int8 batch GEMV: AVX-VNNI kernel skipped (this CPU lacks AVX-VNNI)");
        }
        for &inn in &WIDTHS {
            let out = 13;
            let w = Tensor::uniform(&[out, inn], -0.4, 0.4, &mut Rng::new(inn as u64));
            let preps: Vec<Vec<f32>> = (0..9)
                .map(|v| {
                    let mut x = Tensor::randn(&[inn], &mut Rng::new(300 + v)).into_vec();
                    match v {
                        1 => x.fill(0.0),
                        // ±1 (every third −1): every group's int8 values ±127.
                        2 => x.iter_mut().enumerate().for_each(|(k, t)| {
                            *t = if k % 3 == 0 { -1.0 } else { 1.0 };
                        }),
                        _ => {}
                    }
                    let mut p = Vec::new();
                    assert!(prepare(&x, &mut p));
                    p
                })
                .collect();
            for m in quantize(&w) {
                for (label, kernel) in &kernels {
                    for rows in [2..out - 1, 0..out] {
                        let what = format!("{label} in {inn} rows {rows:?}");
                        // SAFETY: the CPU runs the kernel (checked above); rows inside W; each
                        // prep a whole preparation of this width.
                        unsafe { check_batch_kernel(&what, &m, rows, &preps, *kernel, dot_ref) };
                    }
                }
            }
        }
    }
}
