//! The 256-bit tier of NF4's fused int8-activation GEMV ([`crate::nf4::act8`]: the prepared x,
//! the scalar reference [`crate::nf4::act8::dot_ref`] and the dispatch), on AVX-VNNI (`vpdpbusd`
//! on ymm) and on plain AVX2 (that instruction's sums by `vpmaddwd` pairs, exact).
//!
//! A row's 16 f32 lanes are those of the AVX-512 VNNI kernel ([`crate::arch::avx512::nf4_int8`])
//! held as two ymm, one per block of a pair: lanes 0–7 the pair's first block (its 32 packed
//! bytes, x's bytes `0..32` and `64..96` of the pair), lanes 8–15 the second (bytes `32..64` and
//! `96..128`; an odd last block's second half is zero codes against x's zero bytes and scale
//! 0, as the AVX-512 kernel's masked load gives). Each lane's integer sum covers the same
//! products (exact), is converted and added by one fused multiply-add per pair in pair order,
//! and the lanes fold in [`crate::act8::fold16`]'s tree: the same bits as the AVX-512 kernel and
//! the reference.
//!
//! Shapes: W `out x in` (`in % 64 == 0`; `packed` `[out, in/2]`), `prep` `[prep_len(in)]` from
//! [`crate::nf4::act8::prepare`], `rows ⊆ 0..out`, `y` `[rows.len()]`: `y[j] (+)= W[r, :] ·
//! x'` for row `r = rows.start + j`. Four rows at a time share the loads of x; per row and
//! pair of blocks: two 32-byte loads of codes, four table lookups (`vpshufb`), four
//! `vpdpbusd`, two conversions and two fused multiply-adds.

use super::{batch_parts, fold16, fused_gemv_entry_points, part_lanes, Lanes16};
use crate::act8::avx2::ByteDot;
use crate::cpu::{prefetch_weights, quant_prefetch, QuantPrefetch, PREFETCH_ROWS};
use crate::nf4::act8::{block_scale, parts, BIASED_LEVELS};
use crate::nf4::{with_absmax_reader, AbsmaxAt, Nf4Matrix, NF4_BLOCK};
use std::arch::x86_64::*;

fused_gemv_entry_points!(Nf4Matrix);

/// A pair's level bytes of one row: the high and the low nibbles of each block's 32 packed
/// bytes through the table, `[block 0 high, block 0 low, block 1 high, block 1 low]` (block 1
/// all zero codes where the pair has one block only).
///
/// # Safety
/// AVX2 enabled by the caller; `row` holds the pair's 32 bytes per block it has.
#[inline(always)]
unsafe fn pair_levels(
    row: *const u8,
    b: usize,
    whole: bool,
    table: __m256i,
    pf: QuantPrefetch,
    ahead: usize,
) -> [__m256i; 4] {
    prefetch_weights(pf, row.wrapping_add(ahead + b * 32));
    // SAFETY: the caller's contract.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        let c0 = _mm256_loadu_si256(row.add(b * 32) as *const __m256i);
        let c1 = if whole {
            _mm256_loadu_si256(row.add(b * 32 + 32) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let ((h0, l0), (h1, l1)) = (levels(c0, table, low4), levels(c1, table, low4));
        [h0, l0, h1, l1]
    }
}

/// [`BIASED_LEVELS`] in both 128-bit lanes (the `vpshufb` table).
///
/// # Safety
/// AVX2 enabled by the caller.
#[inline(always)]
unsafe fn level_table() -> __m256i {
    // SAFETY: 16 readable bytes; the caller's target features.
    unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(BIASED_LEVELS.as_ptr() as *const _)) }
}

/// The level bytes of the high and the low nibbles of `c` (a helper rather than a closure:
/// closures do not inherit the caller's target features).
///
/// # Safety
/// AVX2 enabled by the caller.
#[inline(always)]
unsafe fn levels(c: __m256i, table: __m256i, low4: __m256i) -> (__m256i, __m256i) {
    // SAFETY: register work on the caller's target features.
    unsafe {
        (
            _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16::<4>(c), low4)),
            _mm256_shuffle_epi8(table, _mm256_and_si256(c, low4)),
        )
    }
}

