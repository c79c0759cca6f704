//! The 256-bit tier of the int8 format's fused int8-activation GEMV ([`crate::int8::act8`]: the
//! prepared x, the scalar reference [`crate::int8::act8::dot_ref`] and the dispatch), on
//! AVX-VNNI (`vpdpbusd` on ymm: Intel client CPUs from Alder Lake on, which lack AVX-512) and on
//! plain AVX2 (that instruction's sums by `vpmaddwd` pairs, exact: AMD Zen 3 and older Intel).
//!
//! A row's 16 f32 lanes are those of the AVX-512 VNNI kernel
//! ([`crate::arch::avx512::int8_int8`]) held as two ymm: lanes 0–7 take bytes 0–31 and 64–95 of
//! each group of 128, lanes 8–15 bytes 32–63 and 96–127, so each lane's integer sum covers the
//! same eight products (exact in any order), is converted and added by one fused multiply-add
//! per group in group order, and the lanes fold in [`crate::act8::fold16`]'s tree: the same
//! bits as the AVX-512 kernel and the reference.
//!
//! Shapes: W `out x in` (`codes` `[out, in]`), `prep` `[prep_len(in)]` from
//! [`crate::int8::act8::prepare`], `rows ⊆ 0..out`, `y` `[rows.len()]`: `y[j] (+)= W[r, :] ·
//! x'` for row `r = rows.start + j`. Four rows at a time share the loads of x; per row and
//! group of 128 weights: four 32-byte loads of codes, four `vpdpbusd`, two conversions and two
//! fused multiply-adds.

use super::{batch_parts, fused_gemv_entry_points, part_lanes, Lanes16};
use crate::act8::avx2::ByteDot;
use crate::act8::GROUP;
use crate::cpu::{prefetch_weights, quant_prefetch, QuantPrefetch, PREFETCH_ROWS};
use crate::int8::act8::{finish, group_step_ref, parts};
use crate::int8::Int8Matrix;
use crate::kernels::for_row_quads;
use std::arch::x86_64::*;

fused_gemv_entry_points!(Int8Matrix);

/// Batch 1 on the step `D` (the entry points' body).
///
/// # Safety
/// `D`'s CPU features, AVX2 and FMA; the shapes of the module docs.
#[inline(always)]
unsafe fn gemv_with<D: ByteDot>(
    m: &Int8Matrix,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    let ctx = Ctx {
        inn: m.inn,
        codes: m.codes.as_slice(),
        scales: m.scales.f32s(),
        zeros: m.zeros.f32s(),
        prep: parts(m.inn, prep),
        pf: quant_prefetch(),
    };
    for_row_quads!(
        rows,
        // SAFETY: the caller's contract; the rows handed over lie inside W.
        |r| unsafe { rows_n::<D, 4>(&ctx, r) },
        // SAFETY: the caller's contract; the rows handed over lie inside W.
        unsafe { rows_n::<D, 1>(&ctx, r)[0] },
        crate::kernels::store_row(y, acc)
    );
}

/// What every row of a call reads: the matrix's parts and the prepared x's (`xq`, `sx`, `X`).
struct Ctx<'a> {
    inn: usize,
    codes: &'a [u8],
    scales: &'a [f32],
    zeros: &'a [f32],
    prep: (&'a [i8], &'a [f32], f32),
    pf: QuantPrefetch,
}

/// A group's 128 bytes at `p` as four ymm (bytes 0–31, 32–63, 64–95, 96–127).
///
/// # Safety
/// AVX2 enabled by the caller; `p` holds 128 readable bytes.
#[inline(always)]
unsafe fn load_group(p: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller's contract.
    std::array::from_fn(|q| unsafe { _mm256_loadu_si256(p.add(32 * q) as *const __m256i) })
}

/// A group's 128 codes of a row from `p`, prefetching the same group [`PREFETCH_ROWS`] rows
/// (of `inn` codes) ahead.
///
/// # Safety
/// AVX2 enabled by the caller; `p` holds 128 readable bytes.
#[inline(always)]
unsafe fn group_codes(p: *const u8, inn: usize, pf: QuantPrefetch) -> [__m256i; 4] {
    let ahead = p.wrapping_add(PREFETCH_ROWS * inn);
    prefetch_weights(pf, ahead);
    prefetch_weights(pf, ahead.wrapping_add(64));
    // SAFETY: the caller's contract.
    unsafe { load_group(p) }
}

