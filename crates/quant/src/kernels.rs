//! Format-independent kernel machinery: the small-batch GEMV driver, the two [`PackB`] adapters
//! (forward over `Wᵀ`, backward over `W`), dot products, and the `WeightMatrix` glue.

use std::ops::Range;

use nibble_tensor::gemm::{gemm, MatRef, PackB, NR};
use nibble_tensor::weight::check_matmul_operands;
use nibble_tensor::Tensor;
use rayon::prelude::*;

use crate::cpu::{kernel_path, usable, KernelPath};

/// Batches below this use the fused GEMV; from it on, the packed-panel GEMM.
pub(crate) const GEMM_MIN_M: usize = 16;

/// A quantized `out x in` matrix seen row by row.
pub(crate) trait QuantRows: Sync + Send {
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// Column granularity of [`QuantRows::dequant_segment`].
    fn seg_align(&self) -> usize;
    /// Writes `W[r, c0..c0+len]` into `dst[..len]`; `c0` is a multiple of `seg_align()` and so
    /// is `len` unless `c0 + len == in`.
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]);
    /// Per-input precomputation for [`QuantRows::gemv`] (e.g. block sums of `x`).
    fn gemv_prepare(&self, _path: KernelPath, _x: &[f32]) -> Vec<f32> {
        Vec::new()
    }
    /// `y[j] = W[rows.start + j, :] · x` for the rows in `rows`.
    fn gemv(&self, path: KernelPath, x: &[f32], _prep: &[f32], rows: Range<usize>, y: &mut [f32]) {
        let (_, i) = self.dims();
        let mut row = vec![0.0f32; i];
        for (r, yv) in rows.zip(y.iter_mut()) {
            self.dequant_segment(path, r, 0, i, &mut row);
            *yv = dot(path, &row, x);
        }
    }
}

/// `a · b` with the path's SIMD (the summation order differs between paths, never between
/// thread counts).
pub(crate) fn dot(path: KernelPath, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    match usable(path) {
        KernelPath::Scalar => a[..n].iter().zip(&b[..n]).map(|(x, y)| x * y).sum(),
        KernelPath::Portable => {
            use wide::f32x8;
            let mut acc = f32x8::ZERO;
            let mut k = 0;
            while k + 8 <= n {
                let x = f32x8::from(<[f32; 8]>::try_from(&a[k..k + 8]).unwrap_or([0.0; 8]));
                let y = f32x8::from(<[f32; 8]>::try_from(&b[k..k + 8]).unwrap_or([0.0; 8]));
                acc += x * y;
                k += 8;
            }
            let mut s = acc.reduce_add();
            for j in k..n {
                s += a[j] * b[j];
            }
            s
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2 only if the CPU has AVX2 and FMA.
        KernelPath::Avx2 => unsafe { avx2::dot(&a[..n], &b[..n]) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2 => dot(KernelPath::Portable, a, b),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
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
}

fn rows_chunk(out: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    (out.div_ceil(t * 4)).div_ceil(8).max(1) * 8
}

/// Forward `y = x · Wᵀ` for any format.
pub(crate) fn matmul_t<F: QuantRows>(
    f: &F,
    x: &[f32],
    m: usize,
    y: &mut [f32],
    accumulate: bool,
) -> nibble_tensor::Result<()> {
    let (o, i) = f.dims();
    check_matmul_operands("linear", m, x.len(), i, y.len(), o)?;
    let path = usable(kernel_path());
    if m == 0 || o == 0 {
        return Ok(());
    }
    if m >= GEMM_MIN_M {
        let pack = FwdPack { f, path };
        return gemm(MatRef::row_major(x, m, i)?, &pack, y, accumulate);
    }
    let preps: Vec<Vec<f32>> = (0..m)
        .map(|b| f.gemv_prepare(path, &x[b * i..(b + 1) * i]))
        .collect();
    let chunk = rows_chunk(o);
    if m == 1 {
        y.par_chunks_mut(chunk).enumerate().for_each(|(ci, yc)| {
            let rows = ci * chunk..ci * chunk + yc.len();
            if accumulate {
                let mut t = vec![0.0f32; yc.len()];
                f.gemv(path, x, &preps[0], rows, &mut t);
                yc.iter_mut().zip(&t).for_each(|(a, b)| *a += b);
            } else {
                f.gemv(path, x, &preps[0], rows, yc);
            }
        });
        return Ok(());
    }
    let mut yt = vec![0.0f32; o * m];
    yt.par_chunks_mut(chunk * m)
        .enumerate()
        .for_each(|(ci, c)| {
            let nr = c.len() / m;
            let r0 = ci * chunk;
            let mut t = vec![0.0f32; nr];
            for b in 0..m {
                f.gemv(path, &x[b * i..(b + 1) * i], &preps[b], r0..r0 + nr, &mut t);
                for j in 0..nr {
                    c[j * m + b] = t[j];
                }
            }
        });
    for b in 0..m {
        let yr = &mut y[b * o..(b + 1) * o];
        for (r, v) in yr.iter_mut().enumerate() {
            let t = yt[r * m + b];
            *v = if accumulate { *v + t } else { t };
        }
    }
    Ok(())
}

/// Backward `dx = dy · W` for any format (GEMM over panels of `W`).
pub(crate) fn matmul<F: QuantRows>(
    f: &F,
    dy: &[f32],
    m: usize,
    dx: &mut [f32],
    accumulate: bool,
) -> nibble_tensor::Result<()> {
    let (o, i) = f.dims();
    check_matmul_operands("linear_backward_input", m, dy.len(), o, dx.len(), i)?;
    let pack = BwdPack {
        f,
        path: usable(kernel_path()),
    };
    gemm(MatRef::row_major(dy, m, o)?, &pack, dx, accumulate)
}

/// The whole matrix as f32 (rows in parallel).
pub(crate) fn to_f32<F: QuantRows>(f: &F, path: KernelPath) -> Tensor {
    let (o, i) = f.dims();
    let mut t = Tensor::zeros(&[o, i]);
    if i > 0 {
        t.data_mut()
            .par_chunks_mut(i)
            .enumerate()
            .for_each(|(r, row)| f.dequant_segment(usable(path), r, 0, i, row));
    }
    t
}

/// `Wᵀ` (k = in, n = out) as a GEMM right-hand side.
pub(crate) struct FwdPack<'a, F> {
    pub(crate) f: &'a F,
    pub(crate) path: KernelPath,
}

impl<F: QuantRows> PackB for FwdPack<'_, F> {
    fn k(&self) -> usize {
        self.f.dims().1
    }
    fn n(&self) -> usize {
        self.f.dims().0
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        let i = self.f.dims().1;
        let a = self.f.seg_align().max(1);
        let s0 = k0 / a * a;
        let e = (k0 + kc).div_ceil(a).saturating_mul(a).min(i);
        let mut scratch = vec![0.0f32; e - s0];
        for j in 0..NR {
            if j < nc {
                self.f
                    .dequant_segment(self.path, n0 + j, s0, e - s0, &mut scratch);
                let src = &scratch[k0 - s0..k0 - s0 + kc];
                for (p, v) in src.iter().enumerate() {
                    dst[p * NR + j] = *v;
                }
            } else {
                for p in 0..kc {
                    dst[p * NR + j] = 0.0;
                }
            }
        }
    }
}

/// `W` (k = out, n = in) as a GEMM right-hand side.
pub(crate) struct BwdPack<'a, F> {
    pub(crate) f: &'a F,
    pub(crate) path: KernelPath,
}

