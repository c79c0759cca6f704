//! One SIMD register of f32 lanes, as a type the tier-independent GEMV bodies
//! ([`super::gemv`]) are generic over: `__m256` (8 lanes, AVX2 tier) here, `__m512`
//! (16 lanes) in the AVX-512 tier's file. Every method is `#[inline(always)]` and runs inside a
//! `#[target_feature]` wrapper of its tier, so it compiles to that tier's instructions.

use super::pack::BElem;
use std::arch::x86_64::*;

/// A register of [`Lanes::N`] f32 lanes and the operations the GEMV bodies need.
///
/// # Safety (every method)
/// The CPU must have the register's tier (AVX2+FMA+F16C for `__m256`, AVX-512 F/BW/VL for
/// `__m512`), and the caller must be compiled with it enabled; pointer arguments must be
/// readable for `N` elements.
pub(crate) trait Lanes: Copy {
    /// Number of f32 lanes.
    const N: usize;
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// `N` floats from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// `N` weights from `p`, converted to f32.
    unsafe fn load_w<E: BElem>(p: *const E) -> Self;
    /// `a * b + c`, fused.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// `a + b`.
    unsafe fn add(a: Self, b: Self) -> Self;
    /// `v` in every lane.
    unsafe fn splat(v: f32) -> Self;
    /// The `N` lanes to `p` (unaligned).
    unsafe fn store(self, p: *mut f32);
    /// The sum of the lanes, in a fixed order.
    unsafe fn hsum(self) -> f32;
    /// The lane sums of four registers (`hsum` of each, possibly in another fixed order).
    unsafe fn hsum4(v: [Self; 4]) -> [f32; 4];
}

impl Lanes for __m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only; AVX enabled by the caller.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable floats.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_w<E: BElem>(p: *const E) -> Self {
        // SAFETY: the caller guarantees 8 readable elements and the tier.
        unsafe { E::load8(p) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: register-only; FMA enabled by the caller.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: register-only.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: register-only.
        unsafe { _mm256_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable floats.
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        // SAFETY: register-only operations; AVX enabled by the caller.
        unsafe {
            let s = _mm_add_ps(
                _mm256_castps256_ps128(self),
                _mm256_extractf128_ps::<1>(self),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    /// Lane `r` is `((v_0 + v_1) + (v_2 + v_3)) + ((v_4 + v_5) + (v_6 + v_7))` of `v[r]` (a
    /// transpose-style `hadd` tree: 3 adds for 4 rows).
    #[inline(always)]
    unsafe fn hsum4(v: [Self; 4]) -> [f32; 4] {
        // SAFETY: register-only operations and a store to a local array; AVX enabled.
        unsafe {
            let h01 = _mm256_hadd_ps(v[0], v[1]);
            let h23 = _mm256_hadd_ps(v[2], v[3]);
            let h = _mm256_hadd_ps(h01, h23);
            let red = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut lanes = [0.0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), red);
            lanes
        }
    }
}