/// A whole group's step on one (row, vector) pair's lanes: `a += P · s`, `P` the lane sums of
/// the codes `c` against x's bytes `x` (the AVX-512 kernel's two `vpdpbusd` as four on halves).
///
/// # Safety
/// `D`'s CPU features, AVX2 and FMA enabled by the caller.
#[inline(always)]
unsafe fn step<D: ByteDot>(c: &[__m256i; 4], x: &[__m256i; 4], s: __m256, a: &mut Lanes16) {
    // SAFETY: register work on the caller's target features.
    unsafe {
        let z = _mm256_setzero_si256();
        let lo = D::dot(D::dot(z, c[0], x[0]), c[2], x[2]);
        let hi = D::dot(D::dot(z, c[1], x[1]), c[3], x[3]);
        a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), s, a[0]);
        a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), s, a[1]);
    }
}

/// A row's result from its lanes: the groups past the whole ones (a partial last group, if x
/// has one) by the reference's steps, then the fold ([`super::finish_lanes`]).
///
/// # Safety
/// AVX2 enabled by the caller.
#[inline(always)]
unsafe fn finish_lanes(a: &Lanes16, row: &[u8], whole: usize, xq: &[i8], sx: &[f32]) -> f32 {
    // SAFETY: the caller's target features.
    unsafe {
        super::finish_lanes(a, whole..sx.len(), |g, l| {
            group_step_ref(row, row.len(), g, xq, sx[g], l)
        })
    }
}

/// The dot products of rows `r0..r0 + N` with the prepared x.
///
/// # Safety
/// As [`gemv_with`], rows `r0..r0 + N` inside W.
#[inline(always)]
unsafe fn rows_n<D: ByteDot, const N: usize>(c: &Ctx<'_>, r0: usize) -> [f32; N] {
    let (inn, codes, pf) = (c.inn, c.codes, c.pf);
    let (xq, sx, total) = c.prep;
    let whole = inn / GROUP;
    // SAFETY: (whole body) the CPU features are enabled by the caller; for g < whole each row
    // r0 + q holds 128 codes at (r0 + q) · inn + g · 128 and xq 128 bytes at g · 128;
    // prefetches never fault.
    unsafe {
        let base = codes.as_ptr().add(r0 * inn);
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for g in 0..whole {
            let x = load_group(xq.as_ptr().add(g * GROUP) as *const u8);
            let s = _mm256_set1_ps(*sx.get_unchecked(g));
            for (q, a) in acc.iter_mut().enumerate() {
                let cq = group_codes(base.add(q * inn + g * GROUP), inn, pf);
                step::<D>(&cq, &x, s, a);
            }
        }
        std::array::from_fn(|q| {
            let r = r0 + q;
            let row = &codes[r * inn..(r + 1) * inn];
            let folded = finish_lanes(&acc[q], row, whole, xq, sx);
            finish(c.scales[r], c.zeros[r], folded, total)
        })
    }
}

/// 2 to 8 vectors on the step `D` (the entry points' body): each row in parts of at most four
/// vectors (sizes differing by at most one), each part one sweep over the row's codes with
/// its accumulators in registers (eight vectors' sixteen accumulators in one sweep spilled to
/// the stack: batch 8 3.1 ms against 0.55 at batch 1).
///
/// # Safety
/// As the small-batch entry points', with `D`'s CPU features.
#[inline(always)]
unsafe fn rows_batch<D: ByteDot, const V: usize>(
    m: &Int8Matrix,
    preps: [&[f32]; V],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
) {
    let (inn, codes) = (m.inn, m.codes.as_slice());
    let (scales, zeros) = (m.scales.f32s(), m.zeros.f32s());
    let xs: [(&[i8], &[f32], f32); V] = std::array::from_fn(|v| parts(inn, preps[v]));
    let sweep = Sweep {
        inn,
        codes,
        pf: quant_prefetch(),
    };
    for (j, r) in rows.enumerate() {
        let row_codes = &codes[r * inn..(r + 1) * inn];
        for vs in batch_parts(V) {
            let (v0, part) = (vs.start, &xs[vs]);
            let acc: [Lanes16; 4] = part_lanes!(part.len(), P => {
                // SAFETY: the caller's contract: row r lies inside W, each prep is a whole
                // preparation of this width; the CPU features are enabled.
                unsafe { sweep.row::<D, P>(r, part) }
            });
            for (q, &(xq, sx, total)) in part.iter().enumerate() {
                // SAFETY: the CPU features are enabled by the caller.
                let folded = unsafe { finish_lanes(&acc[q], row_codes, inn / GROUP, xq, sx) };
                out[(v0 + q) * stride + j] = finish(scales[r], zeros[r], folded, total);
            }
        }
    }
}

/// What one sweep of a batch's row reads: the matrix's width and codes, the prefetch.
struct Sweep<'a> {
    inn: usize,
    codes: &'a [u8],
    pf: QuantPrefetch,
}

