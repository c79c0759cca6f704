//! The opt-in int8-activation Q4 GEMV (`y = W·x` with x quantized to int8).
//!
//! x is quantized per group of 128 elements (8 Q4 blocks) to `xq = round(x / sx)`,
//! `sx = max|x| / 127`, so that `Σ_k code_k · xq_k` over a block runs in exact integer
//! arithmetic (`vpmaddubsw`: unsigned codes times signed xq). With the dequantized weight
//! `v' ≈ n · (2c/15 − 1)` a row's dot product is
//! `Σ_b n_b · (xs_g · I_b − cs_b)` with `I_b = Σ_{k∈b} code_k xq_k`, `xs_g = sx_g · 2/15` and
//! `cs_b = sx_g · Σ_{k∈b} xq_k` (g the group of block b).
//!
//! The prepared x (an `f32` vector used as storage, see [`prep_len`]):
//! - `xq`: `ceil(in/128) · 128` bytes; within a group of 128, each quad of 4 blocks (64
//!   elements, the 32 packed bytes of a row that cover them) holds 32 bytes of its even
//!   elements then 32 of its odd elements (the low / high nibbles of those bytes);
//! - `xs`: one f32 per group;
//! - `cs`: 8 f32 per group, block `t` of the group at `CS_SLOT[t]` — the order in which the
//!   AVX2 kernel's `vphaddd` leaves its block sums.
//!
//! The AVX2 kernel forms its block sums with `vpmaddubsw`, or where the CPU has AVX-VNNI
//! ([`crate::act8::has_avxvnni`]; `NIBBLE_AVXVNNI=0` turns it off) with `vpdpbusd`: the same
//! sums in the same order, so the same bits. On the AVX-512 tier of a CPU with AVX-512 VNNI
//! ([`crate::act8::has_avx512vnni`]) a 512-bit kernel takes a whole group of a row per
//! `vpdpbusd` pair and does the AVX2 kernel's f32 steps for two rows at once, lane for lane:
//! the same bits again (one 1024² layer on one thread of the 16-core Xeon: 39.7 µs against
//! 72.6 µs for the AVX-VNNI kernel, criterion `q4/fwd_batch1_int8_1thread`, 2026-12-04
//! 02:14 UTC).

use super::{Q4Matrix, Q4_BLOCK};
use crate::cpu::KernelPath;

/// Elements of x per activation scale (8 Q4 blocks).
pub(super) const GROUP: usize = 128;
const BLOCKS_PER_GROUP: usize = GROUP / Q4_BLOCK;

/// Slot of block `t` (0..8) of a group in `cs`: `[b0, b1, b4, b5, b2, b3, b6, b7]`.
const CS_SLOT: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];

/// Number of f32 slots of the prepared x of an `inn`-element input.
pub(super) fn prep_len(inn: usize) -> usize {
    let groups = inn.div_ceil(GROUP);
    groups * GROUP / 4 + groups + groups * BLOCKS_PER_GROUP
}

/// Byte index in `xq` of element `k` of x.
#[inline(always)]
fn xq_index(k: usize) -> usize {
    let (g, w) = (k / GROUP, k % GROUP);
    let (quad, e) = (w / 64, w % 64);
    g * GROUP + quad * 64 + (e % 2) * 32 + e / 2
}

/// Appends the int8 preparation of `x` (any length, every element finite; a partial last
/// block's missing elements are 0 in `xq`) to
/// `prep`, on `path` (AVX2 for whole groups, the scalar [`prepare_group_ref`] otherwise;
/// both give the same bytes).
pub(super) fn prepare(path: KernelPath, x: &[f32], prep: &mut Vec<f32>) {
    let groups = x.len().div_ceil(GROUP);
    let start = prep.len();
    prep.resize(start + prep_len(x.len()), 0.0);
    let (xqf, rest) = prep[start..].split_at_mut(groups * GROUP / 4);
    let (xs, cs) = rest.split_at_mut(groups);
    let xq: &mut [u8] = bytemuck::cast_slice_mut(xqf);
    for (g, grp) in x.chunks(GROUP).enumerate() {
        let xq = &mut xq[g * GROUP..(g + 1) * GROUP];
        let cs = &mut cs[g * BLOCKS_PER_GROUP..(g + 1) * BLOCKS_PER_GROUP];
        xs[g] = match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2Fma comes from `usable` (the CPU has AVX2 and FMA); the group is
            // whole (128 elements) and `xq`, `cs` have 128 and 8 elements.
            KernelPath::Avx2Fma | KernelPath::Avx512 if grp.len() == GROUP => unsafe {
                avx2::prepare_group(grp, xq, cs)
            },
            _ => prepare_group_ref(grp, xq, cs),
        };
    }
}

