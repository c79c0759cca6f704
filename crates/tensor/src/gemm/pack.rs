//! Packing: A blocks into `MR`-row micro-panels, and the [`PackB`] implementations for strided
//! f32 and f16 matrices (row-contiguous, column-contiguous and general strides).

use super::{MatRef, PackB, NR};
use crate::cpu::{kernel_path, KernelPath};
use half::f16;

/// Packs `A[i0..i0+mc, k0..k0+kc]` into `ceil(mc / MR)` micro-panels of `kc * MR` floats:
/// panel `q`, element `(i, p)` at `dst[q * kc * MR + p * MR + i]`, rows past `mc` zero. The
/// panel height `MR` (1..=16) is a constant, so that the short copies compile to moves.
///
/// Shapes: `a` is `m x k`; `dst.len() >= ceil(mc / MR) * kc * MR`.
/// `path` must have gone through [`KernelPath::supported`].
pub(crate) fn pack_a<const MR: usize>(
    path: KernelPath,
    a: &MatRef<'_, f32>,
    i0: usize,
    mc: usize,
    k0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    let panels = mc.div_ceil(MR);
    for q in 0..panels {
        let rows = MR.min(mc - q * MR);
        let d = &mut dst[q * kc * MR..(q + 1) * kc * MR];
        let r0 = i0 + q * MR;
        if a.col_stride == 1 && rows == MR {
            // Row-major A (x in the forward pass): MR contiguous rows, interleaved.
            let base = |i: usize| (r0 + i) * a.row_stride + k0;
            let s: [&[f32]; MR] = std::array::from_fn(|i| &a.data[base(i)..base(i) + kc]);
            #[cfg(target_arch = "x86_64")]
            if path.at_most_avx2() == KernelPath::Avx2Fma {
                // SAFETY: the path was checked to be supported by the CPU (and the AVX-512
                // tier includes AVX2); each row slice has kc elements and `d` has kc * MR
                // (all sliced, so bounds-checked, above).
                unsafe { avx2::pack_a_rows(&s, kc, d) };
                continue;
            }
            let _ = path;
            for (p, out) in d.chunks_exact_mut(MR).enumerate() {
                for (o, src) in out.iter_mut().zip(s.iter()) {
                    *o = src[p];
                }
            }
        } else if a.row_stride == 1 {
            // Column-contiguous A (dyᵀ in the weight gradient): copy MR-long runs.
            for (p, out) in d.chunks_exact_mut(MR).enumerate() {
                let start = (k0 + p) * a.col_stride + r0;
                out[..rows].copy_from_slice(&a.data[start..start + rows]);
                out[rows..].fill(0.0);
            }
        } else {
            for (p, out) in d.chunks_exact_mut(MR).enumerate() {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = if i < rows { a.at(r0 + i, k0 + p) } else { 0.0 };
                }
            }
        }
    }
}

/// An element type B (or a GEMV weight) can be stored in: converts to f32, eight at a time
/// with SIMD where available.
pub(crate) trait BElem: Copy + Sync {
    /// The value as f32 (exact for f32 and f16).
    fn to_f32(self) -> f32;
    /// The slice itself if the elements are f32 already.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// `dst[..8] = src[..8]` as f32 on the AVX2 path.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C; `src` must be readable for 8 elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(src: *const Self) -> std::arch::x86_64::__m256;
    /// `dst[..16] = src[..16]` as f32 on the AVX-512 path.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `src` must be readable for 16 elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(src: *const Self) -> std::arch::x86_64::__m512;
}

impl BElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(src: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable floats and AVX support.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(src) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(src: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable floats and AVX-512 F support.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(src) }
    }
}

impl BElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(src: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable f16 (16 bytes) and F16C support.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(src: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable f16 (32 bytes) and AVX-512 F support.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i)) }
    }
}

