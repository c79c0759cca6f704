//! NF4's fused int8-activation GEMV at batch 1 (`y = W·x'` with x quantized to int8 as the
//! generic driver quantizes it, [`crate::act8`]): the route [`crate::act8::Int8Route::FusedNf4`]
//! on the AVX-512 VNNI and AMX tiers, and on AVX-VNNI and AVX2 (`crate::arch::avx2::nf4_int8`:
//! the same 16 lanes as two ymm, the same bits).
//!
//! The generic driver forms each block's integer sum from codes unpacked into bytes row by row
//! (every weight decoded into a buffer, then read again), which at batch 1 costs more than the
//! f32 GEMV's table lookups. Here two neighbouring blocks of 64 codes (64 packed bytes, one
//! load) become their level bytes in registers: the high nibbles (the blocks' even elements)
//! and the low ones (the odd elements) each through `vpshufb` on the 16-entry table of
//! [`NF4_LEVELS_I8`] offset by 128, and two `vpdpbusd` against the prepared x form 16 lane sums
//! `P_l`: lanes 0..8 the first block's, lanes 8..16 the second's, lane `l` covering 4 even and
//! 4 odd elements (the offset's `128 · Σ x` per lane is prepared with x). Each pair adds
//! `P_l · s_l` into 16 f32 lanes, `s_l` the scale `absmax · (sx / 127)` of the lane's block
//! (sx of its activation group of 128), lane for lane in pair order, and the 16 lanes fold in
//! a fixed tree ([`fold16`]). Integer sums are exact, so the kernel and the scalar reference
//! [`dot_ref`] give the same bits; the values differ from the generic driver's only in the
//! order of the f32 steps (the same products `level8 · xq`, the same scales), so the generic
//! driver's error bound holds. An odd last block pairs with an empty one (x and scale 0).
//!
//! The prepared x (an `f32` vector used as storage, [`prep_len`] slots), per pair of blocks:
//! - `xd`: 128 int8 values: the first block's 32 even elements, the second's, then the first
//!   block's 32 odd elements, the second's (as the codes lie in the packed bytes);
//! - `corr`: 16 `i32`, lane `l`'s `128 · Σ` of its 8 bytes of `xd`;
//! - `su`: per block (two per pair), `sx / 127`, `sx` the scale of its group of 128 (so that a
//!   row's block scale is one product, `absmax · su`).

use super::{Nf4Matrix, NF4_BLOCK};
use crate::act8::NF4_LEVELS_I8;

/// Pairs of blocks of an `inn`-element row.
pub(crate) fn pairs(inn: usize) -> usize {
    (inn / NF4_BLOCK).div_ceil(2)
}

/// This format's fused batch-1 int8 GEMV (see [`crate::act8::FusedGemv`]).
pub(crate) const FUSED: crate::act8::FusedGemv<Nf4Matrix> = crate::act8::FusedGemv {
    format: "nf4",
    route: crate::act8::Int8Route::FusedNf4,
    prepare,
    prep_len,
    #[cfg(target_arch = "x86_64")]
    kernel: crate::arch::avx512::nf4_int8::gemv,
    #[cfg(target_arch = "x86_64")]
    batch: Some(crate::arch::avx512::nf4_int8::gemv_batch),
    #[cfg(target_arch = "x86_64")]
    ymm: Some(crate::act8::YmmKernels {
        avxvnni: (
            crate::arch::avx2::nf4_int8::gemv_avxvnni,
            crate::arch::avx2::nf4_int8::gemv_batch_avxvnni,
        ),
        avx2: (
            crate::arch::avx2::nf4_int8::gemv_avx2,
            crate::arch::avx2::nf4_int8::gemv_batch_avx2,
        ),
    }),
    dot_ref,
};

/// f32 slots of the prepared x of an `inn`-element input (`inn % 64 == 0`): per pair of
/// blocks 32 of bytes, 16 of corrections and 2 scales.
pub(crate) fn prep_len(inn: usize) -> usize {
    pairs(inn) * 50
}

/// Position in its pair's 128 bytes of element `e` (0..64) of the pair's block `h` (0 or 1).
fn reordered(h: usize, e: usize) -> usize {
    (e % 2) * 64 + h * 32 + e / 2
}

/// Block `h` (0 or 1) of a pair, 64 int8 values, into its places in the pair's 128 bytes:
/// its even elements at `32 h..`, its odd ones at `64 + 32 h..` (`reordered`), through u16
/// words so that the compiler vectorizes it: with the element-by-element form a 1024-wide
/// preparation (`batch1_rows`) took 650 ns, with this one 440 (2-core Xeon, 2026-12-05).
fn deinterleave_block(blk: &[i8], h: usize, pair: &mut [i8]) {
    let blk: &[i8; NF4_BLOCK] = blk.try_into().expect("a block of 64");
    let (evens, odds) = pair.split_at_mut(64);
    let evens: &mut [i8; 32] = (&mut evens[h * 32..h * 32 + 32]).try_into().expect("32");
    let odds: &mut [i8; 32] = (&mut odds[h * 32..h * 32 + 32]).try_into().expect("32");
    // Each pair of elements as one little-endian u16: its low byte the even element, its
    // high byte the odd one (truncations the compiler vectorizes, where byte strides of two
    // stay a scalar loop).
    let mut words = [0u16; 32];
    for (w, p) in words.iter_mut().zip(blk.chunks_exact(2)) {
        *w = u16::from_le_bytes([p[0] as u8, p[1] as u8]);
    }
    for ((e, o), &w) in evens.iter_mut().zip(odds.iter_mut()).zip(&words) {
        *e = w as u8 as i8;
        *o = (w >> 8) as u8 as i8;
    }
}

