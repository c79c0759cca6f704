//! Q4: the reference's 4-bit format (`q4_quantize` / `q4_dequantize` in `bignet_ref.py`),
//! bit-exact.
//!
//! Blocks of [`Q4_BLOCK`] = 16 consecutive weights of a row; when `in` is not a multiple of 16
//! the last block of each row is partial (its norm is the max over the elements it has). With
//! `n = max |v|` (f32):
//! `code = round_half_even((v + n) / (2n) * 15)`, computed in f32 in exactly that order; `n` is
//! rounded to f16 only for storage. Dequantizing uses the stored f16 `n` as f32:
//! `v' = ((code / 15) · 2) · n − n`.
//!
//! Storage (two packed arrays, as in the safetensors checkpoints):
//! - `packed`: u8 `[out, ceil(in/2)]`, element `2i` of a row in the low nibble of byte `i`,
//!   `2i+1` in the high nibble ([`BlockQ4`] is one block's 8 bytes); each row starts on a byte,
//!   and an odd `in` leaves the high nibble of the row's last byte 0;
//! - `norm`: f16 `[out, ceil(in/16)]`, little-endian.
//!
//! Special cases: an all-zero block stores `n = 0` and codes 0 (so `v' = 0`; the reference
//! would compute 0/0); a NaN/Inf weight is an error naming its (row, col); a block whose
//! `n` f16 rounds to infinity (65520 or more; below that it is stored as at most 65504, as
//! the reference stores it) is an error
//! ([`QuantError::ScaleOverflow`]) rather than a clamp, because a clamped `n` would silently
//! move every weight of the block. A tiny `n` that rounds to 0 (or a subnormal) in f16 simply
//! dequantizes to that stored value.

use half::f16;
use nibble_tensor::buffer::WeightBuf;
use nibble_tensor::Tensor;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::arch::avx2::q4 as avx2;
#[cfg(target_arch = "x86_64")]
use crate::arch::avx512::q4 as avx512;
use crate::arch::portable::q4 as portable;
use crate::bytes::{check_part, check_values, Bytes};
use crate::cpu::{is_x86_simd, kernel_path, usable, KernelPath};
use crate::error::{QuantError, Result};
use crate::kernels::{self, ColBlock, QuantRows};

/// The fused Q4 int8-activation GEMV (int8 mode's small batches, [`crate::act8::q4_fused_end`]).
pub(crate) mod act8;
/// The row-interleaved copy the AVX-512 VNNI batch-1 int8 GEMV reads.
pub(crate) mod tiles;

/// Weights per Q4 block.
pub const Q4_BLOCK: usize = 16;

/// One block's codes: 16 nibbles, element `2i` in the low nibble of `qs[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4 {
    /// The packed codes.
    pub qs: [u8; Q4_BLOCK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4>() == 8);

/// The least f32 that f16 rounds to infinity (halfway between f16's largest finite value,
/// 65504, and 65536; the tie rounds to the even 65536): a block norm below it is stored as a
/// finite f16 (65504 from 65504 up), as the reference's `.to(torch.float16)` stores it.
pub(crate) const F16_ROUNDS_TO_INF: f32 = 65520.0;

/// `(c / 15) · 2` for each code, exactly as the reference computes it.
pub(crate) fn lut() -> [f32; 16] {
    std::array::from_fn(|c| (c as f32 / 15.0) * 2.0)
}

fn fault(op: &'static str, row: usize, x: &[f32]) -> QuantError {
    for (c, &v) in x.iter().enumerate() {
        if !v.is_finite() {
            return QuantError::NonFinite {
                op,
                row,
                col: c,
                value: v,
            };
        }
    }
    for (b, blk) in x.chunks(Q4_BLOCK).enumerate() {
        let n = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        if n >= F16_ROUNDS_TO_INF {
            return QuantError::ScaleOverflow {
                op,
                row,
                col: b * Q4_BLOCK,
                value: n,
                storage: "f16",
            };
        }
    }
    QuantError::Shape {
        op,
        shape: vec![x.len()],
        what: "unexpected fault".into(),
    }
}

