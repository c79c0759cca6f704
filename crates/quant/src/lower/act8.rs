//! Lower's fused int8-activation GEMV at batch 1 (`y = W·x'` with x quantized to int8 as the
//! generic driver quantizes it for lower, [`crate::act8`], units of one group of 128): the
//! route [`crate::act8::Int8Route::FusedLower`] on the AVX-512 VNNI and AMX tiers
//! ([`crate::arch::avx512::lower_int8`]) and on the AVX-VNNI and AVX2 ones
//! ([`crate::arch::avx2::lower_int8`], the same lanes as two ymm: the same bits).
//!
//! The generic driver unpacks each row's 3- or 4-bit codes into a byte buffer and reads them
//! again, which at batch 1 costs more than the f32 GEMV (one 1024² layer on one thread of a
//! 2-core Xeon: 0.160 ms against 0.088). Here a group of 128 codes becomes 64 bytes of
//! nibbles in registers: a 4-bit row's group is one 64-byte load (element `2b` in the low
//! nibble of byte `b`); a 3-bit row's 48 bytes are spread so that each 32-bit lane holds one
//! run of 8 codes (24 bits) and then moved to nibble positions with three shift-and-mask
//! steps, giving the same 64-byte layout. Two `vpdpbusd` (low nibbles by the group's even
//! elements of x, high nibbles by the odd ones) form 16 lane sums `P_l`, lane `l` covering
//! elements `8l..8l + 8` of the group. With `w' = min_g + scale_g · c` and `x ≈ sx_g · xq`,
//! a row's dot product is `Σ_g scale_g · sx_g · Σ_l P_{g,l} + Σ_g min_g · sx_g · Q_g`
//! (`Q_g = Σ xq` over the group): each group adds `P_{g,l} · (scale_g · sx_g)` into 16 f32
//! lanes (one fused multiply-add per lane, in group order), the lanes fold in a fixed tree
//! ([`crate::act8::fold16`]), and the min term `Σ_g min_g · (sx_g · Q_g)` (fused multiply-adds in group
//! order) is added last. Integer sums are exact, so the kernel and the scalar reference
//! [`dot_ref`] give the same bits; the values differ from the generic driver's only in the
//! order of the f32 steps (the same int8 x, the same codes and parameters), so the driver's
//! error bound holds. A partial last group (`in % 128 != 0`) runs the reference's lane sums
//! (codes past `in` and x's padding are 0).
//!
//! The prepared x (an `f32` vector used as storage, [`prep_len`] slots), per group of 128:
//! - `xd`: 128 int8 values, the group's 64 even elements then its 64 odd ones;
//! - then, after every group's bytes, `sx_g` per group and `sx_g · Q_g` per group.

use super::{code_at, LowerMatrix, LOWER_GROUP};
use crate::act8::{fold16, GROUP};

const _: () = assert!(
    LOWER_GROUP == GROUP,
    "lower's groups are the activation groups"
);

/// How the fused kernels move a 3-bit row's codes to nibbles (the AVX-512 and the 256-bit
/// `lower_int8`), first: `vpshufb`'s pattern in each 128-bit lane (dwords low to high), which
/// gives each dword one run of 3 bytes (8 codes, code `j` at bits `3j`) of the lane's first
/// 12 bytes, its top byte zero.
pub(crate) const SPREAD3_RUNS: [i32; 4] = [
    0x80_02_01_00u32 as i32,
    0x80_05_04_03u32 as i32,
    0x80_08_07_06u32 as i32,
    0x80_0B_0A_09u32 as i32,
];

/// Then three steps `x = (x & keep) | ((x & moved) << by)` on each dword, `(by, keep, moved)`:
/// codes 0..4 stay at bits 0..12 and codes 4..8 move to bits 16..28; then each 12 bits to two
/// 6-bit pairs at bytes; then each 6 bits to two codes at nibbles (code `j` at bits `4j`).
pub(crate) const SPREAD3_STEPS: [(u32, i32, i32); 3] = [
    (4, 0x0000_0FFF, 0x00FF_F000),
    (2, 0x003F_003F, 0x0FC0_0FC0),
    (1, 0x0707_0707, 0x3838_3838),
];

/// Groups of 128 of an `inn`-element row.
pub(crate) fn groups(inn: usize) -> usize {
    inn.div_ceil(LOWER_GROUP)
}

/// This format's fused batch-1 int8 GEMV (see [`crate::act8::FusedGemv`]).
pub(crate) const FUSED: crate::act8::FusedGemv<LowerMatrix> = crate::act8::FusedGemv {
    format: "lower",
    route: crate::act8::Int8Route::FusedLower,
    prepare,
    prep_len,
    #[cfg(target_arch = "x86_64")]
    kernel: crate::arch::avx512::lower_int8::gemv,
    #[cfg(target_arch = "x86_64")]
    batch: Some(crate::arch::avx512::lower_int8::gemv_batch),
    #[cfg(target_arch = "x86_64")]
    ymm: Some(crate::act8::YmmKernels {
        avxvnni: (
            crate::arch::avx2::lower_int8::gemv_avxvnni,
            crate::arch::avx2::lower_int8::gemv_batch_avxvnni,
        ),
        avx2: (
            crate::arch::avx2::lower_int8::gemv_avx2,
            crate::arch::avx2::lower_int8::gemv_batch_avx2,
        ),
    }),
    dot_ref,
};

/// f32 slots of the prepared x of an `inn`-element input: per group 32 of bytes, its scale
/// and its scaled sum (`34 · groups`, never the f32 GEMV's `2 · in + groups` for `in > 0`).
pub(crate) fn prep_len(inn: usize) -> usize {
    groups(inn) * 34
}