/// The step of the pair starting at block `b` (`whole`: it has two blocks) on a (row, vector)'s
/// lanes: lane half `h` adds `(Σ − corr) · s_h`, the sums of block `b + h`'s level bytes `lv`
/// against x's bytes of the pair (`xd`, `corr`: the vector's whole preparation), `s_h =
/// scale(b + h)`, 0 for a pair's missing second block.
///
/// # Safety
/// `D`'s CPU features, AVX2 and FMA enabled by the caller; `xd` and `corr` hold the pair's 128
/// bytes and 16 i32.
#[inline(always)]
unsafe fn step<D: ByteDot>(
    lv: &[__m256i; 4],
    (xd, corr): (&[i8], &[i32]),
    (b, whole): (usize, bool),
    scale: impl Fn(usize) -> f32,
    a: &mut Lanes16,
) {
    let s = [scale(b), if whole { scale(b + 1) } else { 0.0 }];
    // SAFETY: the caller's contract.
    unsafe {
        let (xd, corr) = (xd.as_ptr().add(b / 2 * 128), corr.as_ptr().add(b / 2 * 16));
        for (h, ah) in a.iter_mut().enumerate() {
            let xe = _mm256_loadu_si256(xd.add(32 * h) as *const __m256i);
            let xo = _mm256_loadu_si256(xd.add(64 + 32 * h) as *const __m256i);
            let cv = _mm256_loadu_si256(corr.add(8 * h) as *const __m256i);
            let z = _mm256_setzero_si256();
            let sums = D::dot(D::dot(z, lv[2 * h], xe), lv[2 * h + 1], xo);
            let sums = _mm256_sub_epi32(sums, cv);
            *ah = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(s[h]), *ah);
        }
    }
}

/// Batch 1 on the step `D` (the entry points' body).
///
/// # Safety
/// `D`'s CPU features, AVX2 and FMA; the shapes of the module docs.
#[inline(always)]
unsafe fn gemv_with<D: ByteDot>(
    m: &Nf4Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    with_absmax_reader!(m, am => crate::kernels::for_row_quads!(
        rows,
        // SAFETY: the caller's contract; the rows handed over lie inside W.
        |r| unsafe { rows_n::<D, 4>(m, am, prep, r) },
        // SAFETY: as above.
        unsafe { rows_n::<D, 1>(m, am, prep, r)[0] },
        crate::kernels::store_row(y, acc)
    ))
}

/// The dot products of rows `r0..r0 + N` with the prepared x, each block's scale formed from
/// its absmax (read through `am`) as the pair is reached.
///
/// # Safety
/// As [`gemv_with`], rows `r0..r0 + N` inside W, `am` W's absmax reader.
#[inline(always)]
unsafe fn rows_n<D: ByteDot, const N: usize>(
    m: &Nf4Matrix,
    am: impl AbsmaxAt,
    prep: &[f32],
    r0: usize,
) -> [f32; N] {
    let nb = m.inn / NF4_BLOCK;
    let row_bytes = m.inn / 2;
    let (xd, corr, su) = parts(m.inn, prep);
    let pf = quant_prefetch();
    // SAFETY: (whole body) the CPU features are enabled by the caller; rows r0..r0 + N hold
    // `row_bytes` packed bytes each at r · row_bytes (32 per block) and nb blocks of absmaxes
    // from (r0 + q) · nb; xd holds 128 bytes and corr 16 i32 per pair, su nb scales;
    // prefetches never fault.
    unsafe {
        let table = level_table();
        let base = m.packed.as_slice().as_ptr().add(r0 * row_bytes);
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let mut b = 0;
        while b < nb {
            let whole = b + 1 < nb;
            for (q, a) in acc.iter_mut().enumerate() {
                let row = base.add(q * row_bytes);
                let lv = pair_levels(row, b, whole, table, pf, PREFETCH_ROWS * row_bytes);
                let b0 = (r0 + q) * nb;
                // SAFETY (the scale): k < nb, a block of the row and of su.
                let scale = |k: usize| block_scale(am.at(b0 + k), *su.get_unchecked(k));
                step::<D>(&lv, (xd, corr), (b, whole), scale, a);
            }
            b += 2;
        }
        std::array::from_fn(|q| fold16(&acc[q]))
    }
}