/// Shared [`PackB::pack_panel`] for f32 and f16 strided matrices: picks the SIMD or scalar
/// route by the process's [`kernel_path`] and B's strides. All routes write the same values.
fn pack_b_panel<T: BElem>(
    b: &MatRef<'_, T>,
    k0: usize,
    kc: usize,
    n0: usize,
    nc: usize,
    dst: &mut [f32],
) {
    // The contract (nc <= NR, ranges inside B, dst long enough) is the caller's; checking it
    // here keeps an out-of-contract call from reaching the unchecked SIMD loads below.
    let in_contract = nc <= NR
        && k0.checked_add(kc).is_some_and(|e| e <= b.rows)
        && n0.checked_add(nc).is_some_and(|e| e <= b.cols)
        && kc.checked_mul(NR).is_some_and(|l| l <= dst.len());
    #[cfg(target_arch = "x86_64")]
    if in_contract && kc > 0 && nc > 0 && kernel_path().at_most_avx2() == KernelPath::Avx2Fma {
        // SAFETY: at_most_avx2() gives Avx2Fma only if the CPU has AVX2, FMA and F16C, and
        // the ranges were checked to lie inside B and dst just above.
        unsafe { avx2::pack_b(b, k0, kc, n0, nc, dst) };
        return;
    }
    let _ = in_contract;
    let dst = &mut dst[..kc * NR];
    if b.col_stride == 1 {
        for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
            let s = (k0 + p) * b.row_stride + n0;
            for (d, &v) in row.iter_mut().zip(&b.data[s..s + nc]) {
                *d = v.to_f32();
            }
            row[nc..].fill(0.0);
        }
    } else {
        for (p, row) in dst.chunks_exact_mut(NR).enumerate() {
            for (j, d) in row.iter_mut().enumerate() {
                *d = if j < nc {
                    b.at(k0 + p, n0 + j).to_f32()
                } else {
                    0.0
                };
            }
        }
    }
}

