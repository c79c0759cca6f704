//! The AVX2 tier (AVX2 + FMA + F16C): every format's kernels, one submodule per format,
//! and the helpers they share.

pub(crate) mod int8;
pub(crate) mod int8_int8;
pub(crate) mod lower;
pub(crate) mod lower_int8;
pub(crate) mod nf4;
pub(crate) mod nf4_int8;
pub(crate) mod q4;
pub(crate) mod q4_int8;

pub(crate) use nibble_tensor::simd::x86::transpose8_ps as transpose8;
use std::arch::x86_64::*;

/// [`crate::act8`]'s low-rank tail on one tile, the AVX-512 twin's bits
/// ([`crate::arch::avx512::low_rank_tile`]): rows of 16 columns (two ymm per panel), a row at
/// a time in chunks of 4 rows; the last panel's columns past `cols` by scalar fused
/// multiply-adds in the same order.
///
/// # Safety
/// The CPU has AVX2 and FMA; as the AVX-512 twin's.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn low_rank_tile(tile: crate::act8::TailTile) {
    // SAFETY: the caller's contract: every access lies in h's rows below `rows`, bt's panels
    // of columns below `cols`, y's rows below `rows` and columns below `cols`.
    unsafe {
        for u in 0..tile.cols.div_ceil(16) {
            let (b, width) = (tile.bt.add(u * tile.panel), 16.min(tile.cols - 16 * u));
            for r in 0..tile.rows {
                let hr = tile.h.add(r * tile.rank);
                let d = tile.y.add(r * tile.ldy + 16 * u);
                if width == 16 {
                    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for p in 0..tile.rank {
                        let hv = _mm256_set1_ps(*hr.add(p));
                        a0 = _mm256_fmadd_ps(hv, _mm256_loadu_ps(b.add(p * 16)), a0);
                        a1 = _mm256_fmadd_ps(hv, _mm256_loadu_ps(b.add(p * 16 + 8)), a1);
                    }
                    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), a0));
                    _mm256_storeu_ps(d.add(8), _mm256_add_ps(_mm256_loadu_ps(d.add(8)), a1));
                } else {
                    for j in 0..width {
                        let mut a = 0.0f32;
                        for p in 0..tile.rank {
                            a = (*hr.add(p)).mul_add(*b.add(p * 16 + j), a);
                        }
                        *d.add(j) += a;
                    }
                }
            }
        }
    }
}

/// A row's 16 f32 lanes of a fused int8 GEMV (the AVX-512 kernels' zmm) as two ymm: lanes 0–7
/// and 8–15 (`int8_int8`, `nf4_int8`, `lower_int8`).
pub(crate) type Lanes16 = [__m256; 2];

/// [`crate::act8::fold16`] on the registers: `f = lo + hi`, `g = f[0..4] + f[4..8]`, then
/// `(g0 + g2) + (g1 + g3)`: the same sum, bit for bit.
///
/// # Safety
/// AVX enabled by the caller.
#[inline(always)]
pub(crate) unsafe fn fold16(a: &Lanes16) -> f32 {
    // SAFETY: register work on the caller's target features.
    unsafe {
        let f = _mm256_add_ps(a[0], a[1]);
        let g = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps::<1>(f));
        let h = _mm_add_ps(g, _mm_movehl_ps(g, g));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }
}

/// The lanes as 16 floats, lanes 0–7 then 8–15.
///
/// # Safety
/// AVX enabled by the caller.
#[inline(always)]
unsafe fn lanes(a: &Lanes16) -> [f32; 16] {
    let mut l = [0.0f32; 16];
    // SAFETY: 16 writable floats; the caller's target features.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(l.as_mut_ptr().add(8), a[1]);
    }
    l
}

/// A row's result from its lanes after the whole groups of 128 (`int8_int8`, `lower_int8`):
/// the groups `rest` (a partial last group, if x has one) by the format's scalar reference
/// step `step(g, lanes)` on the lanes as floats, then [`crate::act8::fold16`]'s tree; with
/// `rest` empty, [`fold16`] on the registers (the same bits).
///
/// # Safety
/// AVX enabled by the caller.
#[inline(always)]
pub(crate) unsafe fn finish_lanes(
    a: &Lanes16,
    rest: std::ops::Range<usize>,
    mut step: impl FnMut(usize, &mut [f32; 16]),
) -> f32 {
    if rest.is_empty() {
        // SAFETY: register work on the caller's target features.
        return unsafe { fold16(a) };
    }
    // SAFETY: stack work on the caller's target features.
    let mut l = unsafe { lanes(a) };
    for g in rest {
        step(g, &mut l);
    }
    crate::act8::fold16(l)
}

