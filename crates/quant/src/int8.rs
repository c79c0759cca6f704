//! Int8 affine: per output row a scale and a zero point mapping the row's `[min, max]` onto
//! the codes 0..=255.
//!
//! Storage: `codes` u8 `[out, in]`; `scales` f32 `[out]`; `zeros` f32 `[out]` (the row minimum).
//! `code = round((v − min) / scale)` with `scale = (max − min) / 255` (a constant row stores
//! scale 0 and code 0); `v' = min + scale · code`. 8 + 64/in bits per weight; on a
//! N(0, 1/√1024) 1024x1024 weight, measured max |Δ| 5.2e-4 (≈ scale/2), mean 2.0e-4.

use nibble_tensor::buffer::WeightBuf;
use nibble_tensor::Tensor;
use rayon::prelude::*;

pub(crate) mod act8;

#[cfg(target_arch = "x86_64")]
use crate::arch::avx2::int8 as avx2;
#[cfg(target_arch = "x86_64")]
use crate::arch::avx512::int8 as avx512;
use crate::bytes::{check_part, check_values, Bytes};
use crate::cpu::{is_x86_simd, usable, KernelPath};
use crate::error::{number, QuantError, Result};
use crate::kernels::{self, ColBlock, QuantRows};

/// Scalar ground truth: `out[k] = zero + scale · codes[k]` for `k < min(len)`.
pub fn dequantize_ref(codes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
    for (d, &q) in out.iter_mut().zip(codes) {
        *d = zero + scale * q as f32;
    }
}

/// [`dequantize_ref`] with the given kernel path (bit-identical: a multiply then an add, no
/// FMA); the SIMD loop covers whole runs of 8 and the scalar code finishes the tail.
pub fn dequantize(path: KernelPath, codes: &[u8], scale: f32, zero: f32, out: &mut [f32]) {
    let n = codes.len().min(out.len());
    let (codes, out) = (&codes[..n], &mut out[..n]);
    match usable(path) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2Fma, so the CPU has AVX2; equal lengths (sliced above).
        KernelPath::Avx2Fma => unsafe { avx2::dequantize(codes, scale, zero, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx512, so the CPU has AVX-512 F/BW/VL; equal lengths.
        KernelPath::Avx512 => unsafe { avx512::dequantize(codes, scale, zero, out) },
        _ => dequantize_ref(codes, scale, zero, out),
    }
}

/// A per-row affine int8 matrix (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    pub(crate) out: usize,
    pub(crate) inn: usize,
    pub(crate) codes: Bytes,
    pub(crate) scales: Bytes,
    pub(crate) zeros: Bytes,
}