/// Position in its group's 128 bytes of element `e` (0..128) of the group.
fn reordered(e: usize) -> usize {
    (e % 2) * 64 + e / 2
}

/// Appends the int8 preparation of `x` (not empty) to `prep`, x quantized as
/// [`crate::act8::forward`] quantizes it for lower; `false`, with nothing appended, where that
/// declines x (a NaN or infinity: the f32 GEMV runs instead).
pub(crate) fn prepare(x: &[f32], prep: &mut Vec<f32>) -> bool {
    let ng = groups(x.len());
    crate::act8::with_quantized_row(x, LOWER_GROUP, |q| {
        let start = prep.len();
        prep.resize(start + prep_len(x.len()), 0.0);
        let (xdf, rest) = prep[start..].split_at_mut(ng * 32);
        let (sx, xs) = rest.split_at_mut(ng);
        let xd: &mut [i8] = bytemuck::cast_slice_mut(xdf);
        for g in 0..ng {
            let grp = &q.xq[g * GROUP..(g + 1) * GROUP];
            for (e, &v) in grp.iter().enumerate() {
                xd[g * GROUP + reordered(e)] = v;
            }
            sx[g] = q.sx[g];
            xs[g] = q.sx[g] * q.qsum[g] as f32;
        }
    })
}

/// The prepared x's three parts: `(xd, sx, xs)`.
pub(crate) fn parts(inn: usize, prep: &[f32]) -> (&[i8], &[f32], &[f32]) {
    let ng = groups(inn);
    let (xdf, rest) = prep.split_at(ng * 32);
    let (sx, xs) = rest.split_at(ng);
    (bytemuck::cast_slice(xdf), sx, &xs[..ng])
}

/// Row `r`'s width (3 or 4), its code bytes, and its groups' scales and mins as f32 (into
/// `scale` and `min`, `groups(in)` each).
pub(crate) fn row_parts<'m>(
    m: &'m LowerMatrix,
    r: usize,
    scale: &mut [f32],
    min: &mut [f32],
) -> (u8, &'m [u8]) {
    let ng = groups(m.inn);
    crate::act8::f16_to_f32(&m.scales.f16s()[r * ng..(r + 1) * ng], scale);
    crate::act8::f16_to_f32(&m.mins.f16s()[r * ng..(r + 1) * ng], min);
    let codes = &m.codes.as_slice()[m.offsets[r] as usize..m.offsets[r + 1] as usize];
    (m.bits.as_slice()[r], codes)
}

/// Group `g`'s step on the 16 lanes, scalar: `acc_l += P_{g,l} · f` (fused), `P_{g,l}` the
/// integer sum over elements `8l..8l + 8` of the group (codes past `inn` are 0).
#[inline(always)]
pub(crate) fn group_step_ref(
    bits: u8,
    codes: &[u8],
    inn: usize,
    g: usize,
    xd: &[i8],
    f: f32,
    acc: &mut [f32; 16],
) {
    for (l, a) in acc.iter_mut().enumerate() {
        let mut sum = 0i32;
        for e in 8 * l..8 * l + 8 {
            let k = g * GROUP + e;
            if k < inn {
                let c = i32::from(code_at(codes, bits, k));
                sum += c * i32::from(xd[g * GROUP + reordered(e)]);
            }
        }
        *a = (sum as f32).mul_add(f, *a);
    }
}

/// The min term `Σ_g min_g · (sx_g · Q_g)`, fused multiply-adds in group order.
#[inline(always)]
pub(crate) fn min_term(min: &[f32], xs: &[f32]) -> f32 {
    min.iter()
        .zip(xs)
        .fold(0.0f32, |t, (&m, &s)| m.mul_add(s, t))
}

/// Scalar ground truth for row `r`, `prep` from [`prepare`].
pub(crate) fn dot_ref(m: &LowerMatrix, r: usize, prep: &[f32]) -> f32 {
    let ng = groups(m.inn);
    let (xd, sx, xs) = parts(m.inn, prep);
    let (mut scale, mut min) = (vec![0.0f32; ng], vec![0.0f32; ng]);
    let (bits, codes) = row_parts(m, r, &mut scale, &mut min);
    let mut acc = [0.0f32; 16];
    for g in 0..ng {
        group_step_ref(bits, codes, m.inn, g, xd, scale[g] * sx[g], &mut acc);
    }
    fold16(acc) + min_term(&min, xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nibble_tensor::{Rng, Tensor};

    /// The AVX-512 VNNI kernel against [`dot_ref`] bit for bit on awkward widths (partial last
    /// groups, odd `in`; [`crate::act8::check_fused_gemv`]'s shapes and inputs), rows of both
    /// widths.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn kernel_matches_the_reference() {
        crate::act8::check_fused_gemv(&FUSED, &crate::act8::ANY_WIDTHS, |w| {
            vec![LowerMatrix::quantize(w).unwrap()]
        });
    }

    /// Both widths occur among the rows the kernel test quantizes (else one decoder would go
    /// unchecked).
    #[test]
    fn kernel_test_covers_both_widths() {
        let w = Tensor::uniform(&[33, 1024], -0.4, 0.4, &mut Rng::new(33 + 1024));
        let m = LowerMatrix::quantize(&w).unwrap();
        let bits = m.bits.as_slice();
        assert!(bits.contains(&3) && bits.contains(&4), "{bits:?}");
    }

    /// The reference against the integer formula with the same int8 x.
    #[test]
    fn reference_is_the_integer_formula() {
        crate::act8::check_integer_formula(
            &FUSED,
            |w| LowerMatrix::quantize(w).unwrap(),
            |m| m.dequantize_with(crate::cpu::KernelPath::Scalar),
        );
    }
}
