//! The int8 format's fused int8-activation GEMV at batch 1 (`y = W·x'` with x quantized to int8
//! as the generic driver quantizes it, [`crate::act8`], units of 128): the route
//! [`crate::act8::Int8Route::FusedInt8`] on the AVX-512 VNNI and AMX tiers, and on AVX-VNNI
//! and AVX2 (`crate::arch::avx2::int8_int8`: the same 16 lanes as two ymm, the same bits).
//!
//! The format's codes are bytes already, with one affine map per row (`w' = zero + scale · c`),
//! so a row's dot product is `scale · Σ_g sx_g · Σ_{k∈g} c_k · xq_k + zero · X`, `X = Σ_g sx_g ·
//! Q_g` (x's quantized sum, once per call). Per group of 128 two 64-byte loads of codes and two
//! `vpdpbusd` (codes unsigned, x signed) form 16 lane sums `P_{g,l}` (lane `l`: elements
//! `4l..4l + 4` and `64 + 4l..64 + 4l + 4` of the group), added as `P_{g,l} · sx_g` into 16 f32
//! lanes (one fused multiply-add per lane, in group order); the lanes fold in a fixed tree
//! ([`crate::act8::fold16`]) and the row ends as `scale · fold + zero · X`. The generic
//! driver decodes each row into a buffer first (`c − 128` as signed bytes): at batch 1 that lost
//! to the f32 GEMV. Integer sums are exact, so the kernel and the scalar reference [`dot_ref`]
//! give the same bits; the values differ from the driver's only in the order of the f32 steps,
//! so its error bound holds. A partial last group (`in % 128 != 0`) runs the reference's lane
//! sums.
//!
//! The prepared x (an `f32` vector used as storage, [`prep_len`] slots): x's int8 values padded
//! with zeros to whole groups of 128, then `sx_g` per group, then `X`.

use super::Int8Matrix;
use crate::act8::GROUP;

/// Groups of 128 of an `inn`-element row.
pub(crate) fn groups(inn: usize) -> usize {
    inn.div_ceil(GROUP)
}

/// This format's fused batch-1 int8 GEMV (see [`crate::act8::FusedGemv`]).
pub(crate) const FUSED: crate::act8::FusedGemv<Int8Matrix> = crate::act8::FusedGemv {
    format: "int8",
    route: crate::act8::Int8Route::FusedInt8,
    prepare,
    prep_len,
    #[cfg(target_arch = "x86_64")]
    kernel: crate::arch::avx512::int8_int8::gemv,
    #[cfg(target_arch = "x86_64")]
    batch: Some(crate::arch::avx512::int8_int8::gemv_batch),
    #[cfg(target_arch = "x86_64")]
    ymm: Some(crate::act8::YmmKernels {
        avxvnni: (
            crate::arch::avx2::int8_int8::gemv_avxvnni,
            crate::arch::avx2::int8_int8::gemv_batch_avxvnni,
        ),
        avx2: (
            crate::arch::avx2::int8_int8::gemv_avx2,
            crate::arch::avx2::int8_int8::gemv_batch_avx2,
        ),
    }),
    dot_ref,
};

/// f32 slots of the prepared x of an `inn`-element input: 32 per group of bytes, a scale per
/// group and `X` (`33 · groups + 1`, never empty as the f32 GEMV's is).
pub(crate) fn prep_len(inn: usize) -> usize {
    groups(inn) * 33 + 1
}

/// Appends the int8 preparation of `x` (not empty) to `prep`, x quantized as
/// [`crate::act8::forward`] quantizes it for the int8 format; `false`, with nothing appended,
/// where that declines x (a NaN or infinity: the f32 GEMV runs instead).
pub(crate) fn prepare(x: &[f32], prep: &mut Vec<f32>) -> bool {
    let ng = groups(x.len());
    crate::act8::with_quantized_row(x, GROUP, |q| {
        let start = prep.len();
        prep.resize(start + prep_len(x.len()), 0.0);
        let (xqf, rest) = prep[start..].split_at_mut(ng * 32);
        let xq: &mut [i8] = bytemuck::cast_slice_mut(xqf);
        xq.copy_from_slice(&q.xq[..ng * GROUP]);
        let mut total = 0.0f32;
        for g in 0..ng {
            rest[g] = q.sx[g];
            total += q.sx[g] * q.qsum[g] as f32;
        }
        rest[ng] = total;
    })
}

/// The prepared x's three parts: `(xq, sx, X)`.
pub(crate) fn parts(inn: usize, prep: &[f32]) -> (&[i8], &[f32], f32) {
    let ng = groups(inn);
    let (xqf, rest) = prep.split_at(ng * 32);
    (bytemuck::cast_slice(xqf), &rest[..ng], rest[ng])
}

/// Group `g`'s step on the 16 lanes of a row whose codes are `codes` (`inn` of them), scalar:
/// `acc_l += P_{g,l} · sx` (fused).
#[inline(always)]
pub(crate) fn group_step_ref(
    codes: &[u8],
    inn: usize,
    g: usize,
    xq: &[i8],
    sx: f32,
    acc: &mut [f32; 16],
) {
    for (l, a) in acc.iter_mut().enumerate() {
        let mut sum = 0i32;
        for e in (4 * l..4 * l + 4).chain(64 + 4 * l..64 + 4 * l + 4) {
            let k = g * GROUP + e;
            if k < inn {
                sum += i32::from(codes[k]) * i32::from(xq[k]);
            }
        }
        *a = (sum as f32).mul_add(sx, *a);
    }
}

/// A row's value from its folded lanes: `scale · fold + zero · X` (two products, one sum).
#[inline(always)]
pub(crate) fn finish(scale: f32, zero: f32, folded: f32, total: f32) -> f32 {
    scale * folded + zero * total
}

/// Scalar ground truth for row `r`, `prep` from [`prepare`].
pub(crate) fn dot_ref(m: &Int8Matrix, r: usize, prep: &[f32]) -> f32 {
    let (xq, sx, total) = parts(m.inn, prep);
    let codes = &m.codes.as_slice()[r * m.inn..(r + 1) * m.inn];
    let mut acc = [0.0f32; 16];
    for (g, &s) in sx.iter().enumerate() {
        group_step_ref(codes, m.inn, g, xq, s, &mut acc);
    }
    let (scale, zero) = (m.scales.f32s()[r], m.zeros.f32s()[r]);
    finish(scale, zero, crate::act8::fold16(acc), total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 VNNI kernel against [`dot_ref`] bit for bit on awkward widths (partial last
    /// groups; [`crate::act8::check_fused_gemv`]'s shapes and inputs, a constant row among
    /// them: scale 0).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn kernel_matches_the_reference() {
        crate::act8::check_fused_gemv(&FUSED, &crate::act8::ANY_WIDTHS, |w| {
            vec![Int8Matrix::quantize(w).unwrap()]
        });
    }

    /// The reference against the integer formula with the same int8 x.
    #[test]
    fn reference_is_the_integer_formula() {
        crate::act8::check_integer_formula(
            &FUSED,
            |w| Int8Matrix::quantize(w).unwrap(),
            |m| m.dequantize_with(crate::cpu::KernelPath::Scalar),
        );
    }
}
