//! The AVX-512 tier of the GEMM and GEMV: a 512-bit register microkernel over the shared packed
//! layout, and the 16-lane vector type the generic GEMV bodies ([`super::gemv`]) run on.
//!
//! # Microkernel
//! A tile is `R` rows by `NP` packed B panels (`NP * NR` columns, [`NR`] = 16 = one zmm): per
//! step `p` of K it loads `NP` zmm of B (one per panel; the panels lie `kc * NR` floats apart in
//! the packed block), broadcasts each of the `R` A values and issues `R * NP` FMAs into
//! `R * NP` zmm accumulators (zmm has 32 registers: 8 x 48, the default, keeps 24
//! accumulators, 3 B vectors and a broadcast; see [`Avx512Tile::DEFAULT`] for the
//! measurements). Every element is `acc = 0; acc = fma(a[i,p], b[p,j], acc)` for
//! `p` in order, then stored as the call's [`Store`] says (`c = acc`, `c = acc + row[j]` or
//! `c = c + acc`), whatever the tile shape, the panel
//! count of an edge tile or the thread: results are bit-identical across thread counts (and
//! equal to the AVX2 tier's, which runs the same fused sequence).
//!
//! A and B are read through [`ARows`] / [`BCols`] (packed panels or the matrices in place, see
//! [`super::source`]). Edge tiles need no local copy: the A micro-panel is zero-padded to `R`
//! rows (a strided A repeats its last row; those rows are computed and not stored), a group with fewer panels left runs the `NP`-panel kernel for the
//! panels there are, and the columns past C's edge are masked off with `__mmask16` loads and
//! stores.

use super::lanes::Lanes;
use super::pack::BElem;
use super::source::{dispatch, ARows, ASrc, BCols, BSrc, Kernel};
use super::{Store, NR};
use std::arch::x86_64::*;

/// The AVX-512 microkernel shapes (rows of C x columns of C per call). All use the same packed
/// panels; [`super::gemm_avx512_tile`] runs any of them so that benchmarks can compare them,
/// and [`Avx512Tile::DEFAULT`] is the one [`super::gemm`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Avx512Tile {
    /// 12 rows x 32 columns: 24 accumulators.
    M12N32,
    /// 14 rows x 32 columns: 28 accumulators.
    M14N32,
    /// 8 rows x 48 columns: 24 accumulators.
    M8N48,
    /// 6 rows x 64 columns: 24 accumulators.
    M6N64,
}

impl Avx512Tile {
    /// Every shape, for benchmarks.
    pub const ALL: [Avx512Tile; 4] = [
        Avx512Tile::M12N32,
        Avx512Tile::M14N32,
        Avx512Tile::M8N48,
        Avx512Tile::M6N64,
    ];

    /// The shape [`super::gemm`] uses on the AVX-512 tier. Measured on the 16-core Intel Xeon
    /// (AVX-512, AMX), `x · Wᵀ` at 1024³ f32, medians of 20–30 in one run, ms:
    /// * 2026-12-03, the driver of this version (one pass per stage, balanced tasks),
    ///   16 threads, K slices of 128 / 256: 12x32 2.13 / 2.08, 14x32 2.11 / 2.05,
    ///   8x48 2.00 / 1.98, 6x64 2.23 / 2.20;
    /// * the same day, the previous driver, 16 threads, slices of 128 / 256 / all of K:
    ///   12x32 2.54 / 2.47 / 2.38, 14x32 2.50 / 2.44 / 2.51, 8x48 2.30 / 2.22 / 2.20,
    ///   6x64 2.30 / 2.25 / 2.21; 1 thread, slices of 128 / all: 12x32 15.4 / 15.2,
    ///   8x48 15.1 / 14.4, 6x64 18.5 / 14.4;
    /// * an earlier session (criterion, whole-KC slices), lease 1: 1 thread 12x32 25.5 ms,
    ///   14x32 24.7, 8x48 22.3, 6x64 22.5, 16 threads 2.60, 2.68, 2.49, 3.01; lease 2, 1 thread
    ///   25.1, 29.8, 27.8, 27.6.
    ///
    /// 8x48 led in three of those four runs, with 256-deep slices ([`super::AVX512_K_SLICE`]).
    pub const DEFAULT: Avx512Tile = Avx512Tile::M8N48;

    /// Rows of C per tile (the height of a packed A micro-panel).
    pub fn rows(self) -> usize {
        match self {
            Avx512Tile::M12N32 => 12,
            Avx512Tile::M14N32 => 14,
            Avx512Tile::M8N48 => 8,
            Avx512Tile::M6N64 => 6,
        }
    }

