//! The AVX2 tier of Q4's fused int8-activation GEMV ([`crate::q4::act8`]: the layout of the
//! prepared x, the scalar reference and the dispatch): x's preparation and the 4-row GEMV,
//! whose block sums come from `vpmaddubsw` or, on AVX-VNNI, `vpdpbusd` (the same bits).

use crate::act8::avx2::{ByteDot, Maddubs};
use crate::act8::avxvnni::Dpbusd;
use crate::cpu::{prefetch_weights, PREFETCH_ROWS};
use crate::kernels::avx2::{hmax, hsum};
use crate::kernels::for_row_quads;
use crate::q4::act8::{tail_ref, RowOperands, BLOCKS_PER_GROUP, CS_SLOT, GROUP};
use crate::q4::Q4Matrix;
use std::arch::x86_64::*;

/// [`crate::q4::act8`]'s scalar `prepare_group_ref` for a whole group of 128 (`xq` 128 bytes, `cs` 8 slots), with
/// the same rounding (`vcvtps2dq` rounds half to even, as the scalar magic-number trick
/// does) and the same f32 operations, so the same bytes and sums.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn prepare_group(grp: &[f32], xq: &mut [u8], cs: &mut [f32]) -> f32 {
    let p = grp.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for i in 0..16 {
        // SAFETY: (all loads) grp has 128 elements (caller).
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))));
    }
    let amax = hmax(m);
    let sx = amax / 127.0;
    let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
    // (A helper fn rather than a closure: closures do not inherit the target features.)
    #[inline(always)]
    unsafe fn q_at(p: *const f32, i: usize, inv: __m256) -> __m256i {
        // Clamping before rounding to the integers ±127 equals clamping after.
        let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * i)), inv);
        let v = _mm256_max_ps(
            _mm256_min_ps(v, _mm256_set1_ps(127.0)),
            _mm256_set1_ps(-127.0),
        );
        _mm256_cvtps_epi32(v)
    }
    // Within each 128-bit lane: its 16 bytes as [8 even elements, 8 odd elements].
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5,
        7, 9, 11, 13, 15,
    );
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for quad in 0..2 {
        let mut halves = [_mm256_setzero_si256(); 2];
        for (h, half) in halves.iter_mut().enumerate() {
            let i = quad * 8 + h * 4;
            let (a, b, c, d) = (
                q_at(p, i, inv),
                q_at(p, i + 1, inv),
                q_at(p, i + 2, inv),
                q_at(p, i + 3, inv),
            );
            // Block sums (Σ xq over 16 elements) of blocks 4·quad + 2h and + 1.
            for (k, pair) in [(a, b), (c, d)].into_iter().enumerate() {
                let t = quad * 4 + h * 2 + k;
                let s = _mm256_add_epi32(pair.0, pair.1);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0x4e>(s));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0xb1>(s));
                cs[CS_SLOT[t]] = sx * _mm_cvtsi128_si32(s) as f32;
            }
            // 32 elements in natural order as bytes, then each lane split into evens/odds.
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            // 64-bit words: [evens 0-15, odds 0-15, evens 16-31, odds 16-31] ->
            // [evens 0-15, evens 16-31, odds 0-15, odds 16-31].
            *half = _mm256_permute4x64_epi64::<0xd8>(_mm256_shuffle_epi8(bytes, split));
        }
        // The quad's 32 even elements at byte 32 · quad, its 32 odd ones 64 bytes further
        // (the group's evens, then its odds).
        let evens = xq.as_mut_ptr().add(quad * 32) as *mut __m256i;
        let odds = xq.as_mut_ptr().add(GROUP / 2 + quad * 32) as *mut __m256i;
        // SAFETY: xq has 128 bytes (caller).
        _mm256_storeu_si256(
            evens,
            _mm256_permute2x128_si256::<0x20>(halves[0], halves[1]),
        );
        _mm256_storeu_si256(
            odds,
            _mm256_permute2x128_si256::<0x31>(halves[0], halves[1]),
        );
    }
    sx * (2.0 / 15.0)
}

/// Shapes: W `out x in` (`packed` `[out, in/2]`, `norm` `[out, in/16]`), `prep`
/// `[prep_len(in)]`, `rows ⊆ 0..out`, `y` `[rows.len()]`. Four rows at a time share the
/// loads of x; per row and group of 128 weights: two 32-byte loads of codes, four
/// `vpmaddubsw`, two `vpaddw`, one `vphaddw`, one `vpmaddwd` and two FMAs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv(
    m: &Q4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { gemv_with::<Maddubs>(m, prep, rows, y, acc) }
}