impl<F: QuantRows> PackB for BwdPack<'_, F> {
    fn k(&self) -> usize {
        self.f.dims().0
    }
    fn n(&self) -> usize {
        self.f.dims().1
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        let i = self.f.dims().1;
        let a = self.f.seg_align().max(1);
        let s0 = n0 / a * a;
        let e = (n0 + nc).div_ceil(a).saturating_mul(a).min(i);
        if s0 == n0 && e - s0 == nc {
            for p in 0..kc {
                let d = &mut dst[p * NR..(p + 1) * NR];
                self.f
                    .dequant_segment(self.path, k0 + p, n0, nc, &mut d[..nc]);
                d[nc..].fill(0.0);
            }
        } else {
            let mut scratch = vec![0.0f32; e - s0];
            for p in 0..kc {
                self.f
                    .dequant_segment(self.path, k0 + p, s0, e - s0, &mut scratch);
                let d = &mut dst[p * NR..(p + 1) * NR];
                d[..nc].copy_from_slice(&scratch[n0 - s0..n0 - s0 + nc]);
                d[nc..].fill(0.0);
            }
        }
    }
}

/// Implements `nibble_tensor::WeightMatrix` for a `QuantRows` type.
macro_rules! impl_weight_matrix {
    ($t:ty, $name:expr) => {
        impl nibble_tensor::WeightMatrix for $t {
            fn out_features(&self) -> usize {
                $crate::kernels::QuantRows::dims(self).0
            }
            fn in_features(&self) -> usize {
                $crate::kernels::QuantRows::dims(self).1
            }
            fn matmul_t(
                &self,
                x: &[f32],
                m: usize,
                y: &mut [f32],
                accumulate: bool,
            ) -> nibble_tensor::Result<()> {
                $crate::kernels::matmul_t(self, x, m, y, accumulate)
            }
            fn matmul(
                &self,
                dy: &[f32],
                m: usize,
                dx: &mut [f32],
                accumulate: bool,
            ) -> nibble_tensor::Result<()> {
                $crate::kernels::matmul(self, dy, m, dx, accumulate)
            }
            fn to_f32(&self) -> nibble_tensor::Tensor {
                $crate::kernels::to_f32(self, $crate::cpu::kernel_path())
            }
            fn storage_bytes(&self) -> usize {
                self.parts_len()
            }
            fn format_name(&self) -> &'static str {
                $name
            }
        }
    };
}
pub(crate) use impl_weight_matrix;

/// Runs `f(row, row_input, row_outputs...)` over rows in parallel and returns the error of the
/// lowest failing row, if any (deterministic whatever the thread count).
pub(crate) fn first_error<E: Send>(results: Vec<Result<(), E>>) -> Result<(), E> {
    results.into_iter().collect()
}

/// Checks `w` is a matrix whose columns are a multiple of `block`.
pub(crate) fn check_shape(
    op: &'static str,
    w: &Tensor,
    block: usize,
) -> crate::Result<(usize, usize)> {
    let (o, i) = w.dims2(op)?;
    if i % block != 0 {
        return Err(crate::QuantError::Shape {
            op,
            shape: vec![o, i],
            what: format!("in = {i} is not a multiple of the block size {block}"),
        });
    }
    Ok((o, i))
}
