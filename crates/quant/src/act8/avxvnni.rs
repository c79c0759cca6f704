//! The AVX-VNNI integer tier: the VEX-encoded 256-bit `vpdpbusd` (`_mm256_dpbusd_avx_epi32`:
//! unsigned bytes times signed bytes, four products summed into each i32 lane without
//! saturation) of Intel client CPUs from Alder Lake on, which have it without AVX-512 (Sapphire
//! Rapids Xeons have both).
//!
//! The tier is the AVX2 tier's code ([`super::avx2`]) with its multiply-add step
//! (`ByteDot`) one `vpdpbusd` (`Dpbusd`) instead of `vpmaddubsw` +
//! `vpmaddwd`; that is the only difference:
//! - dot products ([`super::unit_sums`], the units-of-16 fused path): the AVX2 tier's loops,
//!   signed codes as `|c| · sign(x, c)` as there (exact on `vpdpbusd` too: `|c| <= 128` read
//!   unsigned, `sign(x, c)` signed);
//! - the GEMM: `Narrow` lanes (x as `xq + 128`, lanes starting at
//!   `−128 · Σ w`, 16 rows of W per pair of ymm, 4 vectors per micro-kernel) for every code
//!   kind: with `vpdpbusd` the products need no i16 bound, so 8-bit signed codes take them too
//!   (the AVX2 tier needs its `Wide` lanes there), as on the AVX-512 VNNI tier.
//!
//! [`super::IntTier::AvxVnniEmulated`] runs the same code with the instruction emulated by
//! AVX2 (`DpbusdEmulated`), so that everything but the one instruction is tested on any
//! AVX2 CPU.

use super::avx2::{ByteDot, Narrow};
use std::arch::x86_64::*;

/// `vpdpbusd` on ymm (AVX-VNNI): exact for every byte (no saturation, i32 lanes wrap as any
/// i32 add; the sums here stay far below `2^31`).
pub(crate) struct Dpbusd;

impl ByteDot for Dpbusd {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX-VNNI). `a` is the unsigned operand, `b` the
        // signed one, as in `_mm512_dpbusd_epi32`.
        unsafe { _mm256_dpbusd_avx_epi32(acc, a, b) }
    }
}

/// `vpdpbusd`'s operation with AVX2 instructions (for [`super::IntTier::AvxVnniEmulated`]):
/// the even and the odd bytes of each 16-bit lane widened to i16 (`a` zero-extended, `b`
/// sign-extended), each pair multiplied and summed into i32 by `vpmaddwd` (products at most
/// `255 · 128` in magnitude, so no `vpmaddwd` overflow), the two added to `acc`: the same
/// i32 lanes as the instruction for every byte.
pub(crate) struct DpbusdEmulated;

impl ByteDot for DpbusdEmulated {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX2).
        unsafe {
            let a_even = _mm256_and_si256(a, _mm256_set1_epi16(0x00ff));
            let a_odd = _mm256_srli_epi16::<8>(a);
            let b_even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(b));
            let b_odd = _mm256_srai_epi16::<8>(b);
            let even = _mm256_madd_epi16(a_even, b_even);
            let odd = _mm256_madd_epi16(a_odd, b_odd);
            _mm256_add_epi32(acc, _mm256_add_epi32(even, odd))
        }
    }
}

/// The tier's entry points for the step `$step`, compiled with `$features`: the dot products
/// ([`super::unit_sums`] and the units-of-16 path fused with the f32 combination) and the
/// GEMM's [`super::gemm::block`] and [`super::gemm::panel_corr`] on [`Narrow`]`<$step>` lanes.
macro_rules! entry_points {
    ($step:ty, $features:literal) => {
        use super::super::avx2;
        use super::super::gemm::{PackedW, XPrep};
        use super::super::{CodeKind, YPtr};
        use super::{$step as Step, Narrow};

        /// [`super::super::unit_sums`] for lengths already checked ([`avx2::unit_sums_with`]
        /// on this step).
        ///
        /// # Safety
        /// The CPU has the features this function is compiled with; the lengths of
        /// [`avx2::unit_sums_with`].
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn unit_sums<const V: usize>(
            kind: CodeKind,
            unit: usize,
            codes: &[u8],
            xq: [&[i8]; V],
            out: [&mut [i32]; V],
        ) {
            // SAFETY: the caller's contract.
            unsafe { avx2::unit_sums_with::<Step, V>(kind, unit, codes, xq, out) }
        }

        /// Units of 16 fused with the f32 combination ([`avx2::dot_units16_with`] on this
        /// step: the bits of [`unit_sums`] followed by the shared combination).
        ///
        /// # Safety
        /// The CPU has the features this function is compiled with; the lengths of
        /// [`avx2::dot_units16`].
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn dot_units16<const V: usize>(
            kind: CodeKind,
            codes: &[u8],
            xq: [&[i8]; V],
            sx_u: [&[f32]; V],
            xo_u: [&[f32]; V],
            scale: &[f32],
            offset: &[f32],
        ) -> [f32; V] {
            // SAFETY: the caller's contract.
            unsafe { avx2::dot_units16_with::<Step, V>(kind, codes, xq, sx_u, xo_u, scale, offset) }
        }

        /// [`super::super::gemm::block`] on [`Narrow`] lanes of this step.
        ///
        /// # Safety
        /// The CPU has the features this function is compiled with; the contract of
        /// [`super::super::gemm::block`].
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn gemm_block(
            pw: &PackedW,
            xp: &XPrep,
            rows: std::ops::Range<usize>,
            panels: std::ops::Range<usize>,
            y: YPtr,
            o: usize,
            accumulate: bool,
        ) {
            // SAFETY: the caller's contract.
            unsafe {
                super::super::gemm::block::<Narrow<Step>>(pw, xp, rows, panels, y, o, accumulate)
            }
        }

        /// [`super::super::gemm::panel_corr`] on [`Narrow`] lanes of this step.
        ///
        /// # Safety
        /// The CPU has the features this function is compiled with; the contract of
        /// [`super::super::gemm::panel_corr`].
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn gemm_corr(codes: &[u8], unit: usize, corr: &mut [i32]) {
            // SAFETY: the caller's contract.
            unsafe { super::super::gemm::panel_corr::<Narrow<Step>>(codes, unit, corr) }
        }
    };
}