    /// Packed B panels ([`NR`] columns each) per tile.
    pub fn panels(self) -> usize {
        match self {
            Avx512Tile::M12N32 | Avx512Tile::M14N32 => 2,
            Avx512Tile::M8N48 => 3,
            Avx512Tile::M6N64 => 4,
        }
    }

    /// A short name such as `"12x32"`.
    pub fn name(self) -> &'static str {
        match self {
            Avx512Tile::M12N32 => "12x32",
            Avx512Tile::M14N32 => "14x32",
            Avx512Tile::M8N48 => "8x48",
            Avx512Tile::M6N64 => "6x64",
        }
    }
}

/// One tile of C: `C[rows x cols] (+)= A · B` for `kc` steps of K, A read through `a` (a
/// packed micro-panel of `shape.rows()` rows or the strided matrix) and the `panels` B panels
/// through `b` (packed panels or a row-major matrix). Only the `rows x cols` corner of C is
/// read or written.
///
/// # Safety
/// The CPU must have AVX-512 F (see [`crate::cpu::has_avx512`]); `a` readable for `kc` steps
/// of `shape.rows()` rows and `b` for `kc` steps of `panels` panels (see [`ASrc`], [`BSrc`]);
/// `1 <= panels <= shape.panels()`, `rows <= shape.rows()`, `cols <= panels * NR`; `c` valid
/// for reading and writing `c[i * rs_c + j]`, `i < rows`, `j < cols`, and a
/// [`Store::OverRow`] row for reading `cols` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    shape: Avx512Tile,
    panels: usize,
    kc: usize,
    a: ASrc,
    b: BSrc,
    c: *mut f32,
    rs_c: usize,
    store: Store,
    rows: usize,
    cols: usize,
) {
    let t = Tile {
        kc,
        c,
        rs_c,
        store,
        rows,
        cols,
    };
    // SAFETY: forwarded contract; each arm's R and NP match `shape` and `panels`, and
    // every R is at most MAX_ROWS.
    unsafe {
        match (shape, panels) {
            (Avx512Tile::M12N32, 1) => dispatch::<12, 1, _>(a, b, Body::<12, 1>(t)),
            (Avx512Tile::M12N32, _) => dispatch::<12, 2, _>(a, b, Body::<12, 2>(t)),
            (Avx512Tile::M14N32, 1) => dispatch::<14, 1, _>(a, b, Body::<14, 1>(t)),
            (Avx512Tile::M14N32, _) => dispatch::<14, 2, _>(a, b, Body::<14, 2>(t)),
            (Avx512Tile::M8N48, 1) => dispatch::<8, 1, _>(a, b, Body::<8, 1>(t)),
            (Avx512Tile::M8N48, 2) => dispatch::<8, 2, _>(a, b, Body::<8, 2>(t)),
            (Avx512Tile::M8N48, _) => dispatch::<8, 3, _>(a, b, Body::<8, 3>(t)),
            (Avx512Tile::M6N64, 1) => dispatch::<6, 1, _>(a, b, Body::<6, 1>(t)),
            (Avx512Tile::M6N64, 2) => dispatch::<6, 2, _>(a, b, Body::<6, 2>(t)),
            (Avx512Tile::M6N64, 3) => dispatch::<6, 3, _>(a, b, Body::<6, 3>(t)),
            (Avx512Tile::M6N64, _) => dispatch::<6, 4, _>(a, b, Body::<6, 4>(t)),
        }
    }
}

/// The arguments of [`tile`] other than its sources, as one value for the generic body.
#[derive(Clone, Copy)]
struct Tile {
    kc: usize,
    c: *mut f32,
    rs_c: usize,
    store: Store,
    rows: usize,
    cols: usize,
}

/// The `R x (NP * NR)` body as a [`Kernel`], for [`dispatch`].
struct Body<const R: usize, const NP: usize>(Tile);

impl<const R: usize, const NP: usize> Kernel for Body<R, NP> {
    #[inline(always)]
    unsafe fn run<A: ARows, B: BCols>(self, a: A, b: B) {
        // SAFETY: [`tile`]'s contract, which `dispatch` forwards.
        unsafe { body::<R, NP, A, B>(self.0, a, b) }
    }
}

/// The lanes of panel `u` that lie inside the first `cols` columns, as a mask.
#[inline(always)]
fn column_mask(cols: usize, u: usize) -> __mmask16 {
    let valid = cols.saturating_sub(u * NR).min(NR);
    ((1u32 << valid) - 1) as __mmask16
}