/// The rows' lanes of one sweep over a row for a part of a small batch: `$sweep` evaluated with
/// `const $p: usize` the part's size `$n` (1 to 4), its `[Lanes16; $p]` padded to four (the
/// fused GEMVs' batch kernels take a batch in parts of at most four vectors, [`batch_parts`],
/// so that every accumulator stays in a register).
macro_rules! part_lanes {
    ($n:expr, $p:ident => $sweep:expr) => {{
        #[inline(always)]
        fn pad<const P: usize>(
            a: [$crate::arch::avx2::Lanes16; P],
        ) -> [$crate::arch::avx2::Lanes16; 4] {
            // SAFETY: zeroed `__m256` are valid (all-zero floats).
            let mut out: [$crate::arch::avx2::Lanes16; 4] = unsafe { std::mem::zeroed() };
            out[..P].copy_from_slice(&a);
            out
        }
        match $n {
            1 => {
                const $p: usize = 1;
                pad($sweep)
            }
            2 => {
                const $p: usize = 2;
                pad($sweep)
            }
            3 => {
                const $p: usize = 3;
                pad($sweep)
            }
            _ => {
                const $p: usize = 4;
                $sweep
            }
        }
    }};
}
pub(crate) use part_lanes;

/// The four entry points of a 256-bit fused int8 GEMV over the matrix type `$m`, from the
/// file's `gemv_with::<D>` (batch 1) and `rows_batch::<D, V>` (2 to 8 vectors) on the step
/// `D`: `gemv_avxvnni` / `gemv_batch_avxvnni` with `vpdpbusd` (AVX-VNNI), `gemv_avx2` /
/// `gemv_batch_avx2` on the plain-AVX2 step `$avx2`, by default `vpdpbusd`'s sums by `vpmaddwd`
/// pairs (`DpbusdEmulated`, exact for any bytes); a format whose runs of products stay within
/// `vpmaddubsw`'s i16 sums names `Maddubs` (exact there, fewer instructions). Either way the
/// same integer sums, so the same bits. Batch 1: `y[j] (+)= W[rows.start + j, :] · x'` (with
/// `acc`); small batches: `out[v · stride + j] = W[rows.start + j, :] · x'_v` (`false`,
/// nothing written, for another count than 2 to 8).
macro_rules! fused_gemv_entry_points {
    ($m:ty) => {
        fused_gemv_entry_points!($m, $crate::act8::avxvnni::DpbusdEmulated);
    };
    ($m:ty, $avx2:ty) => {
        fused_gemv_entry_points!(@one $m, gemv_avxvnni, gemv_batch_avxvnni,
            $crate::act8::avxvnni::Dpbusd, "avx2,fma,avxvnni", "AVX-VNNI, AVX2 and FMA");
        fused_gemv_entry_points!(@one $m, gemv_avx2, gemv_batch_avx2,
            $avx2, "avx2,fma", "AVX2 and FMA");
    };
    (@one $m:ty, $gemv:ident, $batch:ident, $step:ty, $features:literal, $cpu:literal) => {
        #[doc = concat!("Batch 1 on the step [`", stringify!($step), "`] (see [`fused_gemv_entry_points`]).")]
        ///
        /// # Safety
        #[doc = concat!("The CPU has ", $cpu, "; `prep` is a whole preparation of x for `m`, `rows ⊆ 0..out`, `y.len() >= rows.len()`.")]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $gemv(
            m: &$m,
            prep: &[f32],
            rows: std::ops::Range<usize>,
            y: &mut [f32],
            acc: bool,
        ) {
            // SAFETY: the caller's contract.
            unsafe { gemv_with::<$step>(m, prep, rows, y, acc) }
        }

        #[doc = concat!("2 to 8 vectors on the step [`", stringify!($step), "`], each (row, vector) with the batch-1 kernel's bits (see [`fused_gemv_entry_points`]).")]
        ///
        /// # Safety
        #[doc = concat!("The CPU has ", $cpu, "; every prep a whole preparation for `m`, `rows ⊆ 0..out`, `stride >= rows.len()` and `out.len() >= (preps.len() - 1) · stride + rows.len()`.")]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $batch(
            m: &$m,
            preps: &[&[f32]],
            rows: std::ops::Range<usize>,
            out: &mut [f32],
            stride: usize,
        ) -> bool {
            with_batch_count!(preps, V, preps_v =>
                // SAFETY: the caller's contract, for the V vectors of the arm.
                unsafe { rows_batch::<$step, V>(m, preps_v, rows, out, stride) }
            )
        }
    };
}
pub(crate) use fused_gemv_entry_points;

/// A small batch of `v` vectors in parts of at most four (sizes differing by at most one): the
/// ranges of vectors, in order.
pub(crate) fn batch_parts(v: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let n = v.div_ceil(4);
    (0..n).map(move |p| p * v / n..(p + 1) * v / n)
}

/// Horizontal sum of 8 lanes.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Largest lane of `v` (the same reduction tree as [`hsum`], with `max`).
#[inline(always)]
pub(crate) unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
}

/// `a · b` (equal lengths).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    while k + 32 <= n {
        for (u, accu) in acc.iter_mut().enumerate() {
            // SAFETY: k + 8u + 8 <= n, inside both slices.
            *accu = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(k + 8 * u)),
                _mm256_loadu_ps(pb.add(k + 8 * u)),
                *accu,
            );
        }
        k += 32;
    }
    while k + 8 <= n {
        // SAFETY: k + 8 <= n.
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(k)),
            _mm256_loadu_ps(pb.add(k)),
            acc[0],
        );
        k += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum(v);
    for j in k..n {
        s += a[j] * b[j];
    }
    s
}

