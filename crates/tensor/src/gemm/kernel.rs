//! The `MR x NR = 6 x 16` microkernels, one per [`KernelPath`].
//!
//! Shapes: A is read through an [`ARows`] (a packed micro-panel `[kc][MR]`, element `(i, p)` at
//! `a[p * MR + i]`, or the strided matrix itself), B through a [`BCols`] (a packed panel
//! `[kc][NR]`, element `(p, j)` at `b[p * NR + j]`, or a row-major matrix), `c` is a `6 x 16`
//! tile of C with row stride `rs_c`. Every path computes, per element,
//! `acc = 0; for p in 0..kc { acc = acc + a[i,p] * b[p,j] }` (fused on the AVX2 path) and then
//! stores it as its [`Store`] says (`c = acc`, `c = acc + row[j]` or `c = c + acc`). The order never depends on the tile's
//! position, the thread or where the operands are read from, which is what makes results
//! bit-identical across thread counts and between packed and unpacked operands.

use super::source::{dispatch, ARows, ASrc, BCols, BSrc, Kernel};
use super::{Store, MR, NR};
use crate::cpu::KernelPath;

/// Computes one full `MR x NR` tile.
///
/// # Safety
/// `a` must be readable for `kc` steps of `MR` rows and `b` for `kc` steps of one panel (see
/// [`ASrc`], [`BSrc`]), and `c` valid for reading and writing the `MR x NR` tile
/// `c[i * rs_c + j]`; `path` must be supported by the CPU (see [`KernelPath::supported`]).
#[inline(always)]
pub(crate) unsafe fn tile(
    path: KernelPath,
    kc: usize,
    a: ASrc,
    b: BSrc,
    c: *mut f32,
    rs_c: usize,
    store: Store,
) {
    let call = Call {
        path,
        kc,
        c,
        rs_c,
        store,
    };
    // SAFETY: the caller's contract; MR <= MAX_ROWS.
    unsafe { dispatch::<MR, 1, _>(a, b, call) }
}

/// The arguments of a 6 x 16 kernel call other than its sources.
struct Call {
    path: KernelPath,
    kc: usize,
    c: *mut f32,
    rs_c: usize,
    store: Store,
}

impl Kernel for Call {
    #[inline(always)]
    unsafe fn run<A: ARows, B: BCols>(self, a: A, b: B) {
        let Call {
            path,
            kc,
            c,
            rs_c,
            store,
        } = self;
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller guarantees the sources' extents and that the CPU has
            // AVX2+FMA.
            KernelPath::Avx2Fma => unsafe { avx2::kernel_6x16(kc, a, b, c, rs_c, store) },
            // SAFETY: same contract as `tile`'s.
            KernelPath::Portable => unsafe { portable_6x16(kc, a, b, c, rs_c, store) },
            // SAFETY: same contract as `tile`'s.
            _ => unsafe { scalar_6x16(kc, a, b, c, rs_c, store) },
        }
    }
}

/// Computes the top-left `mr x nr` corner of a tile (`mr <= MR`, `nr <= NR`) through a local
/// full tile, so C outside the corner is never touched and, unless `store` adds, never read.
///
/// # Safety
/// As [`tile`], except that `c` need only be valid for the `mr x nr` corner.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn edge_tile(
    path: KernelPath,
    kc: usize,
    a: ASrc,
    b: BSrc,
    c: *mut f32,
    rs_c: usize,
    store: Store,
    mr: usize,
    nr: usize,
) {
    let mut local = [[0.0f32; NR]; MR];
    // SAFETY: `local` is a full MR x NR tile with row stride NR; a and b per the caller.
    unsafe {
        tile(
            path,
            kc,
            a,
            b,
            local.as_mut_ptr().cast(),
            NR,
            Store::Overwrite,
        )
    };
    // SAFETY: the caller vouches for the mr x nr corner of C (and of the row).
    unsafe { store_corner(&local, c, rs_c, store, mr, nr) };
}

/// Stores the `mr x nr` corner of `acc` into C as `store` says.
///
/// # Safety
/// `c` must be valid for reading and writing `c[i * rs_c + j]` for `i < mr <= MR`,
/// `j < nr <= NR`, and a [`Store::OverRow`] row for reading `nr` floats.
unsafe fn store_corner(
    acc: &[[f32; NR]; MR],
    c: *mut f32,
    rs_c: usize,
    store: Store,
    mr: usize,
    nr: usize,
) {
    for (i, row) in acc.iter().enumerate().take(mr) {
        for (j, &v) in row.iter().enumerate().take(nr) {
            // SAFETY: (i, j) lies in the mr x nr corner the caller vouches for.
            unsafe {
                let d = c.add(i * rs_c + j);
                *d = match store {
                    Store::Overwrite => v,
                    Store::OverRow(r) => v + *r.add(j),
                    Store::Add => *d + v,
                };
            }
        }
    }
}

/// Scalar reference kernel (`C[6x16] (+)= A[6xkc] · B[kcx16]`).
///
/// # Safety
/// As [`tile`], with `a` and `b` readable for `kc` steps.
unsafe fn scalar_6x16<A: ARows, B: BCols>(
    kc: usize,
    mut a: A,
    mut b: B,
    c: *mut f32,
    rs_c: usize,
    store: Store,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for _ in 0..kc {
        // SAFETY: the caller guarantees kc readable steps of MR rows of A and NR floats of B.
        unsafe {
            let bp = std::slice::from_raw_parts(b.at(0), NR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = *a.at(i);
                for (r, &bv) in row.iter_mut().zip(bp) {
                    *r += av * bv;
                }
            }
            a.step();
            b.step();
        }
    }
    // SAFETY: the caller vouches for the whole MR x NR tile.
    unsafe { store_corner(&acc, c, rs_c, store, MR, NR) };
}

