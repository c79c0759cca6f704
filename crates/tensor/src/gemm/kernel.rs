//! The `MR x NR = 6 x 16` microkernels, one per [`KernelPath`].
//!
//! Shapes: `a` is one packed A micro-panel `[kc][MR]` (element `(i, p)` at `a[p * MR + i]`),
//! `b` one packed B micro-panel `[kc][NR]` (element `(p, j)` at `b[p * NR + j]`), `c` a `6 x 16`
//! tile of C with row stride `rs_c`. Every path computes, per element,
//! `acc = 0; for p in 0..kc { acc = acc + a[i,p] * b[p,j] }` (fused on the AVX2 path) and then
//! stores `c = acc` (`overwrite`) or `c = c + acc`. The order never depends on the tile's
//! position or the thread, which is what makes results bit-identical across thread counts.

use super::{MR, NR};
use crate::cpu::KernelPath;

/// Computes one full `MR x NR` tile.
///
/// # Safety
/// `a` must be valid for reading `kc * MR` floats, `b` for `kc * NR` floats, and `c` for reading
/// and writing the `MR x NR` tile `c[i * rs_c + j]`; `path` must be supported by the CPU
/// (see [`KernelPath::supported`]).
#[inline]
pub(crate) unsafe fn tile(
    path: KernelPath,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller guarantees the pointers' extents and that the CPU has AVX2+FMA.
        KernelPath::Avx2Fma => unsafe { avx2::kernel_6x16(kc, a, b, c, rs_c, overwrite) },
        // SAFETY: same pointer contract as this function's.
        KernelPath::Portable => unsafe { portable_6x16(kc, a, b, c, rs_c, overwrite) },
        // SAFETY: same pointer contract as this function's.
        _ => unsafe { scalar_6x16(kc, a, b, c, rs_c, overwrite) },
    }
}

/// Computes the top-left `mr x nr` corner of a tile (`mr <= MR`, `nr <= NR`) through a local
/// full tile, so C outside the corner is never touched and, with `overwrite`, never read.
///
/// # Safety
/// As [`tile`], except that `c` need only be valid for the `mr x nr` corner.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn edge_tile(
    path: KernelPath,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
    mr: usize,
    nr: usize,
) {
    let mut local = [[0.0f32; NR]; MR];
    // SAFETY: `local` is a full MR x NR tile with row stride NR; a and b per the caller.
    unsafe { tile(path, kc, a, b, local.as_mut_ptr().cast(), NR, true) };
    // SAFETY: the caller vouches for the mr x nr corner of C.
    unsafe { store_corner(&local, c, rs_c, overwrite, mr, nr) };
}

/// The packed micro-panels as slices: `a` `[kc][MR]`, `b` `[kc][NR]`.
///
/// # Safety
/// `a` must be valid for reading `kc * MR` floats and `b` for `kc * NR` floats, for `'p`.
unsafe fn panels<'p>(kc: usize, a: *const f32, b: *const f32) -> (&'p [f32], &'p [f32]) {
    // SAFETY: the caller's contract.
    unsafe {
        (
            std::slice::from_raw_parts(a, kc * MR),
            std::slice::from_raw_parts(b, kc * NR),
        )
    }
}

/// Writes (`overwrite`) or adds the `mr x nr` corner of `acc` into C.
///
/// # Safety
/// `c` must be valid for reading and writing `c[i * rs_c + j]` for `i < mr <= MR`,
/// `j < nr <= NR`.
unsafe fn store_corner(
    acc: &[[f32; NR]; MR],
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
    mr: usize,
    nr: usize,
) {
    for (i, row) in acc.iter().enumerate().take(mr) {
        for (j, &v) in row.iter().enumerate().take(nr) {
            // SAFETY: (i, j) lies in the mr x nr corner the caller vouches for.
            unsafe {
                let d = c.add(i * rs_c + j);
                *d = if overwrite { v } else { *d + v };
            }
        }
    }
}

/// Scalar reference kernel (`C[6x16] (+)= A[6xkc] · B[kcx16]`).
///
/// # Safety
/// As [`tile`].
unsafe fn scalar_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
) {
    // SAFETY: the caller guarantees kc * MR readable floats at a and kc * NR at b.
    let (a, b) = unsafe { panels(kc, a, b) };
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let bp = &b[p * NR..(p + 1) * NR];
        for (i, row) in acc.iter_mut().enumerate() {
            let av = a[p * MR + i];
            for (r, &bv) in row.iter_mut().zip(bp) {
                *r += av * bv;
            }
        }
    }
    // SAFETY: the caller vouches for the whole MR x NR tile.
    unsafe { store_corner(&acc, c, rs_c, overwrite, MR, NR) };
}