/// `R x (NP * NR)` tile, accumulators in `R * NP` zmm registers.
///
/// # Safety
/// As [`tile`] with `R == shape.rows()` and `NP == panels`; inlined into it (AVX-512 enabled).
#[inline(always)]
// Index loops over the register block read more plainly than zipped iterators and compile to
// the same unrolled code (constant indices keep the accumulators in registers).
#[allow(clippy::needless_range_loop)]
unsafe fn body<const R: usize, const NP: usize, A: ARows, B: BCols>(t: Tile, mut a: A, mut b: B) {
    // SAFETY: (whole block) A loads read element (i, p), p < kc, i < R; B loads read the NR
    // floats of panel u < NP at step p < kc; C accesses are masked to the rows x cols corner,
    // a row's to its first cols floats.
    unsafe {
        for i in 0..R {
            if i < t.rows {
                _mm_prefetch::<_MM_HINT_T0>(t.c.add(i * t.rs_c) as *const i8);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); NP]; R];
        for _ in 0..t.kc {
            let mut bv = [_mm512_setzero_ps(); NP];
            for u in 0..NP {
                bv[u] = _mm512_loadu_ps(b.at(u));
            }
            for i in 0..R {
                let av = _mm512_set1_ps(*a.at(i));
                for u in 0..NP {
                    acc[i][u] = _mm512_fmadd_ps(av, bv[u], acc[i][u]);
                }
            }
            a.step();
            b.step();
        }
        for i in 0..R {
            if i >= t.rows {
                continue;
            }
            for u in 0..NP {
                let m = column_mask(t.cols, u);
                let d = t.c.add(i * t.rs_c + u * NR);
                if m == 0xFFFF {
                    let v = match t.store {
                        Store::Overwrite => acc[i][u],
                        Store::OverRow(r) => {
                            _mm512_add_ps(acc[i][u], _mm512_loadu_ps(r.add(u * NR)))
                        }
                        Store::Add => _mm512_add_ps(_mm512_loadu_ps(d), acc[i][u]),
                    };
                    _mm512_storeu_ps(d, v);
                } else if m != 0 {
                    let v = match t.store {
                        Store::Overwrite => acc[i][u],
                        Store::OverRow(r) => {
                            _mm512_add_ps(acc[i][u], _mm512_maskz_loadu_ps(m, r.add(u * NR)))
                        }
                        Store::Add => _mm512_add_ps(_mm512_maskz_loadu_ps(m, d), acc[i][u]),
                    };
                    _mm512_mask_storeu_ps(d, m, v);
                }
            }
        }
    }
}

/// The AVX-512 [`super::gemv`] row kernel: `res[rows x m] (+)= W[rows x inp] · x[m x inp]ᵀ`
/// on 16-lane registers (f16 weights converted with `vcvtph2ps` as they are loaded).
///
/// # Safety
/// The CPU must have the AVX-512 tier; `w.len() == rows * inp`, `x.len() >= m * inp`,
/// `res.len() == rows * m`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn gemv_rows<E: BElem>(
    w: &[E],
    inp: usize,
    x: &[f32],
    m: usize,
    res: &mut [f32],
    accumulate: bool,
) {
    // SAFETY: forwarded contract; the tier is enabled on this function.
    unsafe { super::gemv::simd::rows::<__m512, E>(w, inp, x, m, res, accumulate) }
}

/// Vectors of x per pass of [`short_rows`] over a block of W's rows (one accumulator each).
const SHORT_VECTORS: usize = 8;