/// Portable SIMD kernel (`wide::f32x8`, 12 accumulators) for `C[6x16] (+)= A[6xkc] · B[kcx16]`.
///
/// # Safety
/// As [`tile`], with `a` and `b` readable for `kc` steps.
unsafe fn portable_6x16<A: ARows, B: BCols>(
    kc: usize,
    mut a: A,
    mut b: B,
    c: *mut f32,
    rs_c: usize,
    store: Store,
) {
    use wide::f32x8;
    let load8 = |s: *const f32| -> f32x8 {
        let mut t = [0.0f32; 8];
        // SAFETY: the caller of the kernel guarantees NR = 16 readable floats of B per step;
        // s is the first or the second half of them.
        t.copy_from_slice(unsafe { std::slice::from_raw_parts(s, 8) });
        f32x8::from(t)
    };
    let mut acc = [[f32x8::ZERO; 2]; MR];
    for _ in 0..kc {
        // SAFETY: the caller guarantees kc readable steps of MR rows of A and NR floats of B.
        unsafe {
            let bp = b.at(0);
            let b0 = load8(bp);
            let b1 = load8(bp.add(8));
            for (i, row) in acc.iter_mut().enumerate() {
                let av = f32x8::splat(*a.at(i));
                row[0] += av * b0;
                row[1] += av * b1;
            }
            a.step();
            b.step();
        }
    }
    let acc: [[f32; NR]; MR] = std::array::from_fn(|i| {
        let (lo, hi) = (acc[i][0].to_array(), acc[i][1].to_array());
        std::array::from_fn(|j| if j < 8 { lo[j] } else { hi[j - 8] })
    });
    // SAFETY: the caller vouches for the whole MR x NR tile.
    unsafe { store_corner(&acc, c, rs_c, store, MR, NR) };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::source::{ARows, BCols};
    use super::{Store, MR, NR};
    use std::arch::x86_64::*;

    /// AVX2+FMA kernel: `C[6x16] (+)= A[6xkc] · B[kcx16]` with 12 ymm accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; sources and tile as in [`super::tile`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel_6x16<A: ARows, B: BCols>(
        kc: usize,
        a: A,
        b: B,
        c: *mut f32,
        rs_c: usize,
        store: Store,
    ) {
        // SAFETY: forwarded contract; the features are enabled on this function.
        unsafe { body(kc, a, b, c, rs_c, store) }
    }

    /// The kernel body, inlined into the `target_feature` wrapper.
    ///
    /// # Safety
    /// As [`kernel_6x16`].
    #[inline(always)]
    unsafe fn body<A: ARows, B: BCols>(
        kc: usize,
        mut a: A,
        mut b: B,
        c: *mut f32,
        rs_c: usize,
        store: Store,
    ) {
        // SAFETY: (whole block) every load reads element (i, p) of A / row p of B's panel
        // with p < kc, inside the sources' extents; every store/load of C is inside the
        // MR x NR tile.
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
                () => {{
                    let bp = b.at(0);
                    let b0 = _mm256_loadu_ps(bp);
                    let b1 = _mm256_loadu_ps(bp.add(8));
                    let av = _mm256_broadcast_ss(&*a.at(0));
                    c00 = _mm256_fmadd_ps(av, b0, c00);
                    c01 = _mm256_fmadd_ps(av, b1, c01);
                    let av = _mm256_broadcast_ss(&*a.at(1));
                    c10 = _mm256_fmadd_ps(av, b0, c10);
                    c11 = _mm256_fmadd_ps(av, b1, c11);
                    let av = _mm256_broadcast_ss(&*a.at(2));
                    c20 = _mm256_fmadd_ps(av, b0, c20);
                    c21 = _mm256_fmadd_ps(av, b1, c21);
                    let av = _mm256_broadcast_ss(&*a.at(3));
                    c30 = _mm256_fmadd_ps(av, b0, c30);
                    c31 = _mm256_fmadd_ps(av, b1, c31);
                    let av = _mm256_broadcast_ss(&*a.at(4));
                    c40 = _mm256_fmadd_ps(av, b0, c40);
                    c41 = _mm256_fmadd_ps(av, b1, c41);
                    let av = _mm256_broadcast_ss(&*a.at(5));
                    c50 = _mm256_fmadd_ps(av, b0, c50);
                    c51 = _mm256_fmadd_ps(av, b1, c51);
                    a.step();
                    b.step();
                }};
            }
            let mut p = 0;
            while p + 4 <= kc {
                step!();
                step!();
                step!();
                step!();
                p += 4;
            }
            while p < kc {
                step!();
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
                let (lo, hi) = match store {
                    Store::Overwrite => (lo, hi),
                    Store::OverRow(r) => (
                        _mm256_add_ps(lo, _mm256_loadu_ps(r)),
                        _mm256_add_ps(hi, _mm256_loadu_ps(r.add(8))),
                    ),
                    Store::Add => (
                        _mm256_add_ps(_mm256_loadu_ps(d), lo),
                        _mm256_add_ps(_mm256_loadu_ps(d.add(8)), hi),
                    ),
                };
                _mm256_storeu_ps(d, lo);
                _mm256_storeu_ps(d.add(8), hi);
            }
        }
    }
}