/// Scalar ground truth: quantizes one row `x` (any length; a partial last block of
/// `len % 16` weights) into `packed` (`ceil(len/2)` bytes) and `norm` (`ceil(len/16)`). `row`
/// only labels errors.
pub fn quantize_row_ref(row: usize, x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> Result<()> {
    check_row(x, packed, norm)?;
    if quantize_blocks_ref(x, packed, norm) {
        Ok(())
    } else {
        Err(fault("q4_quantize", row, x))
    }
}

/// The reference rule over the blocks of `x` (the last may be partial); `false` (for the
/// caller's error path) on a non-finite weight or an overflowing norm. Lengths as
/// [`quantize_row_ref`] checks them.
pub(crate) fn quantize_blocks_ref(x: &[f32], packed: &mut [u8], norm: &mut [f16]) -> bool {
    for (b, blk) in x.chunks(Q4_BLOCK).enumerate() {
        let mut n = 0.0f32;
        for &v in blk {
            if !v.is_finite() {
                return false;
            }
            n = n.max(v.abs());
        }
        if n >= F16_ROUNDS_TO_INF {
            return false;
        }
        norm[b] = f16::from_f32(n);
        let out = &mut packed[b * 8..b * 8 + blk.len().div_ceil(2)];
        if n == 0.0 {
            out.fill(0);
            continue;
        }
        let two = n + n;
        let code = |v: f32| ((v + n) / two * 15.0).round_ties_even() as u8;
        for (i, o) in out.iter_mut().enumerate() {
            let hi = blk.get(2 * i + 1).map_or(0, |&v| code(v));
            *o = code(blk[2 * i]) | (hi << 4);
        }
    }
    true
}

fn check_row(x: &[f32], packed: &[u8], norm: &[f16]) -> Result<()> {
    if packed.len() != x.len().div_ceil(2) || norm.len() != x.len().div_ceil(Q4_BLOCK) {
        return Err(QuantError::Shape {
            op: "q4_quantize_row",
            shape: vec![x.len(), packed.len(), norm.len()],
            what: "a row of len weights needs packed = ceil(len/2), norm = ceil(len/16)".into(),
        });
    }
    Ok(())
}

/// Quantizes one row with the given kernel path (bit-identical to [`quantize_row_ref`]).
pub fn quantize_row(
    path: KernelPath,
    row: usize,
    x: &[f32],
    packed: &mut [u8],
    norm: &mut [f16],
) -> Result<()> {
    check_row(x, packed, norm)?;
    // Whole blocks on the path's kernel, a partial last block by the reference rule.
    let full = x.len() / Q4_BLOCK * Q4_BLOCK;
    let (xf, xt) = x.split_at(full);
    let (pf, pt) = packed.split_at_mut(full / 2);
    let (nf, nt) = norm.split_at_mut(full / Q4_BLOCK);
    let whole = match usable(path) {
        KernelPath::Scalar => quantize_blocks_ref(xf, pf, nf),
        KernelPath::Portable => portable::quantize_row(xf, pf, nf),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2 or Avx512, so the CPU has AVX2, FMA and F16C; the
        // slices hold whole blocks (full/2 bytes, full/16 norms). Quantizing has no 512-bit
        // kernel: the AVX-512 tier runs the AVX2 one.
        KernelPath::Avx2Fma | KernelPath::Avx512 => unsafe { avx2::quantize_row(xf, pf, nf) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2Fma | KernelPath::Avx512 => portable::quantize_row(xf, pf, nf),
    };
    if whole && quantize_blocks_ref(xt, pt, nt) {
        Ok(())
    } else {
        Err(fault("q4_quantize", row, x))
    }
}

/// Scalar ground truth: dequantizes the weights of `out` (blocks of 16 from its start, the last
/// possibly partial) from their codes and norms. Weights whose code or norm is missing
/// (`packed` shorter than `ceil(len/2)`, `norm` than `ceil(len/16)`) are left untouched.
pub fn dequantize_ref(packed: &[u8], norm: &[f16], out: &mut [f32]) {
    let len = out.len().min(packed.len() * 2).min(norm.len() * Q4_BLOCK);
    for (b, o) in out[..len].chunks_mut(Q4_BLOCK).enumerate() {
        let n = norm[b].to_f32();
        for (e, w) in o.iter_mut().enumerate() {
            let c = ((packed[b * 8 + e / 2] >> (4 * (e % 2))) & 15) as f32;
            *w = ((c / 15.0) * 2.0) * n - n;
        }
    }
}

/// Dequantizes with the given path (bit-identical to [`dequantize_ref`], with the same
/// lengths): whole blocks on the path's kernel, a partial last block by the scalar code.
pub fn dequantize(path: KernelPath, packed: &[u8], norm: &[f16], out: &mut [f32]) {
    let len = out.len().min(packed.len() * 2).min(norm.len() * Q4_BLOCK);
    let nb = len / Q4_BLOCK;
    let (out, tail) = out[..len].split_at_mut(nb * Q4_BLOCK);
    dequantize_ref(&packed[nb * 8..], &norm[nb..], tail);
    let (packed, norm) = (&packed[..nb * 8], &norm[..nb]);
    match usable(path) {
        KernelPath::Scalar => dequantize_ref(packed, norm, out),
        KernelPath::Portable => portable::dequantize(packed, norm, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx2, so the CPU has AVX2, FMA and F16C.
        KernelPath::Avx2Fma => unsafe { avx2::dequantize(packed, norm, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `usable` returned Avx512, so the CPU has AVX-512 F/BW/VL and F16C.
        KernelPath::Avx512 => unsafe { avx512::dequantize(packed, norm, out) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2Fma | KernelPath::Avx512 => portable::dequantize(packed, norm, out),
    }
}

/// The old name of [`crate::act8::ActivationMode`] (Q4 was the first format with int8
/// activations; the mode now covers every format and batch size).
pub type Q4Activations = crate::act8::ActivationMode;

/// The old name of [`crate::act8::set_activations`].
pub fn set_q4_activations(mode: Q4Activations) {
    crate::act8::set_activations(mode);
}

/// The old name of [`crate::act8::activations`].
pub fn q4_activations() -> Q4Activations {
    crate::act8::activations()
}

/// A Q4-quantized `out x in` weight matrix (see the [module docs](self) for the format).
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Matrix {
    pub(crate) out: usize,
    pub(crate) inn: usize,
    pub(crate) packed: Bytes,
    pub(crate) norm: Bytes,
    /// The batch-1 int8 GEMV's interleaved copy, built on its first use ([`tiles`]).
    pub(crate) tiles: tiles::TilesCache,
}

impl Q4Matrix {
    /// Quantizes an `out x in` f32 matrix (any shape; see the [module docs](self) for a
    /// partial last block) with the detected kernel path.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        Self::quantize_with(w, kernel_path())
    }

    /// Quantizes with an explicit kernel path (rows in parallel; identical results on every
    /// path and thread count).
    pub fn quantize_with(w: &Tensor, path: KernelPath) -> Result<Self> {
        let (o, i) = w.dims2("q4_quantize")?;
        let (row_bytes, row_blocks) = (i.div_ceil(2), i.div_ceil(Q4_BLOCK));
        let mut packed = WeightBuf::<u8>::zeroed(o * row_bytes);
        let mut norm = vec![f16::ZERO; o * row_blocks];
        if i > 0 {
            let res: Vec<Result<()>> = w
                .data()
                .par_chunks(i)
                .zip(packed.par_chunks_mut(row_bytes))
                .zip(norm.par_chunks_mut(row_blocks))
                .enumerate()
                .with_min_len(8)
                .map(|(r, ((x, p), n))| quantize_row(path, r, x, p, n))
                .collect();
            kernels::first_error(res)?;
        }
        Ok(Q4Matrix {
            out: o,
            inn: i,
            packed: Bytes::from_weight_buf(packed),
            norm: Bytes::from_f16(norm),
            tiles: tiles::TilesCache::default(),
        })
    }

    /// Builds from raw parts: `packed` u8 `[out, ceil(in/2)]`, `norm` f16 `[out, ceil(in/16)]`
    /// (little-endian). Borrowed parts stay borrowed; a misaligned `norm` is copied. A part of
    /// the wrong length is a [`QuantError::PartLength`]; a NaN, infinite or negative norm a
    /// [`QuantError::PartValue`] naming the index (`row · ⌈in/16⌉ + block`).
    pub fn from_parts(out: usize, inn: usize, packed: Bytes, norm: Bytes) -> Result<Self> {
        const OP: &str = "Q4Matrix::from_parts";
        let size = |per_row: usize, elem: usize| {
            out.checked_mul(per_row)
                .and_then(|v| v.checked_mul(elem))
                .ok_or_else(|| QuantError::Shape {
                    op: OP,
                    shape: vec![out, inn],
                    what: "size overflows".into(),
                })
        };
        check_part(OP, "packed", out, inn, &packed, size(inn.div_ceil(2), 1)?)?;
        check_part(
            OP,
            "norm",
            out,
            inn,
            &norm,
            size(inn.div_ceil(Q4_BLOCK), 2)?,
        )?;
        let m = Q4Matrix {
            out,
            inn,
            packed,
            norm: norm.aligned(2),
            tiles: tiles::TilesCache::default(),
        };
        check_values(OP, "norm", m.norm.f16s().iter().map(|v| v.to_f32()), true)?;
        Ok(m)
    }

    /// Rows (`out`) and columns (`in`).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inn)
    }

    /// The raw `packed` part (u8 `[out, ceil(in/2)]`).
    pub fn packed_bytes(&self) -> &[u8] {
        self.packed.as_slice()
    }

    /// The raw `norm` part (f16 `[out, ceil(in/16)]`, little-endian bytes).
    pub fn norm_bytes(&self) -> &[u8] {
        self.norm.as_slice()
    }

    /// The block norms.
    pub fn norms(&self) -> &[f16] {
        self.norm.f16s()
    }

    /// The `(packed, norm)` buffers (to share or write them).
    pub fn parts(&self) -> (&Bytes, &Bytes) {
        (&self.packed, &self.norm)
    }

    /// Bits per weight, scales included (5.0).
    pub fn bits_per_weight(&self) -> f64 {
        self.parts_len() as f64 * 8.0 / (self.out * self.inn).max(1) as f64
    }

    /// Bytes of the row-interleaved copy of the codes and norms that the batch-1 int8 GEMV
    /// builds on its first call on a CPU with AVX-512 VNNI (as many as the matrix's whole
    /// tiles of 16 rows and whole groups of 128 columns hold: about the matrix's own size;
    /// `NIBBLE_Q4_TILES=0` turns it off); 0 before then. Not part of
    /// [`Q4Matrix::bits_per_weight`] nor of a checkpoint.
    pub fn int8_tiles_bytes(&self) -> usize {
        self.tiles.bytes()
    }

    /// The whole matrix dequantized with an explicit kernel path.
    pub fn dequantize_with(&self, path: KernelPath) -> Tensor {
        kernels::to_f32(self, path)
    }

    /// Batch-1 `y (+)= W · x` with int8 activations through Q4's fused int8 GEMV (what
    /// `matmul_t` runs, in parallel, for batches below [`crate::act8::q4_fused_end`] (16 or 48
    /// by tier) under [`crate::act8::ActivationMode::Int8`]; larger batches take the
    /// format-independent [`crate::act8::forward`] or the f32 path, see [`crate::act8`]).
    ///
    /// x is quantized per 128 elements to `round(x · 127 / max|x|)`, so each row's result
    /// carries an extra error of at most `Σ_k |w'_k| · max|x|_group(k) / 254` (checked by the
    /// `q4_gemv_int8_error_bound` test), far above the f32 path's rounding error; in exchange
    /// the inner product runs in exact integer arithmetic. An x with a NaN or infinity goes
    /// through the f32 path, so that it propagates exactly as there.
    ///
    /// Rows are split over the current rayon pool, with results independent of the thread
    /// count. Shapes: `x` `[in]`, `y` `[out]`; any other length is an error.
    pub fn gemv_int8(&self, x: &[f32], y: &mut [f32], accumulate: bool) -> Result<()> {
        self.gemv_int8_with(kernel_path(), x, y, accumulate)
    }

    /// [`Q4Matrix::gemv_int8`] on an explicit kernel path (`Scalar` and `Portable` run the
    /// scalar ground truth; results agree with AVX2 up to f32 summation order).
    pub fn gemv_int8_with(
        &self,
        path: KernelPath,
        x: &[f32],
        y: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        if x.len() != self.inn || y.len() != self.out {
            return Err(QuantError::Shape {
                op: "Q4Matrix::gemv_int8",
                shape: vec![self.out, self.inn, x.len(), y.len()],
                what: "x must have `in` elements and y `out`".into(),
            });
        }
        if !nibble_tensor::ops::all_finite(x) {
            return kernels::matmul_t(self, x, 1, y, accumulate).map_err(QuantError::from);
        }
        // The thread's reusable scratch (as in `matmul_t`): no allocation per call.
        let mut prep = kernels::take_prep();
        let path = usable(path);
        act8::prepare(path, x, &mut prep);
        // Rows split over the pool as `matmul_t` splits batch 1.
        kernels::split_rows((self.out, self.inn), y, |rows, yc| {
            act8::gemv(self, path, &prep, rows, yc, accumulate)
        });
        kernels::put_prep(prep);
        Ok(())
    }

    fn parts_len(&self) -> usize {
        self.packed.len() + self.norm.len()
    }

    /// Bytes of one row of `packed` (`ceil(in/2)`).
    pub(crate) fn row_bytes(&self) -> usize {
        self.inn.div_ceil(2)
    }

    /// Blocks (norms) of one row (`ceil(in/16)`).
    pub(crate) fn row_blocks(&self) -> usize {
        self.inn.div_ceil(Q4_BLOCK)
    }
}

impl QuantRows for Q4Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    /// f32 activations: on the AVX2 path the GEMV wins up to 4 vectors (1024², 2 threads,
    /// GEMVs against tiles: m = 4 0.47 / 0.55 ms, m = 6 0.73 / 0.58 ms); on the AVX-512 path,
    /// whose tiles read x and the decoded rows on whole cache lines
    /// ([`nibble_tensor::gemm::gemv::on_whole_lines`]), up to 2 (BigNet low_precision, 2
    /// threads of the 2-core Xeon, three rounds in turns, GEMVs against tiles: m = 3 1.9–2.2 /
    /// 1.47–1.51 ms, m = 4 2.5–2.8 / 1.72–1.79; m = 2 1.31–1.38 / 1.36–1.42; the AVX2 path
    /// there: m = 3 2.0–2.2 / 2.5–2.6, m = 4 2.8–2.9 / 2.7–2.9). Since the twenty-eighth session
    /// batches of 2 on the AVX-512 path go through the GEMV's batch kernel (`q4::gemv_batch`,
    /// each block decoded once for both vectors: low_precision at batch 2 1.20–1.27 → 1.00–1.17
    /// ms, three rounds in turns); from 3 the tiles still win against it (batch kernel / tiles,
    /// ms: m = 3 1.52–1.65 / 1.58–1.61, 4 1.71–1.84 / 1.72–1.76, 6 2.68–3.00 / 2.19–2.40, 8
    /// 3.68–3.71 / 2.63–2.66: two operations per vector and block of 16 against the dense
    /// kernel's one). Int8 activations: the fused
    /// int8 GEMV for every batch below [`crate::act8::q4_fused_end`] on this tier (it does not
    /// compute with the dequantized weights, so a batch must give what its vectors give one at
    /// a time).
    fn tiles_min_m(&self) -> usize {
        if q4_activations() == Q4Activations::Int8 {
            crate::act8::q4_fused_end(crate::act8::IntTier::for_path(kernel_path()))
        } else if kernel_path() == KernelPath::Avx512 {
            3
        } else {
            5
        }
    }
    fn act8_view(&self) -> Option<&dyn crate::act8::IntCodes> {
        Some(self)
    }
    /// Batches below [`crate::act8::q4_fused_end`] keep the fused int8 GEMV
    /// ([`Q4Matrix::gemv_int8`]), 2.5 times faster at batch 1 than the generic driver (see
    /// [`crate::act8::int8_route`]).
    fn act8_generic(&self, m: usize) -> bool {
        crate::act8::int8_route("q4", m) == crate::act8::Int8Route::Generic
    }
    fn seg_align(&self) -> usize {
        Q4_BLOCK
    }
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]) {
        // c0 is a multiple of 16, so the segment starts on a byte and a block of row r.
        let (pb, nb) = (r * self.row_bytes(), r * self.row_blocks());
        dequantize(
            path,
            &self.packed.as_slice()[pb + c0 / 2..pb + (c0 + len).div_ceil(2)],
            &self.norms()[nb + c0 / Q4_BLOCK..nb + (c0 + len).div_ceil(Q4_BLOCK)],
            &mut dst[..len],
        );
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn dequant_cols_simd(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) -> bool {
        // SAFETY: the trait's contract (the CPU has `path`'s tier; the request fits in whole
        // blocks).
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::dequant_cols(self, b, dst),
                _ => avx2::dequant_cols(self, b, dst),
            }
        };
        true
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack_fwd_panel_simd(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) -> bool {
        // SAFETY: the trait's contract (the CPU has `path`'s tier; the panel fits in whole
        // blocks).
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::pack_fwd_panel(self, b, dst),
                _ => avx2::pack_fwd_panel(self, b, dst),
            }
        };
        true
    }
    /// AVX2 and AVX-512 paths: appends x with each block of 16 reordered as its 8 even then 8 odd
    /// elements (the low / high nibbles of the block's bytes), then the `in/16` block sums.
    ///
    /// Under [`Q4Activations::Int8`] (every path) it appends the int8 quantization of x
    /// instead (see [`Q4Matrix::gemv_int8`]).
    fn gemv_prepare(&self, path: KernelPath, _m: usize, x: &[f32], prep: &mut Vec<f32>) {
        if q4_activations() == Q4Activations::Int8
            && self.inn > 0
            && nibble_tensor::ops::all_finite(x)
        {
            // (The same bytes on every path: AVX-512 or AVX2 code on the x86 ones, the scalar
            // reference elsewhere.)
            act8::prepare(usable(path), x, prep);
        } else if is_x86_simd(usable(path)) && self.inn % Q4_BLOCK == 0 {
            // (A ragged `in` takes the generic GEMV, which needs no preparation.)
            kernels::push_even_odd16(x, prep);
            prep.extend(x.chunks_exact(Q4_BLOCK).map(|c| c.iter().sum::<f32>()));
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv_simd(
        &self,
        path: KernelPath,
        _x: &[f32],
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) -> bool {
        // (The two preparations never have the same length for `in > 0`: 17·in/16 floats
        // against 41 per started group of 128.)
        if self.inn % Q4_BLOCK == 0 && prep.len() == self.inn + self.inn / Q4_BLOCK {
            // SAFETY: the trait's contract (the CPU has `path`'s tier; rows and y checked) and
            // this prep.
            unsafe {
                match path {
                    KernelPath::Avx512 => avx512::gemv(self, prep, rows, y, acc),
                    _ => avx2::gemv(self, prep, rows, y, acc),
                }
            };
        } else {
            // (The int8 preparation goes to `gemv_prepared`, on every path.)
            return false;
        }
        true
    }
    /// The f32 GEMV's batch kernel on the AVX-512 path (`q4::gemv_batch`, for the f32
    /// preparation), or the int8-activation GEMV's on AVX-512 VNNI (`act8::gemv_batch`).
    fn gemv_batch(
        &self,
        path: KernelPath,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        let path = usable(path);
        #[cfg(target_arch = "x86_64")]
        if path == KernelPath::Avx512
            && self.inn % Q4_BLOCK == 0
            && preps
                .iter()
                .all(|p| p.len() == self.inn + self.inn / Q4_BLOCK)
        {
            // SAFETY: the path went through `usable`, so the CPU has the AVX-512 tier; rows,
            // out and stride as the trait's contract says.
            return unsafe { avx512::gemv_batch(self, preps, rows, out, stride) };
        }
        act8::gemv_batch(self, path, preps, rows, out, stride)
    }
    /// The int8-activation GEMV ([`Q4Matrix::gemv_int8`]'s kernels: the x86 tiers' where the
    /// path has them, else the scalar reference) for the int8 preparation, on every path.
    fn gemv_prepared(
        &self,
        path: KernelPath,
        prep: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
        acc: bool,
    ) -> bool {
        if prep.len() != act8::prep_len(self.inn) {
            return false;
        }
        // (`usable`: the x86 kernels run only on a path this CPU has.)
        act8::gemv(self, usable(path), prep, rows, y, acc);
        true
    }
}

/// Int8 activations: codes 0..15 in units of one block, `w' = (2n/15) · c − n`.
impl crate::act8::IntCodes for Q4Matrix {
    fn int_dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn int_layout(&self) -> Option<crate::act8::IntLayout> {
        Some(crate::act8::IntLayout {
            unit: Q4_BLOCK,
            kind: crate::act8::CodeKind::Nibble,
        })
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        let row = &self.packed.as_slice()[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        crate::act8::unpack_nibbles_low_first(row, &mut dst[..self.inn]);
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        let nb = self.row_blocks();
        crate::act8::f16_to_f32(&self.norms()[r * nb..(r + 1) * nb], &mut offset[..nb]);
        for (s, o) in scale[..nb].iter_mut().zip(&mut offset[..nb]) {
            (*s, *o) = (*o * (2.0 / 15.0), -*o);
        }
    }
    fn int_centered(&self) -> bool {
        true
    }
    /// `w' = (n / 15) · (2c − 15)`.
    fn int_centered_scale(&self, r: usize, half: &mut [f32]) {
        let nb = self.row_blocks();
        crate::act8::f16_to_f32(&self.norms()[r * nb..(r + 1) * nb], &mut half[..nb]);
        for h in &mut half[..nb] {
            *h /= 15.0;
        }
    }
}

kernels::impl_weight_matrix!(Q4Matrix, "q4");