/// The small-batch product through short rows (a LoRA adapter's `B`, `[out, r]`):
/// `y[b · ldy + j] (+)= Σ_p x[b · inp + p] · w[j · inp + p]` for `j < rows`, `b < m`. Each
/// block of 16 rows of W is turned into 16-lane columns by register transposes of 16 x 16
/// (no packing), then each vector's 16 sums are fused multiply-add chains from 0 over `p` in
/// order with `x[b, p]` broadcast, stored (`acc`) or added to y (`y + acc`): the bits of
/// [`super::gemm`] with `B = Wᵀ` whose K (`inp <= KC`) is one block, without the GEMM's
/// packing and task grid, where the horizontal sums of the row kernel cost more than the
/// products (`inp` of 32: 32 multiply-adds per output).
///
/// # Safety
/// The CPU must have the AVX-512 tier; `w` holds `rows * inp` floats, `x` `m * inp`, and `y`
/// is valid for reading and writing `y[b * ldy + j]`, `b < m`, `j < rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn short_rows(
    w: &[f32],
    rows: usize,
    inp: usize,
    x: &[f32],
    m: usize,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    debug_assert!(w.len() >= rows * inp && x.len() >= m * inp);
    // SAFETY: (whole body) loads of w are masked to the rows below `rows` and the columns
    // below `inp`; x's elements read are `b < m`, `p < inp`; y's accesses are masked to the
    // columns below `rows` of rows `b < m`.
    unsafe {
        for j0 in (0..rows).step_by(16) {
            let nr = (rows - j0).min(16);
            let row_mask = ((1u32 << nr) - 1) as __mmask16;
            for b0 in (0..m).step_by(SHORT_VECTORS) {
                let nb = (m - b0).min(SHORT_VECTORS);
                let mut acc = [_mm512_setzero_ps(); SHORT_VECTORS];
                for p0 in (0..inp).step_by(16) {
                    let np = (inp - p0).min(16);
                    let col_mask = ((1u32 << np) - 1) as __mmask16;
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, ri) in r.iter_mut().enumerate().take(nr) {
                        *ri = _mm512_maskz_loadu_ps(col_mask, w.as_ptr().add((j0 + i) * inp + p0));
                    }
                    let cols = transpose16(r);
                    for (p, col) in cols.iter().enumerate().take(np) {
                        for (b, a) in acc.iter_mut().enumerate().take(nb) {
                            let xv = *x.get_unchecked((b0 + b) * inp + p0 + p);
                            *a = _mm512_fmadd_ps(_mm512_set1_ps(xv), *col, *a);
                        }
                    }
                }
                for (b, &a) in acc.iter().enumerate().take(nb) {
                    let yp = y.add((b0 + b) * ldy + j0);
                    let v = if accumulate {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(row_mask, yp), a)
                    } else {
                        a
                    };
                    _mm512_mask_storeu_ps(yp, row_mask, v);
                }
            }
        }
    }
}

/// The transpose of the 16 x 16 block whose row `i` is `r[i]`: element `j` of result `c` is
/// element `c` of `r[j]`. Pairs of rows interleaved (32-bit, then 64-bit), then 128-bit lanes
/// gathered in two rounds: 64 shuffles.
#[inline(always)]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: register-only; AVX-512 F enabled by the caller.
    unsafe {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + c], lane L: rows 4g..4g + 4 of column 4L + c.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            // Lanes 0 and 2 (v), 1 and 3 (v1) of rows 0..8, then of rows 8..16 (w, w1).
            let v = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            let w = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(v, w);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v, w);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
        }
        out
    }
}

impl Lanes for __m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only; AVX-512 enabled by the caller.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 16 readable floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_w<E: BElem>(p: *const E) -> Self {
        // SAFETY: the caller guarantees 16 readable elements and the tier.
        unsafe { E::load16(p) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: register-only.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: register-only.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: register-only.
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 16 writable floats.
        unsafe { _mm512_storeu_ps(p, self) }
    }
    /// The two 256-bit halves added, then [`Lanes::hsum`] of `__m256`.
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        // SAFETY: register-only.
        unsafe { fold_halves(self).hsum() }
    }
    /// The two 256-bit halves of each added, then [`Lanes::hsum4`] of `__m256`.
    #[inline(always)]
    unsafe fn hsum4(v: [Self; 4]) -> [f32; 4] {
        // SAFETY: register-only.
        // (No closure: closures do not inherit the caller's target features.)
        unsafe {
            <__m256 as Lanes>::hsum4([
                fold_halves(v[0]),
                fold_halves(v[1]),
                fold_halves(v[2]),
                fold_halves(v[3]),
            ])
        }
    }
}

/// Lanes `0..8` plus lanes `8..16` (AVX-512 F only: the upper half is taken as 4 doubles).
#[inline(always)]
unsafe fn fold_halves(v: __m512) -> __m256 {
    // SAFETY: register-only; AVX-512 F enabled by the caller.
    unsafe {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(_mm512_castps512_ps256(v), hi)
    }
}

/// The AVX-512 [`super::panel_gemv::panels`]: 16 lanes, one register per packed panel row.
///
/// # Safety
/// The CPU must have the AVX-512 tier; operands as `panels` checks them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn panel_gemv(
    w: super::panel_gemv::Panels<'_>,
    x: &[f32],
    range: (usize, usize),
    out: &mut [f32],
    accumulate: bool,
) {
    // SAFETY: forwarded contract; features enabled on this function.
    unsafe { super::panel_gemv::simd::<__m512>(w, x, range, out, accumulate) }
}