/// The levels of [`NF4_LEVELS_I8`] plus 128, as the unsigned bytes `vpdpbusd` takes.
pub(crate) const BIASED_LEVELS: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut c = 0;
    while c < 16 {
        t[c] = (NF4_LEVELS_I8[c] as i16 + 128) as u8;
        c += 1;
    }
    t
};

/// Appends the int8 preparation of `x` (`x.len() % 64 == 0`, not empty) to `prep`, x
/// quantized as [`crate::act8::forward`] quantizes it for NF4; `false`, with nothing
/// appended, where that declines x (a NaN or infinity: the f32 GEMV runs instead).
pub(crate) fn prepare(x: &[f32], prep: &mut Vec<f32>) -> bool {
    let inn = x.len();
    let (nb, np) = (inn / NF4_BLOCK, pairs(inn));
    crate::act8::with_quantized_row(x, NF4_BLOCK, |q| {
        let start = prep.len();
        prep.resize(start + prep_len(inn), 0.0);
        let (xdf, rest) = prep[start..].split_at_mut(np * 32);
        let (corrf, su) = rest.split_at_mut(np * 16);
        let xd: &mut [i8] = bytemuck::cast_slice_mut(xdf);
        let corr: &mut [i32] = bytemuck::cast_slice_mut(corrf);
        for b in 0..nb {
            let pair = &mut xd[b / 2 * 128..(b / 2 + 1) * 128];
            deinterleave_block(&q.xq[b * NF4_BLOCK..(b + 1) * NF4_BLOCK], b % 2, pair);
            su[b] = q.sx[b * NF4_BLOCK / crate::act8::GROUP] / 127.0;
        }
        for p in 0..np {
            let pair = &xd[p * 128..(p + 1) * 128];
            for (l, c) in corr[p * 16..(p + 1) * 16].iter_mut().enumerate() {
                let lane = pair[4 * l..4 * l + 4]
                    .iter()
                    .chain(&pair[64 + 4 * l..64 + 4 * l + 4]);
                *c = 128 * lane.map(|&v| i32::from(v)).sum::<i32>();
            }
        }
    })
}

/// The prepared x's three parts: `(xd, corr, su)`.
pub(crate) fn parts(inn: usize, prep: &[f32]) -> (&[i8], &[i32], &[f32]) {
    let np = pairs(inn);
    let (xdf, rest) = prep.split_at(np * 32);
    let (corrf, su) = rest.split_at(np * 16);
    (
        bytemuck::cast_slice(xdf),
        bytemuck::cast_slice(corrf),
        &su[..2 * np],
    )
}

/// A block's scale for a row whose block absmax is `absmax`: `absmax · (sx / 127)` (the
/// prepared `su`), the product every kernel forms the same way.
#[inline(always)]
pub(crate) fn block_scale(absmax: f32, su: f32) -> f32 {
    absmax * su
}

pub(crate) use crate::act8::fold16;

/// Scalar ground truth for row `r` (`m.inn % 64 == 0`), `prep` from [`prepare`].
pub(crate) fn dot_ref(m: &Nf4Matrix, r: usize, prep: &[f32]) -> f32 {
    let nb = m.inn / NF4_BLOCK;
    let (xd, _, su) = parts(m.inn, prep);
    let mut absmax = vec![0.0f32; nb];
    m.fill_absmax(r * nb, &mut absmax);
    let packed = &m.packed.as_slice()[r * m.inn / 2..(r + 1) * m.inn / 2];
    let mut acc = [0.0f32; 16];
    for p in 0..pairs(m.inn) {
        for (l, a) in acc.iter_mut().enumerate() {
            // Lane l: block 2p + l / 8, its bytes 4(l % 8)..+4 of each nibble.
            let b = 2 * p + l / 8;
            let (sum, scale) = if b < nb {
                let mut sum = 0i32;
                for k in 4 * (l % 8)..4 * (l % 8) + 4 {
                    // Byte k of the block holds element 2k (high nibble) and 2k + 1 (low).
                    let byte = packed[b * 32 + k];
                    for (code, e) in [(byte >> 4, 2 * k), (byte & 15, 2 * k + 1)] {
                        let xv = xd[p * 128 + reordered(b % 2, e)];
                        sum += i32::from(NF4_LEVELS_I8[usize::from(code)]) * i32::from(xv);
                    }
                }
                (sum, block_scale(absmax[b], su[b]))
            } else {
                (0, 0.0)
            };
            *a = (sum as f32).mul_add(scale, *a);
        }
    }
    fold16(acc)
}

#[cfg(test)]
mod tests {
    use super::{deinterleave_block, reordered};

    /// The deinterleave puts every element of either block of a pair where `reordered` says
    /// and touches nothing of the other block.
    #[test]
    fn deinterleave_follows_the_layout() {
        let blk: Vec<i8> = (0..64)
            .map(|e| (e as i8).wrapping_mul(37).wrapping_sub(90))
            .collect();
        for h in 0..2 {
            let mut pair = [i8::MIN; 128];
            deinterleave_block(&blk, h, &mut pair);
            let mut want = [i8::MIN; 128];
            for (e, &v) in blk.iter().enumerate() {
                want[reordered(h, e)] = v;
            }
            assert_eq!(pair, want, "block {h}");
        }
    }

    /// The AVX-512 VNNI kernel against [`super::dot_ref`] bit for bit (through
    /// [`super::FUSED`]), plain and
    /// double-quantized absmaxes ([`crate::act8::check_fused_gemv`]'s shapes and inputs).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn kernel_matches_the_reference() {
        crate::act8::check_fused_gemv(&super::FUSED, &[64, 128, 192, 320, 1024], |w| {
            vec![
                super::Nf4Matrix::quantize(w).unwrap(),
                super::Nf4Matrix::quantize_double(w).unwrap(),
            ]
        });
    }
}