/// Portable SIMD kernel (`wide::f32x8`, 12 accumulators) for `C[6x16] (+)= A[6xkc] · B[kcx16]`.
///
/// # Safety
/// As [`tile`].
unsafe fn portable_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs_c: usize,
    overwrite: bool,
) {
    use wide::f32x8;
    // SAFETY: the caller guarantees kc * MR readable floats at a and kc * NR at b.
    let (a, b) = unsafe { panels(kc, a, b) };
    let load8 = |s: &[f32]| -> f32x8 {
        let mut t = [0.0f32; 8];
        t.copy_from_slice(&s[..8]);
        f32x8::from(t)
    };
    let mut acc = [[f32x8::ZERO; 2]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let b0 = load8(&bp[..8]);
        let b1 = load8(&bp[8..]);
        for (row, &av) in acc.iter_mut().zip(ap) {
            let av = f32x8::splat(av);
            row[0] += av * b0;
            row[1] += av * b1;
        }
    }
    let acc: [[f32; NR]; MR] = std::array::from_fn(|i| {
        let (lo, hi) = (acc[i][0].to_array(), acc[i][1].to_array());
        std::array::from_fn(|j| if j < 8 { lo[j] } else { hi[j - 8] })
    });
    // SAFETY: the caller vouches for the whole MR x NR tile.
    unsafe { store_corner(&acc, c, rs_c, overwrite, MR, NR) };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// AVX2+FMA kernel: `C[6x16] (+)= A[6xkc] · B[kcx16]` with 12 ymm accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; pointers as in [`super::tile`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_6x16(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rs_c: usize,
        overwrite: bool,
    ) {
        // SAFETY: forwarded contract; the features are enabled on this function.
        unsafe { body(kc, a, b, c, rs_c, overwrite) }
    }

    /// The kernel body, inlined into the `target_feature` wrapper.
    ///
    /// # Safety
    /// As [`kernel_6x16`].
    #[inline(always)]
    unsafe fn body(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        c: *mut f32,
        rs_c: usize,
        overwrite: bool,
    ) {
        // SAFETY: (whole block) every load reads a[p * MR + i] / b[p * NR + j] with p < kc,
        // inside the caller's extents; every store/load of C is inside the MR x NR tile.
        unsafe {
            // Start pulling the C tile towards L1 now; it is needed only after the K loop.
            for i in 0..MR {
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs_c) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(c.add(i * rs_c + NR - 1) as *const i8);
            }
            let mut c00 = _mm256_setzero_ps();
            let mut c01 = _mm256_setzero_ps();
            let mut c10 = _mm256_setzero_ps();
            let mut c11 = _mm256_setzero_ps();
            let mut c20 = _mm256_setzero_ps();
            let mut c21 = _mm256_setzero_ps();
            let mut c30 = _mm256_setzero_ps();
            let mut c31 = _mm256_setzero_ps();
            let mut c40 = _mm256_setzero_ps();
            let mut c41 = _mm256_setzero_ps();
            let mut c50 = _mm256_setzero_ps();
            let mut c51 = _mm256_setzero_ps();
            macro_rules! step {
                ($off_a:expr, $off_b:expr) => {{
                    let b0 = _mm256_loadu_ps(b.add($off_b));
                    let b1 = _mm256_loadu_ps(b.add($off_b + 8));
                    let av = _mm256_broadcast_ss(&*a.add($off_a));
                    c00 = _mm256_fmadd_ps(av, b0, c00);
                    c01 = _mm256_fmadd_ps(av, b1, c01);
                    let av = _mm256_broadcast_ss(&*a.add($off_a + 1));
                    c10 = _mm256_fmadd_ps(av, b0, c10);
                    c11 = _mm256_fmadd_ps(av, b1, c11);
                    let av = _mm256_broadcast_ss(&*a.add($off_a + 2));
                    c20 = _mm256_fmadd_ps(av, b0, c20);
                    c21 = _mm256_fmadd_ps(av, b1, c21);
                    let av = _mm256_broadcast_ss(&*a.add($off_a + 3));
                    c30 = _mm256_fmadd_ps(av, b0, c30);
                    c31 = _mm256_fmadd_ps(av, b1, c31);
                    let av = _mm256_broadcast_ss(&*a.add($off_a + 4));
                    c40 = _mm256_fmadd_ps(av, b0, c40);
                    c41 = _mm256_fmadd_ps(av, b1, c41);
                    let av = _mm256_broadcast_ss(&*a.add($off_a + 5));
                    c50 = _mm256_fmadd_ps(av, b0, c50);
                    c51 = _mm256_fmadd_ps(av, b1, c51);
                }};
            }
            let mut p = 0;
            while p + 4 <= kc {
                step!(0, 0);
                step!(MR, NR);
                step!(2 * MR, 2 * NR);
                step!(3 * MR, 3 * NR);
                a = a.add(4 * MR);
                b = b.add(4 * NR);
                p += 4;
            }
            while p < kc {
                step!(0, 0);
                a = a.add(MR);
                b = b.add(NR);
                p += 1;
            }
            let rows = [
                (c00, c01),
                (c10, c11),
                (c20, c21),
                (c30, c31),
                (c40, c41),
                (c50, c51),
            ];
            for (i, &(lo, hi)) in rows.iter().enumerate() {
                let d = c.add(i * rs_c);
                if overwrite {
                    _mm256_storeu_ps(d, lo);
                    _mm256_storeu_ps(d.add(8), hi);
                } else {
                    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), lo));
                    _mm256_storeu_ps(d.add(8), _mm256_add_ps(_mm256_loadu_ps(d.add(8)), hi));
                }
            }
        }
    }
}