/// The tier on the instruction ([`super::IntTier::AvxVnni`]).
pub(super) mod hw {
    entry_points!(Dpbusd, "avx2,fma,avxvnni");
}

/// The tier on the AVX2 emulation of the instruction ([`super::IntTier::AvxVnniEmulated`]).
pub(super) mod emulated {
    entry_points!(DpbusdEmulated, "avx2,fma");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vpdpbusd` by its definition: per i32 lane, `acc` plus four products of an unsigned
    /// byte of `a` and a signed byte of `b`, wrapping.
    fn dpbusd_ref(acc: [i32; 8], a: [u8; 32], b: [u8; 32]) -> [i32; 8] {
        std::array::from_fn(|l| {
            (0..4).fold(acc[l], |s, j| {
                s.wrapping_add(i32::from(a[4 * l + j]) * i32::from(b[4 * l + j] as i8))
            })
        })
    }

    /// Runs `D::dot` on one lane vector.
    ///
    /// # Safety
    /// `D`'s CPU features.
    unsafe fn dot<D: ByteDot>(acc: [i32; 8], a: [u8; 32], b: [u8; 32]) -> [i32; 8] {
        // SAFETY: the caller's contract; every array is 32 bytes.
        unsafe {
            let r = D::dot(
                _mm256_loadu_si256(acc.as_ptr() as *const __m256i),
                _mm256_loadu_si256(a.as_ptr() as *const __m256i),
                _mm256_loadu_si256(b.as_ptr() as *const __m256i),
            );
            let mut out = [0i32; 8];
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, r);
            out
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dot_emulated(acc: [i32; 8], a: [u8; 32], b: [u8; 32]) -> [i32; 8] {
        // SAFETY: AVX2 is enabled here.
        unsafe { dot::<DpbusdEmulated>(acc, a, b) }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn dot_hw(acc: [i32; 8], a: [u8; 32], b: [u8; 32]) -> [i32; 8] {
        // SAFETY: AVX2 and AVX-VNNI are enabled here.
        unsafe { dot::<Dpbusd>(acc, a, b) }
    }

    /// The emulation, and the instruction where the CPU has it, give `vpdpbusd`'s definition
    /// on every byte pair (all 65536 of them, `a` unsigned and `b` signed), the extremes
    /// (255 × −128, 255 × 127 four times a lane) and accumulators near the i32 limits.
    #[test]
    fn dpbusd_matches_its_definition() {
        let hw = super::super::has_avxvnni();
        if !hw {
            println!("avxvnni: this CPU lacks AVX-VNNI: testing the emulation of vpdpbusd only");
        }
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("avxvnni: this CPU lacks AVX2: nothing to test");
            return;
        }
        let mut cases: Vec<([i32; 8], [u8; 32], [u8; 32])> = Vec::new();
        for hi in 0..=255u8 {
            // Every byte of a is `hi`, byte k of b is `k + shift`: all pairs over the cases.
            for shift in [0u8, 32, 64, 96, 128, 160, 192, 224] {
                let a = [hi; 32];
                let b: [u8; 32] = std::array::from_fn(|k| (k as u8).wrapping_add(shift));
                cases.push(([0; 8], a, b));
            }
        }
        cases.push(([0; 8], [255; 32], [0x80; 32]));
        cases.push(([0; 8], [255; 32], [127; 32]));
        cases.push((
            [i32::MAX - 1000, i32::MIN + 5, -7, 7, 0, 1, -1, 123_456],
            [255; 32],
            [0x80; 32],
        ));
        cases.push(([i32::MAX, i32::MIN, 0, 0, 0, 0, 0, 0], [255; 32], [127; 32]));
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1000 {
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let acc: [i32; 8] = std::array::from_fn(|_| next() as i32 >> 8);
            let a: [u8; 32] = std::array::from_fn(|_| next() as u8);
            let b: [u8; 32] = std::array::from_fn(|_| (next() >> 8) as u8);
            cases.push((acc, a, b));
        }
        for &(acc, a, b) in &cases {
            let want = dpbusd_ref(acc, a, b);
            // SAFETY: the CPU has AVX2 (checked above).
            let emulated = unsafe { dot_emulated(acc, a, b) };
            assert_eq!(emulated, want, "emulated {acc:?} {a:?} {b:?}");
            if hw {
                // SAFETY: the CPU has AVX-VNNI and AVX2 (has_avxvnni).
                let got = unsafe { dot_hw(acc, a, b) };
                assert_eq!(got, want, "vpdpbusd {acc:?} {a:?} {b:?}");
            }
        }
    }
}