/// 2 to 8 vectors on the step `D` (the entry points' body): the rows' block absmaxes once per
/// call, each vector's block scales formed from them as [`crate::nf4::act8::block_scale`]
/// forms them; each row in parts of at most four vectors (sizes differing by at most one), each
/// part one sweep over the row's codes with its accumulators in registers.
///
/// # Safety
/// As the small-batch entry points', with `D`'s CPU features.
#[inline(always)]
unsafe fn rows_batch<D: ByteDot, const V: usize>(
    m: &Nf4Matrix,
    preps: [&[f32]; V],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let nb = m.inn / NF4_BLOCK;
    let xs: [(&[i8], &[i32], &[f32]); V] = std::array::from_fn(|v| parts(m.inn, preps[v]));
    let mut absmax = crate::kernels::take_row_scales(rows.len() * nb);
    m.fill_absmax(rows.start * nb, &mut absmax);
    let sweep = Sweep {
        m,
        pf: quant_prefetch(),
        // SAFETY: 16 readable bytes; AVX2 enabled by the caller.
        table: unsafe { level_table() },
    };
    for (j, r) in rows.enumerate() {
        let am = &absmax[j * nb..(j + 1) * nb];
        for vs in batch_parts(V) {
            let (v0, part) = (vs.start, &xs[vs]);
            let acc: [Lanes16; 4] = part_lanes!(part.len(), P => {
                // SAFETY: the caller's contract: row r lies inside W, each prep is a whole
                // preparation of this width; the CPU features are enabled.
                unsafe { sweep.row::<D, P>(r, am, part) }
            });
            for q in 0..part.len() {
                // SAFETY: the CPU features are enabled by the caller.
                out[(v0 + q) * stride + j] = unsafe { fold16(&acc[q]) };
            }
        }
    }
    crate::kernels::put_row_scales(absmax);
}

/// What one sweep of a batch's row reads: the matrix, the prefetch, the level table in both
/// 128-bit lanes.
struct Sweep<'a> {
    m: &'a Nf4Matrix,
    pf: QuantPrefetch,
    table: __m256i,
}