/// Scalar ground truth: quantizes one group of up to 128 elements into its 128 bytes of `xq`
/// and 8 slots of `cs` (module docs); returns its `xs`.
fn prepare_group_ref(grp: &[f32], xq: &mut [u8], cs: &mut [f32]) -> f32 {
    let amax = grp.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let sx = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    {
        for (t, blk) in grp.chunks(Q4_BLOCK).enumerate() {
            let mut q = 0i32;
            for (e, &v) in blk.iter().enumerate() {
                // Round half to even without a libm call: |v · inv| <= 127 < 2^22, so adding
                // and subtracting 1.5 · 2^23 rounds to an integer in the default rounding mode.
                const MAGIC: f32 = 12_582_912.0;
                let r = (((v * inv) + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
                xq[xq_index(t * Q4_BLOCK + e)] = r as u8;
                q += i32::from(r);
            }
            cs[CS_SLOT[t]] = sx * q as f32;
        }
    }
    sx * (2.0 / 15.0)
}

/// The prepared x's three parts: `(xq, xs, cs)`.
fn parts(inn: usize, prep: &[f32]) -> (&[u8], &[f32], &[f32]) {
    let groups = inn.div_ceil(GROUP);
    let (xqf, rest) = prep.split_at(groups * GROUP / 4);
    let (xs, cs) = rest.split_at(groups);
    (bytemuck::cast_slice(xqf), xs, cs)
}

/// Scalar ground truth for row `r` over blocks `b0..ceil(in/16)` (the last one partial when
/// `in % 16 != 0`): `Σ_b n_b · (xs_g · I_b − cs_b)` (also the AVX2 kernel's tail).
pub(super) fn dot_ref(m: &Q4Matrix, r: usize, b0: usize, prep: &[f32]) -> f32 {
    let nb = m.row_blocks();
    let (xq, xs, cs) = parts(m.inn, prep);
    let row = &m.packed.as_slice()[r * m.row_bytes()..(r + 1) * m.row_bytes()];
    let norms = &m.norm.f16s()[r * nb..(r + 1) * nb];
    let mut acc = 0.0f32;
    for b in b0..nb {
        let q = &row[b * 8..];
        let mut isum = 0i32;
        for e in 0..Q4_BLOCK.min(m.inn - b * Q4_BLOCK) {
            let code = i32::from((q[e / 2] >> (4 * (e % 2))) & 15);
            isum += code * i32::from(xq[xq_index(b * Q4_BLOCK + e)] as i8);
        }
        let (g, t) = (b / BLOCKS_PER_GROUP, b % BLOCKS_PER_GROUP);
        let c = cs[g * BLOCKS_PER_GROUP + CS_SLOT[t]];
        acc += norms[b].to_f32() * (xs[g] * isum as f32 - c);
    }
    acc
}

/// `y[j] (+)= (W · x)[rows.start + j]` from a prepared x, on `path` (AVX-512 VNNI where
/// `path` is AVX-512 and the CPU has VNNI, else AVX2 on either x86 tier, else the scalar
/// [`dot_ref`]; the caller checked every length). The two SIMD kernels give the same bits.
pub(super) fn gemv(
    m: &Q4Matrix,
    path: KernelPath,
    prep: &[f32],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    acc: bool,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx512 comes from `usable`, so the CPU has AVX-512 F/BW/VL, AVX2, FMA and
        // F16C, and `has_avx512vnni` says it has VNNI; the caller checked `prep.len() ==
        // prep_len(in)`, `rows.end <= out` and `y.len() >= rows.len()`; rows hold whole blocks.
        KernelPath::Avx512 if m.inn % Q4_BLOCK == 0 && crate::act8::has_avx512vnni() => unsafe {
            avx512::gemv(m, prep, rows, y, acc)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both tiers come from `usable`, so the CPU has AVX2, FMA and F16C (and
        // AVX-VNNI where `has_avxvnni`); the lengths as above.
        KernelPath::Avx2Fma | KernelPath::Avx512 if m.inn % Q4_BLOCK == 0 => unsafe {
            if crate::act8::has_avxvnni() {
                avx2::gemv_avxvnni(m, prep, rows, y, acc)
            } else {
                avx2::gemv(m, prep, rows, y, acc)
            }
        },
        _ => {
            for (j, r) in rows.enumerate() {
                let v = dot_ref(m, r, 0, prep);
                y[j] = if acc { y[j] + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::act8::avx2::{ByteDot, Maddubs};
    use crate::act8::avxvnni::Dpbusd;
    use crate::cpu::{prefetch_weights, quant_prefetch};
    use crate::kernels::avx2::{hmax, hsum};
    use crate::kernels::for_row_quads;
    use std::arch::x86_64::*;

    /// [`prepare_group_ref`] for a whole group of 128 (`xq` 128 bytes, `cs` 8 slots), with
    /// the same rounding (`vcvtps2dq` rounds half to even, as the scalar magic-number trick
    /// does) and the same f32 operations, so the same bytes and sums.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn prepare_group(grp: &[f32], xq: &mut [u8], cs: &mut [f32]) -> f32 {
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
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
            5, 7, 9, 11, 13, 15,
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
                    let s =
                        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
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
            let dst = xq.as_mut_ptr().add(quad * 64) as *mut __m256i;
            // SAFETY: xq has 128 bytes (caller): 64 per quad, evens then odds.
            _mm256_storeu_si256(dst, _mm256_permute2x128_si256::<0x20>(halves[0], halves[1]));
            _mm256_storeu_si256(
                dst.add(1),
                _mm256_permute2x128_si256::<0x31>(halves[0], halves[1]),
            );
        }
        sx * (2.0 / 15.0)
    }

    /// Rows between a code load and its prefetch: one 4-row sweep.
    const PREFETCH_ROWS: usize = 4;

    /// Shapes: W `out x in` (`packed` `[out, in/2]`, `norm` `[out, in/16]`), `prep`
    /// `[prep_len(in)]`, `rows ⊆ 0..out`, `y` `[rows.len()]`. Four rows at a time share the
    /// loads of x; per row and group of 128 weights: two 32-byte loads of codes, four
    /// `vpmaddubsw`, two `vpaddw`, one `vphaddw`, one `vpmaddwd` and two FMAs.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv(
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
    pub(super) unsafe fn gemv_avxvnni(
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
    pub(super) unsafe fn gemv_avxvnni_emulated(
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
        for_row_quads!(
            rows,
            |r| dot_rows::<D, 4>(m, r, prep),
            dot_rows::<D, 1>(m, r, prep)[0],
            crate::kernels::store_row(y, acc)
        );
    }

    /// Dot products of rows `r0..r0+R` (all `< out`) with the prepared x.
    #[inline(always)]
    pub(super) unsafe fn dot_rows<D: ByteDot, const R: usize>(
        m: &Q4Matrix,
        r0: usize,
        prep: &[f32],
    ) -> [f32; R] {
        let nb = m.inn / Q4_BLOCK;
        let full = nb / BLOCKS_PER_GROUP;
        let (xq, xs, cs) = parts(m.inn, prep);
        let (xq, xs, cs) = (xq.as_ptr(), xs.as_ptr(), cs.as_ptr());
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s().as_ptr();
        let pf = quant_prefetch();
        let mask = _mm256_set1_epi8(0x0f);
        let zero = _mm256_setzero_si256();
        let mut accv = [_mm256_setzero_ps(); R];
        for g in 0..full {
            // SAFETY: g < full groups: 128 bytes of xq at g·128, xs[g], cs[8g..8g+8]; each row
            // r0 + r < out holds 64 packed bytes and 8 norms at block 8g.
            let x = xq.add(g * GROUP) as *const __m256i;
            let (xe0, xo0) = (_mm256_loadu_si256(x), _mm256_loadu_si256(x.add(1)));
            let (xe1, xo1) = (_mm256_loadu_si256(x.add(2)), _mm256_loadu_si256(x.add(3)));
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
            *o = hsum(accv[r]) + dot_ref(m, r0 + r, full * BLOCKS_PER_GROUP, prep);
        }
        res
    }
}

/// The AVX-512 VNNI twin of the AVX2 kernels: per row and group of 128 weights one 64-byte
/// load of codes and two `vpdpbusd` (low nibbles by the even elements, high by the odd ones),
/// where the AVX2 code takes two loads, four `vpmaddubsw`, two `vpaddw`, a `vphaddw` and a
/// `vpmaddwd`. The exact block sums are put in `CS_SLOT` order and two rows share each f32
/// step, lane for lane the AVX2 kernel's operations: the same bits.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use crate::act8::avx2::Maddubs;
    use crate::cpu::{prefetch_weights, quant_prefetch};
    use crate::kernels::avx2::hsum;
    use std::arch::x86_64::*;

    /// Rows between a code load and its prefetch: one 4-row sweep.
    const PREFETCH_ROWS: usize = 4;

    /// `vpermt2d` indices that gather, from the `vpdpbusd` lanes of rows A and B (lanes
    /// `2t, 2t + 1` hold block t's two halves; B's lanes are 16..32), the first (`odd = 0`)
    /// or second half of each block, A's blocks in `CS_SLOT` order then B's.
    const fn halves(odd: i32) -> [i32; 16] {
        let mut idx = [0i32; 16];
        let mut t = 0;
        while t < BLOCKS_PER_GROUP {
            idx[CS_SLOT[t]] = 2 * t as i32 + odd;
            idx[8 + CS_SLOT[t]] = 16 + 2 * t as i32 + odd;
            t += 1;
        }
        idx
    }
    const FIRST_HALVES: [i32; 16] = halves(0);
    const SECOND_HALVES: [i32; 16] = halves(1);

    /// Shapes as [`super::avx2::gemv`]: W `out x in` (`in % 16 == 0`), `prep`
    /// `[prep_len(in)]`, `rows ⊆ 0..out`, `y` `[rows.len()]`. Four rows at a time share the
    /// loads of x (a row left over takes the AVX2 kernel: the same bits).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL + VNNI, AVX2, FMA and F16C; the shapes above.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn gemv(
        m: &Q4Matrix,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) {
        crate::kernels::for_row_quads!(
            rows,
            |r| dot_rows4(m, r, prep),
            super::avx2::dot_rows::<Maddubs, 1>(m, r, prep)[0],
            crate::kernels::store_row(y, acc)
        );
    }

    /// Integer block sums of one row's group (64 code bytes at `q`) with x's even (`xe`) and
    /// odd (`xo`) bytes: lane `2t + h` holds half `h` of block t.
    #[inline(always)]
    unsafe fn group_sums(q: *const u8, xe: __m512i, xo: __m512i) -> __m512i {
        // SAFETY: the caller's contract (64 readable bytes at q; AVX-512 BW + VNNI).
        unsafe {
            let mask = _mm512_set1_epi8(0x0f);
            let c = _mm512_loadu_si512(q as *const _);
            let lo = _mm512_and_si512(c, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(c), mask);
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe), hi, xo)
        }
    }

    /// Dot products of rows `r0..r0 + 4` (all `< out`) with the prepared x.
    #[inline(always)]
    unsafe fn dot_rows4(m: &Q4Matrix, r0: usize, prep: &[f32]) -> [f32; 4] {
        let nb = m.inn / Q4_BLOCK;
        let full = nb / BLOCKS_PER_GROUP;
        let (xq, xs, cs) = parts(m.inn, prep);
        let (xq, xs, cs) = (xq.as_ptr(), xs.as_ptr(), cs.as_ptr());
        let packed = m.packed.as_slice().as_ptr();
        let norms = m.norm.f16s().as_ptr();
        let pf = quant_prefetch();
        // SAFETY: g < full groups: 128 bytes of xq at g·128, xs[g], cs[8g..8g+8]; each row
        // r0 + r < out holds 64 packed bytes and 8 norms at block 8g; prefetches never fault.
        unsafe {
            let first = _mm512_loadu_si512(FIRST_HALVES.as_ptr() as *const _);
            let second = _mm512_loadu_si512(SECOND_HALVES.as_ptr() as *const _);
            // Rows (r0, r0 + 1) and (r0 + 2, r0 + 3): each pair's accumulators side by side.
            let mut accv = [_mm512_setzero_ps(); 2];
            for g in 0..full {
                // The group's 32-byte quarters: [quad 0 even, quad 0 odd, quad 1 even, quad 1
                // odd] (module docs' layout) -> [quad 0 | quad 1] even elements, then odd ones.
                let x = xq.add(g * GROUP) as *const __m256i;
                let (e0, o0) = (_mm256_loadu_si256(x), _mm256_loadu_si256(x.add(1)));
                let (e1, o1) = (_mm256_loadu_si256(x.add(2)), _mm256_loadu_si256(x.add(3)));
                let xe = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(e0), e1);
                let xo = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(o0), o1);
                let xsv = _mm512_set1_ps(*xs.add(g));
                let c8 = _mm512_castps256_ps512(_mm256_loadu_ps(cs.add(g * BLOCKS_PER_GROUP)));
                let csv = _mm512_shuffle_f32x4::<0x44>(c8, c8);
                for (p, a) in accv.iter_mut().enumerate() {
                    let blk = |k: usize| (r0 + 2 * p + k) * nb + g * BLOCKS_PER_GROUP;
                    let (ba, bb) = (blk(0), blk(1));
                    for b in [ba, bb] {
                        let ahead = b + PREFETCH_ROWS * nb;
                        prefetch_weights(pf, packed.wrapping_add(ahead * 8));
                        prefetch_weights(pf, norms.wrapping_add(ahead) as *const u8);
                    }
                    let qa = group_sums(packed.add(ba * 8), xe, xo);
                    let qb = group_sums(packed.add(bb * 8), xe, xo);
                    let s = _mm512_add_epi32(
                        _mm512_permutex2var_epi32(qa, first, qb),
                        _mm512_permutex2var_epi32(qa, second, qb),
                    );
                    let n16 = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(norms.add(ba) as *const __m128i)),
                        _mm_loadu_si128(norms.add(bb) as *const __m128i),
                    );
                    let nv = _mm512_cvtph_ps(_mm256_shuffle_epi32::<0xd8>(n16));
                    let t = _mm512_fmsub_ps(xsv, _mm512_cvtepi32_ps(s), csv);
                    *a = _mm512_fmadd_ps(nv, t, *a);
                }
            }
            let mut res = [0.0f32; 4];
            for (r, o) in res.iter_mut().enumerate() {
                let pair = _mm512_castps_pd(accv[r / 2]);
                let lanes = _mm256_castpd_ps(if r % 2 == 0 {
                    _mm512_extractf64x4_pd::<0>(pair)
                } else {
                    _mm512_extractf64x4_pd::<1>(pair)
                });
                *o = hsum(lanes) + dot_ref(m, r0 + r, full * BLOCKS_PER_GROUP, prep);
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::usable;

    /// The AVX2 preparation writes exactly the scalar ground truth's bytes and sums: random
    /// groups, an all-zero group, exact ties (`x · 127 / max` = k + 1/2), tiny and huge values,
    /// and ragged tails (whole groups only go to AVX2).
    #[test]
    fn simd_prepare_matches_scalar() {
        let mut rng = nibble_tensor::Rng::new(5);
        for inn in [16, 128, 144, 256, 1040, 1024] {
            let mut x = nibble_tensor::Tensor::randn(&[inn], &mut rng)
                .data()
                .to_vec();
            if inn >= 256 {
                x[128..256].fill(0.0);
            }
            if inn == 1024 {
                // Group 2: max 127, so x · 127 / 127 = x exactly; ties at k + 0.5.
                for (i, v) in x[256..384].iter_mut().enumerate() {
                    *v = (i as f32 - 64.0) + 0.5;
                }
                x[256] = 127.0;
                for v in &mut x[384..512] {
                    *v *= 1e-30;
                }
                for v in &mut x[512..640] {
                    *v *= 1e30;
                }
            }
            let mut want = Vec::new();
            prepare(KernelPath::Scalar, &x, &mut want);
            let mut got = vec![1.0f32];
            prepare(usable(KernelPath::Avx2Fma), &x, &mut got);
            assert_eq!(got.len(), 1 + prep_len(inn));
            assert_eq!(got[0], 1.0, "prepare appends");
            let same = got[1..]
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "in = {inn}: AVX2 and scalar preparations differ");
        }
    }

    /// The fused GEMV on AVX-VNNI (`vpdpbusd`, and its AVX2 emulation on any AVX2 CPU) gives
    /// the AVX2 kernel's bits: rows 1..9 (quads and singles), lengths of one to nine groups,
    /// an all-zero group, ±extreme activations (xq = ±127), codes 0 and 15 included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_gemvs_match_avx2() {
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("q4 act8: this CPU lacks AVX2: nothing to compare");
            return;
        }
        let hw = crate::act8::has_avxvnni();
        if !hw {
            println!("q4 act8: this CPU lacks AVX-VNNI: comparing its AVX2 emulation only");
        }
        let zmm = crate::act8::has_avx512vnni();
        if !zmm {
            println!("q4 act8: this CPU lacks AVX-512 VNNI: its fused GEMV not run");
        }
        let mut rng = nibble_tensor::Rng::new(17);
        let shapes = [(1usize, 128usize), (4, 256), (5, 384), (9, 1152), (7, 1024)];
        let awkward = [(15, 144), (17, 128), (33, 272), (63, 1040), (129, 128)];
        for &(out, inn) in shapes.iter().chain(&awkward) {
            let mut w = nibble_tensor::Tensor::randn(&[out, inn], &mut rng).into_vec();
            w[..16].fill(0.0); // a zero block
            let w = nibble_tensor::Tensor::from_vec(&[out, inn], w).unwrap();
            let m = Q4Matrix::quantize(&w).unwrap();
            let mut x = nibble_tensor::Tensor::randn(&[inn], &mut rng).into_vec();
            for (k, v) in x[..128].iter_mut().enumerate() {
                *v = if k % 3 == 0 { -2.0 } else { 2.0 };
            }
            if inn >= 256 {
                x[128..256].fill(0.0);
            }
            let mut prep = Vec::new();
            prepare(KernelPath::Avx2Fma, &x, &mut prep);
            for rows in [0..out, out / 2..out] {
                let run =
                    |f: unsafe fn(&Q4Matrix, &[f32], std::ops::Range<usize>, &mut [f32], bool)| {
                        let mut y = vec![f32::NAN; rows.len()];
                        // SAFETY: the CPU has what `f` needs (checked by the caller of `run`);
                        // `prep` is x's preparation, rows inside W, `y` one value per row.
                        unsafe { f(&m, &prep, rows.clone(), &mut y, false) };
                        y
                    };
                let want = run(avx2::gemv);
                assert!(want.iter().all(|v| v.is_finite()));
                let bits =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                let emulated = run(avx2::gemv_avxvnni_emulated);
                assert!(bits(&emulated, &want), "{out}x{inn} {rows:?}: emulated");
                if hw {
                    let got = run(avx2::gemv_avxvnni);
                    assert!(bits(&got, &want), "{out}x{inn} {rows:?}: vpdpbusd");
                }
                if zmm {
                    let got = run(avx512::gemv);
                    assert!(bits(&got, &want), "{out}x{inn} {rows:?}: AVX-512 VNNI");
                }
            }
        }
    }
}