/// f16 → f32 with F16C; `dst.len() == src.len()`.
#[inline(always)]
pub(crate) unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut k = 0;
    while k + 8 <= n {
        // SAFETY: k + 8 <= n, 8 halves = 16 bytes read, 8 floats written.
        let h = _mm_loadu_si128(src.as_ptr().add(k) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(k), _mm256_cvtph_ps(h));
        k += 8;
    }
    for j in k..n {
        dst[j] = src[j].to_f32();
    }
}

/// Looks up 8 codes (0..15, one per i32 lane) in a 16-entry f32 table held as two halves.
#[inline(always)]
pub(crate) unsafe fn lut16(lo: __m256, hi: __m256, idx: __m256i) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lo, idx);
    let b = _mm256_permutevar8x32_ps(hi, idx);
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
}

/// Looks up 8 codes in a 16-entry table held as two halves: `perm` supplies the low 3 bits
/// of each lane's code (higher bits are ignored) and the sign bit of `sel` picks the half.
#[inline(always)]
pub(crate) unsafe fn lut16_sel(lo: __m256, hi: __m256, perm: __m256i, sel: __m256i) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lo, perm);
    let b = _mm256_permutevar8x32_ps(hi, perm);
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(sel))
}

/// 16 floats (one per panel row) as the two 8-lane halves [`store_panel_run`]'s `value` takes.
#[inline(always)]
pub(crate) unsafe fn load16(v: &[f32; 16]) -> [__m256; 2] {
    // SAFETY: 16 readable floats.
    [
        _mm256_loadu_ps(v.as_ptr()),
        _mm256_loadu_ps(v.as_ptr().add(8)),
    ]
}

/// One forward GEMM panel's run of 16 columns from up to 16 rows of codes, the AVX2 twin of
/// the AVX-512 tier's `store_panel_run`: `codes(j)` is row `j`'s 16 codes as two 8-lane
/// halves (asked only for `j < rows`); transposed by 8x8 blocks, column `q`'s codes of the
/// rows `8h..8h + 8` go through `value(codes, h)` (the format's lookup and scale per lane,
/// so each half's per-row scales apply as one vector) and are stored, zeros past `rows`, at
/// `dst + q · 16 + 8h`. Shapes: `rows <= 16` and 256 writable floats at `dst` (the caller's
/// `ColBlock::fits_panel`).
#[inline(always)]
pub(crate) unsafe fn store_panel_run(
    rows: usize,
    dst: *mut f32,
    codes: impl Fn(usize) -> [__m256i; 2],
    value: impl Fn(__m256i, usize) -> __m256,
) {
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for h in 0..2 {
        let n = rows.saturating_sub(8 * h).min(8);
        let keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane));
        let mut halves = [[_mm256_setzero_ps(); 8]; 2];
        for j in 0..n {
            let c = codes(8 * h + j);
            halves[0][j] = _mm256_castsi256_ps(c[0]);
            halves[1][j] = _mm256_castsi256_ps(c[1]);
        }
        for (cc, rows8) in halves.iter().enumerate() {
            for (q, c) in transpose8(*rows8).iter().enumerate() {
                let v = if n == 0 {
                    _mm256_setzero_ps()
                } else {
                    _mm256_and_ps(value(_mm256_castps_si256(*c), h), keep)
                };
                // SAFETY: (caller) 256 writable floats at dst.
                _mm256_storeu_ps(dst.add((cc * 8 + q) * 16 + 8 * h), v);
            }
        }
    }
}

/// Shapes: `src` is `NR` rows of `stride` floats (row `j` = panel column `j`), `dst` is
/// `len x NR`: `dst[p * NR + j] = src[j * stride + p]` for `p < len`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn transpose_panel(src: &[f32], stride: usize, len: usize, dst: &mut [f32]) {
    transpose_panel_body(src, stride, len, dst)
}

#[inline(always)]
unsafe fn transpose_panel_body(src: &[f32], stride: usize, len: usize, dst: &mut [f32]) {
    use nibble_tensor::gemm::NR;
    if src.len() < (NR - 1) * stride + len || dst.len() < len * NR || len > stride {
        return;
    }
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut p = 0;
    while p + 8 <= len {
        for h in 0..NR / 8 {
            // SAFETY: rows 8h..8h+8 of src, columns p..p+8 < len <= stride: inside src
            // (checked above); dst rows p..p+8, columns 8h..8h+8 inside len * NR.
            let r: [__m256; 8] =
                std::array::from_fn(|q| _mm256_loadu_ps(s.add((8 * h + q) * stride + p)));
            let t = transpose8(r);
            for (q, v) in t.iter().enumerate() {
                _mm256_storeu_ps(d.add((p + q) * NR + 8 * h), *v);
            }
        }
        p += 8;
    }
    for p in p..len {
        for j in 0..NR {
            dst[p * NR + j] = src[j * stride + p];
        }
    }
}