impl Sweep<'_> {
    /// Row `r`'s pairs against the `P` prepared vectors of `xs` (`xs.len() == P`), `am` the
    /// row's block absmaxes: their lanes before the fold.
    ///
    /// # Safety
    /// `D`'s CPU features, AVX2 and FMA; row `r` inside W; each of `xs` a whole preparation of
    /// W's width.
    #[inline(always)]
    unsafe fn row<D: ByteDot, const P: usize>(
        &self,
        r: usize,
        am: &[f32],
        xs: &[(&[i8], &[i32], &[f32])],
    ) -> [Lanes16; P] {
        let nb = self.m.inn / NF4_BLOCK;
        let row_bytes = self.m.inn / 2;
        // SAFETY: (whole body) the caller's contract: row r holds `row_bytes` packed bytes at
        // r · row_bytes (32 per block); each xd holds 128 bytes and each corr 16 i32 per pair,
        // each su nb scales; prefetches never fault.
        unsafe {
            let row = self.m.packed.as_slice().as_ptr().add(r * row_bytes);
            let mut acc = [[_mm256_setzero_ps(); 2]; P];
            let mut b = 0;
            while b < nb {
                let whole = b + 1 < nb;
                let lv = pair_levels(
                    row,
                    b,
                    whole,
                    self.table,
                    self.pf,
                    PREFETCH_ROWS * row_bytes,
                );
                for (a, &(xd, corr, su)) in acc.iter_mut().zip(xs) {
                    // SAFETY (the scale): k < nb, the row's absmaxes and the vector's scales.
                    let scale = |k: usize| block_scale(*am.get_unchecked(k), *su.get_unchecked(k));
                    step::<D>(&lv, (xd, corr), (b, whole), scale, a);
                }
                b += 2;
            }
            acc
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act8::{check_batch_kernel, check_fused_kernel, has_avxvnni};
    use crate::nf4::act8::{dot_ref, prepare, FUSED};
    use nibble_tensor::{Rng, Tensor};

    type BatchKernel = crate::act8::FusedBatchKernel<Nf4Matrix>;

    /// Widths of whole blocks: one block (an odd last block), pairs, odd counts.
    const WIDTHS: [usize; 5] = [64, 128, 192, 320, 1024];

    fn quantize(w: &Tensor) -> Vec<Nf4Matrix> {
        vec![
            Nf4Matrix::quantize(w).unwrap(),
            Nf4Matrix::quantize_double(w).unwrap(),
        ]
    }

    /// The 256-bit batch-1 kernels against the reference bit for bit, plain and
    /// double-quantized absmaxes ([`check_fused_kernel`]'s shapes): the AVX2 one on any AVX2
    /// CPU, the AVX-VNNI one where the CPU has it (else a printed skip).
    #[test]
    fn kernels_match_the_reference() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("nf4 int8 GEMV: 256-bit kernels skipped (this CPU lacks AVX2)");
            return;
        }
        // SAFETY: the CPU has AVX2 and FMA (checked).
        unsafe { check_fused_kernel(&FUSED, "AVX2", gemv_avx2, &WIDTHS, quantize) };
        if has_avxvnni() {
            // SAFETY: the CPU has AVX-VNNI too (checked).
            unsafe { check_fused_kernel(&FUSED, "AVX-VNNI", gemv_avxvnni, &WIDTHS, quantize) };
        } else {
            println!("nf4 int8 GEMV: AVX-VNNI kernel skipped (this CPU lacks AVX-VNNI)");
        }
    }

    /// The 256-bit batch kernels give every (row, vector) the reference's bits: 2 to 8 vectors
    /// (parts of one and two sweeps), an all-zero vector, odd block counts, both absmax kinds,
    /// rows from inside the matrix, outputs pre-filled with NaN; 1 and 9 vectors are declined.
    #[test]
    fn batch_kernels_give_each_vector_the_reference_bits() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("nf4 int8 batch GEMV: 256-bit kernels skipped (this CPU lacks AVX2)");
            return;
        }
        let mut kernels: Vec<(&str, BatchKernel)> = vec![("AVX2", gemv_batch_avx2)];
        if has_avxvnni() {
            kernels.push(("AVX-VNNI", gemv_batch_avxvnni));
        } else {
            println!("nf4 int8 batch GEMV: AVX-VNNI kernel skipped (this CPU lacks AVX-VNNI)");
        }
        for &inn in &WIDTHS {
            let out = 13;
            let w = Tensor::randn(&[out, inn], &mut Rng::new(inn as u64));
            let preps: Vec<Vec<f32>> = (0..9)
                .map(|v| {
                    let mut x = Tensor::randn(&[inn], &mut Rng::new(200 + v)).into_vec();
                    if v == 1 {
                        x.fill(0.0);
                    }
                    let mut p = Vec::new();
                    assert!(prepare(&x, &mut p));
                    p
                })
                .collect();
            for m in quantize(&w) {
                for (label, kernel) in &kernels {
                    let what = format!("{label} in {inn}");
                    // SAFETY: the CPU runs the kernel (checked above); rows inside W; each prep
                    // a whole preparation of this width.
                    unsafe { check_batch_kernel(&what, &m, 2..out - 1, &preps, *kernel, dot_ref) };
                }
            }
        }
    }
}