/// [`gemv`] on AVX-VNNI: per row and group four `vpdpbusd` and one `vphaddd` in place of
/// the integer steps of [`gemv`], the same block sums in the same order, so the same bits.
///
/// # Safety
/// The CPU has AVX-VNNI, AVX2, FMA and F16C; the shapes of [`gemv`].
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(crate) unsafe fn gemv_avxvnni(
    m: &Q4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { gemv_with::<Dpbusd>(m, prep, rows, y, acc) }
}

/// [`gemv_avxvnni`] with `vpdpbusd` emulated by AVX2 (tests its code on any AVX2 CPU).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the shapes of [`gemv`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_avxvnni_emulated(
    m: &Q4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { gemv_with::<crate::act8::avxvnni::DpbusdEmulated>(m, prep, rows, y, acc) }
}

/// [`gemv`] on the multiply-add step `D`.
///
/// # Safety
/// `D`'s CPU features, AVX2, FMA and F16C; the shapes of [`gemv`].
#[inline(always)]
unsafe fn gemv_with<D: ByteDot>(
    m: &Q4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    let ops = RowOperands::new(m, prep);
    for_row_quads!(
        rows,
        |r| dot_rows::<D, 4>(&ops, m, r, prep),
        dot_rows::<D, 1>(&ops, m, r, prep)[0],
        crate::kernels::store_row(y, acc)
    );
}

/// `out[v · stride + j] = W[rows.start + j, :] · x'_v` for the `preps.len()` (2 to 8)
/// prepared vectors: a small batch with each row's group of codes loaded and its nibbles split
/// once for every vector, each (row, vector) through [`dot_rows`]'s steps (so the bits of
/// [`gemv`] and of every other Q4 int8 GEMV). `false`, with nothing written, for another count.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every prep holds `prep_len(in)` slots, `in % 16 == 0`,
/// `rows ⊆ 0..out`, `stride >= rows.len()` and
/// `out.len() >= (preps.len() - 1) · stride + rows.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_batch(
    m: &Q4Matrix,
    preps: &[&[f32]],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) -> bool {
    // SAFETY: the caller's contract.
    unsafe { batch_with::<Maddubs>(m, preps, rows, out, stride) }
}

/// [`gemv_batch`] on AVX-VNNI (the block sums by `vpdpbusd`, as [`gemv_avxvnni`]): the same
/// bits.
///
/// # Safety
/// As [`gemv_batch`], and the CPU has AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(crate) unsafe fn gemv_batch_avxvnni(
    m: &Q4Matrix,
    preps: &[&[f32]],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) -> bool {
    // SAFETY: the caller's contract.
    unsafe { batch_with::<Dpbusd>(m, preps, rows, out, stride) }
}

/// [`gemv_batch`] on the multiply-add step `D`.
///
/// # Safety
/// As [`gemv_batch`], and `D`'s CPU features.
#[inline(always)]
unsafe fn batch_with<D: ByteDot>(
    m: &Q4Matrix,
    preps: &[&[f32]],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) -> bool {
    with_batch_count!(preps, V, preps_v =>
        // SAFETY: the caller's contract, for the V vectors of the arm.
        unsafe { rows_batch::<D, V>(m, preps_v, rows, out, stride) }
    )
}

/// [`gemv_batch`] for `V` vectors, one row at a time (`V` accumulators).
///
/// # Safety
/// As [`gemv_batch`].
#[inline(always)]
unsafe fn rows_batch<D: ByteDot, const V: usize>(
    m: &Q4Matrix,
    preps: [&[f32]; V],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let ops: [RowOperands; V] = std::array::from_fn(|v| RowOperands::new(m, preps[v]));
    let (packed, norms, _, _, _, nb, full, pf) = ops[0].all();
    // SAFETY: (whole body) g < full groups: each prepared x holds 128 bytes of xq at g·128,
    // xs[g], cs[8g..8g+8]; each row r of `rows` (< out) holds 64 packed bytes and 8 norms at
    // block 8g; prefetches never fault.
    unsafe {
        let mask = _mm256_set1_epi8(0x0f);
        let zero = _mm256_setzero_si256();
        for (j, r) in rows.enumerate() {
            let mut accv = [_mm256_setzero_ps(); V];
            for g in 0..full {
                let blk = r * nb + g * BLOCKS_PER_GROUP;
                let q = packed.add(blk * 8) as *const __m256i;
                let ahead = blk + PREFETCH_ROWS * nb;
                prefetch_weights(pf, packed.wrapping_add(ahead * 8));
                prefetch_weights(pf, norms.wrapping_add(ahead) as *const u8);
                let (v0, v1) = (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1)));
                let (lo0, hi0) = (
                    _mm256_and_si256(v0, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v0), mask),
                );
                let (lo1, hi1) = (
                    _mm256_and_si256(v1, mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v1), mask),
                );
                let n16 = _mm_loadu_si128(norms.add(blk) as *const __m128i);
                let nv = _mm256_cvtph_ps(_mm_shuffle_epi32::<0xd8>(n16));
                for (a, o) in accv.iter_mut().zip(&ops) {
                    let (_, _, xq, xs, cs, _, _, _) = o.all();
                    let x = xq.add(g * GROUP) as *const __m256i;
                    let (xe0, xe1) = (_mm256_loadu_si256(x), _mm256_loadu_si256(x.add(1)));
                    let (xo0, xo1) = (_mm256_loadu_si256(x.add(2)), _mm256_loadu_si256(x.add(3)));
                    let p0 = D::run_add(D::run_start(zero, lo0, xe0), hi0, xo0);
                    let p1 = D::run_add(D::run_start(zero, lo1, xe1), hi1, xo1);
                    let s = D::hadd_runs(p0, p1);
                    let xsv = _mm256_broadcast_ss(&*xs.add(g));
                    let csv = _mm256_loadu_ps(cs.add(g * BLOCKS_PER_GROUP));
                    let t = _mm256_fmsub_ps(xsv, _mm256_cvtepi32_ps(s), csv);
                    *a = _mm256_fmadd_ps(nv, t, *a);
                }
            }
            for (v, a) in accv.iter().enumerate() {
                out[v * stride + j] = hsum(*a) + tail_ref(m, r, full * BLOCKS_PER_GROUP, preps[v]);
            }
        }
    }
}