impl Sweep<'_> {
    /// Row `r`'s whole groups against the `P` prepared vectors of `xs` (`xs.len() == P`):
    /// their lanes before the partial group and the fold.
    ///
    /// # Safety
    /// `D`'s CPU features, AVX2 and FMA; row `r` inside W; each of `xs` a whole preparation of
    /// W's width.
    #[inline(always)]
    unsafe fn row<D: ByteDot, const P: usize>(
        &self,
        r: usize,
        xs: &[(&[i8], &[f32], f32)],
    ) -> [Lanes16; P] {
        let inn = self.inn;
        // SAFETY: (whole body) the caller's contract: for g < whole row r holds 128 codes at
        // r · inn + g · 128 and each xq 128 bytes at g · 128; prefetches never fault.
        unsafe {
            let row = self.codes.as_ptr().add(r * inn);
            let mut acc = [[_mm256_setzero_ps(); 2]; P];
            for g in 0..inn / GROUP {
                let c = group_codes(row.add(g * GROUP), inn, self.pf);
                for (a, &(xq, sx, _)) in acc.iter_mut().zip(xs) {
                    let x = load_group(xq.as_ptr().add(g * GROUP) as *const u8);
                    step::<D>(&c, &x, _mm256_set1_ps(*sx.get_unchecked(g)), a);
                }
            }
            acc
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act8::{check_batch_kernel, check_fused_kernel, has_avxvnni, ANY_WIDTHS};
    use crate::int8::act8::{dot_ref, prepare, FUSED};
    use nibble_tensor::{Rng, Tensor};

    type BatchKernel = crate::act8::FusedBatchKernel<Int8Matrix>;

    fn quantize(w: &Tensor) -> Vec<Int8Matrix> {
        vec![Int8Matrix::quantize(w).unwrap()]
    }

    /// The 256-bit batch-1 kernels against the reference bit for bit on awkward widths
    /// ([`check_fused_kernel`]'s shapes): the AVX2 one on any AVX2 CPU, the AVX-VNNI one where
    /// the CPU has it (else a printed skip).
    #[test]
    fn kernels_match_the_reference() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("int8 format's int8 GEMV: 256-bit kernels skipped (this CPU lacks AVX2)");
            return;
        }
        // SAFETY: the CPU has AVX2 and FMA (checked).
        unsafe { check_fused_kernel(&FUSED, "AVX2", gemv_avx2, &ANY_WIDTHS, quantize) };
        if has_avxvnni() {
            // SAFETY: the CPU has AVX-VNNI too (checked).
            unsafe { check_fused_kernel(&FUSED, "AVX-VNNI", gemv_avxvnni, &ANY_WIDTHS, quantize) };
        } else {
            println!("int8 format's int8 GEMV: AVX-VNNI kernel skipped (this CPU lacks AVX-VNNI)");
        }
    }

    /// The 256-bit batch kernels give every (row, vector) the reference's bits: 2 to 8 vectors
    /// (parts of one and two sweeps), an all-zero vector, widths with partial groups, rows
    /// from inside the matrix, outputs pre-filled with NaN; 1 and 9 vectors are declined.
    #[test]
    fn batch_kernels_give_each_vector_the_reference_bits() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!(
                "int8 format's int8 batch GEMV: 256-bit kernels skipped (this CPU lacks AVX2)"
            );
            return;
        }
        let mut kernels: Vec<(&str, BatchKernel)> = vec![("AVX2", gemv_batch_avx2)];
        if has_avxvnni() {
            kernels.push(("AVX-VNNI", gemv_batch_avxvnni));
        } else {
            println!(
                "int8 format's int8 batch GEMV: AVX-VNNI kernel skipped (this CPU lacks AVX-VNNI)"
            );
        }
        for &inn in &[1usize, 63, 128, 129, 320, 1023] {
            let out = 13;
            let w = Tensor::uniform(&[out, inn], -0.4, 0.4, &mut Rng::new(inn as u64));
            let m = Int8Matrix::quantize(&w).unwrap();
            let preps: Vec<Vec<f32>> = (0..9)
                .map(|v| {
                    let mut x = Tensor::randn(&[inn], &mut Rng::new(100 + v)).into_vec();
                    if v == 1 {
                        x.fill(0.0);
                    }
                    let mut p = Vec::new();
                    assert!(prepare(&x, &mut p));
                    p
                })
                .collect();
            for (label, kernel) in &kernels {
                let what = format!("{label} in {inn}");
                // SAFETY: the CPU runs the kernel (checked above); rows inside W; each prep a
                // whole preparation of this width.
                unsafe { check_batch_kernel(&what, &m, 2..out - 1, &preps, *kernel, dot_ref) };
            }
        }
    }
}