impl Int8Matrix {
    /// Quantizes an `out x in` matrix. A NaN or infinite weight is a
    /// [`QuantError::NonFinite`]; a row whose range `max − min` overflows f32 (so that no
    /// finite scale maps it onto 0..=255) a [`QuantError::Overflow`] naming the row and its
    /// weight of largest magnitude (and that weight's column).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        const OP: &str = "int8_quantize";
        let (o, i) = w.dims2(OP)?;
        if let Some(k) = w.data().iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                op: OP,
                row: k / i,
                col: k % i,
                value: w.data()[k],
            });
        }
        // Codes and two f32 statistics per row (an `[o, 0]` weight holds no element but `o`
        // rows).
        kernels::check_rows_fit(OP, [o, i], i.saturating_add(8))?;
        let mut codes = WeightBuf::<u8>::zeroed(o * i);
        let mut scales = vec![0.0f32; o];
        let mut zeros = vec![0.0f32; o];
        if i > 0 {
            codes
                .par_chunks_mut(i)
                .zip(w.data().par_chunks(i))
                .zip(scales.par_iter_mut().zip(zeros.par_iter_mut()))
                .for_each(|((c, x), (s, z))| {
                    let lo = x.iter().fold(f32::INFINITY, |a, &b| a.min(b));
                    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    *z = lo;
                    *s = (hi - lo) / 255.0;
                    for (cv, &v) in c.iter_mut().zip(x) {
                        *cv = if *s > 0.0 {
                            ((v - lo) / *s).round().clamp(0.0, 255.0) as u8
                        } else {
                            0
                        };
                    }
                });
        }
        // A row whose range `max − min` overflows f32 has no finite scale (or one whose
        // dequantized top code `scale · 255` does): it would dequantize to NaN or infinities.
        if let Some(r) = (0..o).find(|&r| !(scales[r] * 255.0).is_finite()) {
            let row = &w.data()[r * i..(r + 1) * i];
            let col = (0..i)
                .max_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()).then(b.cmp(&a)))
                .unwrap_or(0);
            let value = row.get(col).copied().unwrap_or(0.0);
            let hi = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            return Err(QuantError::Overflow {
                op: OP,
                row: r,
                col: 0,
                value,
                storage: "f32",
                what: format!(
                    "row {r} spans {} to {} (weight {} at column {col}): its scale (max − min) / 255 overflows f32",
                    number(zeros[r]),
                    number(hi),
                    number(value)
                ),
            });
        }
        Self::from_parts(
            o,
            i,
            Bytes::from_weight_buf(codes),
            Bytes::from_f32(scales),
            Bytes::from_f32(zeros),
        )
    }

    /// Builds from raw parts: `codes` u8 `[out, in]`, `scales` f32 `[out]`, `zeros` f32 `[out]`.
    /// A part of the wrong length is a [`QuantError::PartLength`]; a NaN or infinite scale or
    /// zero point a [`QuantError::PartValue`] naming the part and the row (an affine row
    /// dequantizes with a scale of either sign, so the sign is not checked).
    pub fn from_parts(
        out: usize,
        inn: usize,
        codes: Bytes,
        scales: Bytes,
        zeros: Bytes,
    ) -> Result<Self> {
        const OP: &str = "Int8Matrix::from_parts";
        let n = out.checked_mul(inn).ok_or_else(|| QuantError::Shape {
            op: OP,
            shape: vec![out, inn],
            what: "size overflows".into(),
        })?;
        let row_stats = out.checked_mul(4).ok_or_else(|| QuantError::Shape {
            op: OP,
            shape: vec![out, inn],
            what: "size overflows".into(),
        })?;
        check_part(OP, "codes", out, inn, &codes, n)?;
        check_part(OP, "scales", out, inn, &scales, row_stats)?;
        check_part(OP, "zeros", out, inn, &zeros, row_stats)?;
        let m = Int8Matrix {
            out,
            inn,
            codes,
            scales: scales.aligned(4),
            zeros: zeros.aligned(4),
        };
        check_values(OP, "scales", m.scales.f32s().iter().copied(), false)?;
        check_values(OP, "zeros", m.zeros.f32s().iter().copied(), false)?;
        // Finite parts whose weights are not: the largest code must still give an f32.
        let rows = m.scales.f32s().iter().zip(m.zeros.f32s()).enumerate();
        for (index, (&scale, &min)) in rows {
            let top = min + scale * 255.0;
            if !top.is_finite() {
                return Err(QuantError::PartValue {
                    op: OP,
                    part: "scales",
                    index,
                    what: format!(
                        "{scale} with minimum {min} takes code 255 to {top}: beyond f32's range"
                    ),
                });
            }
        }
        Ok(m)
    }

    /// Rows (`out`) and columns (`in`).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inn)
    }

    /// The raw parts `(codes, scales, zeros)`.
    pub fn parts(&self) -> (&Bytes, &Bytes, &Bytes) {
        (&self.codes, &self.scales, &self.zeros)
    }

    /// Bits per weight, all parts included.
    pub fn bits_per_weight(&self) -> f64 {
        self.parts_len() as f64 * 8.0 / (self.out * self.inn).max(1) as f64
    }

    /// The whole matrix dequantized with an explicit kernel path (bit-identical on every path).
    pub fn dequantize_with(&self, path: KernelPath) -> Tensor {
        kernels::to_f32(self, path)
    }

    fn parts_len(&self) -> usize {
        self.codes.len() + self.scales.len() + self.zeros.len()
    }
}