/// Dot products of rows `r0..r0+R` (all `< out`) with the prepared x, `ops` resolved from
/// `m` and `prep` (which the tail past the last whole group reads).
#[inline(always)]
pub(crate) unsafe fn dot_rows<D: ByteDot, const R: usize>(
    ops: &RowOperands,
    m: &Q4Matrix,
    r0: usize,
    prep: &[f32],
) -> [f32; R] {
    let (packed, norms, xq, xs, cs, nb, full, pf) = ops.all();
    let mask = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut accv = [_mm256_setzero_ps(); R];
    for g in 0..full {
        // SAFETY: g < full groups: 128 bytes of xq at g·128, xs[g], cs[8g..8g+8]; each row
        // r0 + r < out holds 64 packed bytes and 8 norms at block 8g.
        // The group's even elements (quads 0 and 1), then its odd ones.
        let x = xq.add(g * GROUP) as *const __m256i;
        let (xe0, xe1) = (_mm256_loadu_si256(x), _mm256_loadu_si256(x.add(1)));
        let (xo0, xo1) = (_mm256_loadu_si256(x.add(2)), _mm256_loadu_si256(x.add(3)));
        let xsv = _mm256_broadcast_ss(&*xs.add(g));
        let csv = _mm256_loadu_ps(cs.add(g * BLOCKS_PER_GROUP));
        for (r, a) in accv.iter_mut().enumerate() {
            let blk = (r0 + r) * nb + g * BLOCKS_PER_GROUP;
            let q = packed.add(blk * 8) as *const __m256i;
            // The same group of the row one 4-row sweep ahead (a hint: never faults), as
            // `crate::cpu::quant_prefetch` says.
            let ahead = blk + PREFETCH_ROWS * nb;
            prefetch_weights(pf, packed.wrapping_add(ahead * 8));
            prefetch_weights(pf, norms.wrapping_add(ahead) as *const u8);
            let (v0, v1) = (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1)));
            // Runs of two steps (low nibbles by even elements, high by odd): per 16-bit
            // lane a sum over 4 elements, [b0 x4, b1 x4 | b2 x4, b3 x4] of each quad.
            let p0 = D::run_add(
                D::run_start(zero, _mm256_and_si256(v0, mask), xe0),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v0), mask),
                xo0,
            );
            let p1 = D::run_add(
                D::run_start(zero, _mm256_and_si256(v1, mask), xe1),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v1), mask),
                xo1,
            );
            // Sums over 8 elements (|·| <= 8 · 15 · 127 < 2^15), then i32 block sums in
            // CS_SLOT order: [b0, b1, b4, b5 | b2, b3, b6, b7].
            let s = D::hadd_runs(p0, p1);
            let n16 = _mm_loadu_si128(norms.add(blk) as *const __m128i);
            let nv = _mm256_cvtph_ps(_mm_shuffle_epi32::<0xd8>(n16));
            let t = _mm256_fmsub_ps(xsv, _mm256_cvtepi32_ps(s), csv);
            *a = _mm256_fmadd_ps(nv, t, *a);
        }
    }
    let mut res = [0.0f32; R];
    for (r, o) in res.iter_mut().enumerate() {
        *o = hsum(accv[r]) + tail_ref(m, r0 + r, full * BLOCKS_PER_GROUP, prep);
    }
    res
}