/// f32 and f16 matrices (any strides) pack straight from memory, f16 converted on the way.
impl<T: BElem> PackB for MatRef<'_, T> {
    fn k(&self) -> usize {
        self.rows
    }
    fn n(&self) -> usize {
        self.cols
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        pack_b_panel(self, k0, kc, n0, nc, dst)
    }
    /// An f32 matrix with unit column stride (f16 ones must be converted: `None`).
    fn as_row_major(&self) -> Option<(&[f32], usize)> {
        if self.col_stride == 1 {
            T::as_f32(self.data).map(|d| (d, self.row_stride))
        } else {
            None
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BElem, MatRef, NR};
    use crate::simd::x86::transpose8_ps as transpose8;
    use std::arch::x86_64::*;

    /// AVX2/F16C B-panel packer: `dst[p * NR + j] = B[k0 + p, n0 + j]` (`kc x NR`, zero for
    /// `j >= nc`), where B is `k x n` with any strides.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `k0 + kc <= B.rows`, `n0 + nc <= B.cols`,
    /// `nc <= NR`, `dst.len() >= kc * NR`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn pack_b<T: BElem>(
        b: &MatRef<'_, T>,
        k0: usize,
        kc: usize,
        n0: usize,
        nc: usize,
        dst: &mut [f32],
    ) {
        // SAFETY: forwarded contract; features enabled on this function.
        unsafe { body(b, k0, kc, n0, nc, dst) }
    }

    /// Interleaves `MR` rows (1..=16): `d[p * MR + i] = s[i][p]` for `p < kc` (an A
    /// micro-panel), eight columns at a time through 8x8 register transposes, eight rows per
    /// transpose.
    ///
    /// # Safety
    /// The CPU must have AVX2; `1 <= MR <= 16`, every `s[i].len() >= kc` and
    /// `d.len() >= kc * MR`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_a_rows<const MR: usize>(s: &[&[f32]; MR], kc: usize, d: &mut [f32]) {
        let mr = MR;
        let chunks = mr.div_ceil(8);
        // The lanes of the last chunk's 8-wide store that hold rows of the panel.
        let last_rows = mr - (chunks - 1) * 8;
        let lanes: [i32; 8] = std::array::from_fn(|l| if l < last_rows { -1 } else { 0 });
        // SAFETY: loading an array of 8 i32 (32 bytes).
        let mask = unsafe { _mm256_loadu_si256(lanes.as_ptr() as *const __m256i) };
        let dp = d.as_mut_ptr();
        let mut p = 0;
        // SAFETY: loads read s[i][p..p + 8] with p + 8 <= kc <= s[i].len(). Chunk c of
        // column p + q is stored at (p + q) * mr + 8c, columns in order and chunks in order
        // within a column: a chunk before the last ends inside its column; the last chunk's
        // plain store spills its lanes past the rows into the next column (p + q + 1 < kc,
        // so inside d), which is stored after it; the last column's last chunk is masked.
        unsafe {
            while p + 8 <= kc {
                let mut t = [[_mm256_setzero_ps(); 8]; 2];
                for (c, tc) in t.iter_mut().enumerate().take(chunks) {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (i, row) in s.iter().skip(8 * c).take(8).enumerate() {
                        r[i] = _mm256_loadu_ps(row.as_ptr().add(p));
                    }
                    *tc = transpose8(r);
                }
                for q in 0..8 {
                    for (c, tc) in t.iter().enumerate().take(chunks) {
                        let at = dp.add((p + q) * mr + 8 * c);
                        if c + 1 < chunks || p + q + 1 < kc {
                            // Plain stores are several times cheaper than masked ones on Zen.
                            _mm256_storeu_ps(at, tc[q]);
                        } else {
                            _mm256_maskstore_ps(at, mask, tc[q]);
                        }
                    }
                }
                p += 8;
            }
        }
        for p in p..kc {
            for (i, row) in s.iter().enumerate() {
                d[p * mr + i] = row[p];
            }
        }
    }

    /// Shapes: B `k x n` strided, panel `kc x NR` into `dst`.
    ///
    /// # Safety
    /// As [`pack_b`].
    #[inline(always)]
    unsafe fn body<T: BElem>(
        b: &MatRef<'_, T>,
        k0: usize,
        kc: usize,
        n0: usize,
        nc: usize,
        dst: &mut [f32],
    ) {
        let src = b.data.as_ptr();
        let (rs, cs) = (b.row_stride, b.col_stride);
        let d = dst.as_mut_ptr();
        // SAFETY: (whole block) every source index is (k0 + p) * rs + (n0 + j) * cs with
        // p < kc, j < nc, inside `b.data` because MatRef::new checked its last element and the
        // caller checked the ranges; every destination index is p * NR + j < kc * NR.
        unsafe {
            if cs == 1 && nc == NR {
                // Row-contiguous B (W in the input gradient, X in the weight gradient).
                for p in 0..kc {
                    let s = src.add((k0 + p) * rs + n0);
                    _mm256_storeu_ps(d.add(p * NR), T::load8(s));
                    _mm256_storeu_ps(d.add(p * NR + 8), T::load8(s.add(8)));
                }
            } else if rs == 1 {
                // Column-contiguous B (Wᵀ in the forward pass): 8x8 register transposes.
                for h in 0..2 {
                    let j0 = h * 8;
                    if nc >= j0 + 8 {
                        let col = |j: usize| src.add((n0 + j0 + j) * cs + k0);
                        let mut p = 0;
                        while p + 8 <= kc {
                            let mut r = [_mm256_setzero_ps(); 8];
                            for (j, v) in r.iter_mut().enumerate() {
                                *v = T::load8(col(j).add(p));
                            }
                            let t = transpose8(r);
                            for (q, v) in t.iter().enumerate() {
                                _mm256_storeu_ps(d.add((p + q) * NR + j0), *v);
                            }
                            p += 8;
                        }
                        for p in p..kc {
                            for j in 0..8 {
                                *d.add(p * NR + j0 + j) = (*col(j).add(p)).to_f32();
                            }
                        }
                    } else {
                        for p in 0..kc {
                            for j in 0..8 {
                                let jj = j0 + j;
                                *d.add(p * NR + jj) = if jj < nc {
                                    (*src.add((n0 + jj) * cs + k0 + p)).to_f32()
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            } else {
                for p in 0..kc {
                    for j in 0..NR {
                        *d.add(p * NR + j) = if j < nc {
                            (*src.add((k0 + p) * rs + (n0 + j) * cs)).to_f32()
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::available_paths;

    /// Every path packs A micro-panels of every tile height exactly as the definition says
    /// (row-major, column-major and general strides; rows past `mc` zero), on awkward sizes.
    fn check_height<const R: usize>() {
        let (m, k) = (37usize, 140usize);
        let data: Vec<f32> = (0..m * k * 2).map(|v| v as f32 + 0.5).collect();
        let views = [
            MatRef::new(&data, m, k, k, 1).unwrap(),
            MatRef::new(&data, m, k, 1, m).unwrap(),
            MatRef::new(&data, m, k, 2 * k, 2).unwrap(),
        ];
        for a in &views {
            for (i0, mc) in [(0, m), (1, 1), (3, R), (2, R + 1), (5, 2 * R - 1)] {
                for (k0, kc) in [(0, 0), (0, 1), (3, 7), (1, 17), (0, 33), (7, 129)] {
                    let panels = mc.div_ceil(R);
                    for path in available_paths() {
                        let mut dst = vec![f32::NAN; panels * kc * R];
                        pack_a::<R>(path, a, i0, mc, k0, kc, &mut dst);
                        for q in 0..panels {
                            for p in 0..kc {
                                for i in 0..R {
                                    let r = q * R + i;
                                    let want = if r < mc { a.at(i0 + r, k0 + p) } else { 0.0 };
                                    let got = dst[q * kc * R + p * R + i];
                                    assert_eq!(
                                        got.to_bits(),
                                        want.to_bits(),
                                        "R={R} {path:?} i0={i0} mc={mc} k0={k0} kc={kc}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pack_a_matches_definition_for_every_tile_height() {
        check_height::<6>();
        check_height::<8>();
        check_height::<12>();
        check_height::<14>();
    }
}