impl QuantRows for Int8Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn act8_view(&self) -> Option<&dyn crate::act8::IntCodes> {
        Some(self)
    }
    fn act8_generic(&self, m: usize) -> bool {
        crate::act8::int8_route("int8", m) == crate::act8::Int8Route::Generic
    }
    fn act8_fused(&self, m: usize) -> bool {
        act8::FUSED.takes(m)
    }
    /// The fused int8 GEMV's batch kernel (`int8_int8::gemv_batch`, through
    /// [`crate::act8::FusedGemv::run_batch`]).
    fn gemv_batch(
        &self,
        path: KernelPath,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        act8::FUSED.run_batch(usable(path), self, self.inn, preps, rows, out, stride)
    }
    fn seg_align(&self) -> usize {
        1
    }
    /// 1024², 2 threads, GEMVs against tiles: m = 2 0.19 / 0.24 ms, m = 3 0.27 / 0.27 ms.
    fn tiles_min_m(&self) -> usize {
        3
    }
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]) {
        let (s, z) = (self.scales.f32s()[r], self.zeros.f32s()[r]);
        let c = &self.codes.as_slice()[r * self.inn + c0..r * self.inn + c0 + len];
        dequantize(path, c, s, z, dst);
    }
    /// Where the panel holds whole runs of 16 columns (`len % 16 == 0`, any `c0`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack_fwd_panel_simd(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) -> bool {
        if b.len % 16 != 0 {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier; the panel lies inside W and
        // dst), with whole runs of 16 just checked.
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::pack_fwd_panel(self, b, dst),
                _ => avx2::pack_fwd_panel(self, b, dst),
            }
        };
        true
    }
    /// With int8 activations where their route is the format's fused GEMV
    /// ([`crate::act8::Int8Route::FusedInt8`]), on the AVX2 and AVX-512 paths: x quantized
    /// for it ([`act8::prepare`]) unless x holds a NaN or infinity. Nothing otherwise (the
    /// f32 GEMVs read x itself).
    fn gemv_prepare(&self, path: KernelPath, m: usize, x: &[f32], prep: &mut Vec<f32>) {
        if is_x86_simd(usable(path)) {
            act8::FUSED.prepare(self.inn, m, x, prep);
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv_simd(
        &self,
        path: KernelPath,
        x: &[f32],
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) -> bool {
        // (The int8 preparation holds `33 · ceil(in/128) + 1 > 1` floats for `in > 0`.)
        // SAFETY: the trait's contract: the CPU supports `path`; rows and y checked.
        if unsafe { act8::FUSED.run(path, self, self.inn, prep, rows.clone(), y, acc) } {
            return true;
        }
        if !prep.is_empty() {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier; x, rows and y checked).
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::gemv(self, x, rows, y, acc),
                _ => avx2::gemv(self, x, rows, y, acc),
            }
        };
        true
    }
}

/// Int8 activations: signed codes `c − 128` in units of 128 columns,
/// `w' = scale · (c − 128) + (zero + 128 · scale)`.
impl crate::act8::IntCodes for Int8Matrix {
    fn int_dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn int_layout(&self) -> Option<crate::act8::IntLayout> {
        Some(crate::act8::IntLayout {
            unit: crate::act8::GROUP,
            kind: crate::act8::CodeKind::Signed,
        })
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        let row = &self.codes.as_slice()[r * self.inn..(r + 1) * self.inn];
        for (d, &c) in dst.iter_mut().zip(row) {
            *d = c ^ 0x80;
        }
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        let (s, z) = (self.scales.f32s()[r], self.zeros.f32s()[r]);
        scale.fill(s);
        offset.fill(z + 128.0 * s);
    }
}

kernels::impl_weight_matrix!(Int8Matrix, "int8");
