//! NF4: QLoRA's 4-bit NormalFloat exactly as bitsandbytes makes it on CPU, optionally with
//! double quantization of the block scales.
//!
//! - Blocks of [`NF4_BLOCK`] = 64 over the flattened (row-major) matrix of `n = out·in`
//!   weights, any shape: when `n % 64 != 0` the last block is partial, and when `in % 64 != 0`
//!   blocks straddle rows.
//! - As bitsandbytes' CPU `quantize_4bit` (0.50): a whole block has `absmax = max |v|` (f32)
//!   and normalizes `v · (1 / max(absmax, 1e-38))`; the partial last block stores
//!   `absmax = max(max |v|, 1e-38)` and normalizes `v / absmax`. Each weight gets the code of
//!   the nearest of the 16 [`NF4_LEVELS`], decided with bitsandbytes' midpoints
//!   ([`NF4_THRESHOLDS`]: code = number of thresholds strictly below the normalized value). An
//!   all-zero block normalizes to 0 and so gets code 7 (level 0) everywhere.
//! - `packed`: u8 `[ceil(n/2)]`, two codes a byte, the FIRST element in the HIGH nibble; an odd
//!   `n` pads the last low nibble with the code of 0 (7).
//! - Plain statistics: `absmax` f32 `[ceil(n/64)]`. Dequantized `v' = level[code] · absmax`.
//! - Double quantization (`compress_statistics=True`): `absmax_offset` f32 `[1]` = the mean of
//!   the absmaxes; the absmaxes minus it are quantized in blocks of 256 to u8 `absmax_codes`
//!   `[ceil(n/64)]` into the signed 8-bit dynamic map ([`dynamic_map`]) the way bitsandbytes'
//!   CPU kernel picks codes ([`dynamic_code_bnb`]; a group whose scale is 0 gets code 0), scaled by
//!   `absmax_scale` f32 `[ceil(blocks/256)]` (the absmax of each group of 256, the last group
//!   possibly partial). The block scale
//!   is then `map[code] · absmax_scale + absmax_offset`. 4 + 8/64 + 32/16384 ≈ 4.127 bits per
//!   weight.

use nibble_tensor::buffer::WeightBuf;
use nibble_tensor::Tensor;
use rayon::prelude::*;

pub(crate) mod act8;

#[cfg(target_arch = "x86_64")]
use crate::arch::avx2::nf4 as avx2;
#[cfg(target_arch = "x86_64")]
use crate::arch::avx512::nf4 as avx512;
use crate::arch::portable::nf4 as portable;
use crate::bytes::{check_part, check_values, Bytes};
use crate::cpu::{is_x86_simd, kernel_path, usable, KernelPath};
use crate::error::{QuantError, Result};
use crate::kernels::{self, ColBlock, QuantRows};

/// Weights per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// Block scales per double-quantization group.
pub const DQ_BLOCK: usize = 256;

/// One NF4 block's codes: 64 nibbles, element `2i` in the HIGH nibble of `qs[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockNf4 {
    /// The packed codes.
    pub qs: [u8; NF4_BLOCK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockNf4>() == 32);

/// The 16 NF4 levels (bitsandbytes' `get_4bit_type("nf4")`).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' decision thresholds: the f32 midpoints `(level[k] + level[k+1]) / 2` its CPU
/// `quantize_4bit` (0.50) bucketizes against, so the code of `x` is the number of thresholds
/// `t` with `x > t` (a value exactly on a midpoint takes the lower code). Two of them lie one
/// ulp above the CUDA kernel's `dQuantizeNF4` constants (0.5016634 and 0.8614784).
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_45,
    0.642_786_9,
    0.861_478_45,
];

/// The NF4 code of a normalized weight `x` (NaN gives 0, as in bitsandbytes' tree).
#[inline]
pub fn nf4_code(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8
}

/// The bits of bitsandbytes' signed 8-bit dynamic map as its Python code builds it in f32.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// bitsandbytes' 8-bit signed dynamic map (`create_dynamic_map(signed=True)`), bit-exact: the
/// table of the values bitsandbytes produces (its `torch.linspace` rounding depends on ATen's
/// vectorization, so the constants are kept; [`dynamic_map_generated`] rebuilds them to within two ulps)
///
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` recomputed here: 256
/// sorted values in [-1, 1], equal to [`dynamic_map`] within 2e-7 relative (1-2 ulps).
pub fn dynamic_map_generated() -> [f32; 256] {
    let max_exp = 7i32;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exp {
        let items = (1usize << i) + 1;
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for k in 0..items - 1 {
            let mean = (bounds[k] + bounds[k + 1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data[..256]);
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)` as ATen's CPU kernel computes it: whole
/// vectors of `LANES` from `base + k·step` (base from the half the vector starts in), then the
/// scalar formula for the remainder.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    const LANES: usize = 8;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    let at = |i: usize| {
        if i < half {
            start + step * i as f32
        } else {
            end - step * (steps - i - 1) as f32
        }
    };
    let mut v = Vec::with_capacity(steps);
    let mut idx = 0;
    let vec_end = steps / (2 * LANES) * (2 * LANES);
    while idx < vec_end {
        let base = at(idx);
        for k in 0..LANES {
            v.push(base + k as f32 * step);
        }
        idx += LANES;
    }
    while idx < steps {
        v.push(at(idx));
        idx += 1;
    }
    v
}

/// Index of the map value nearest to `x` (exact argmin of `|x - map[i]|` in f32, lowest index
/// on ties).
pub fn nearest_dynamic_code(map: &[f32; 256], x: f32) -> u8 {
    let hi = map.partition_point(|&m| m < x);
    let lo = hi.saturating_sub(2);
    let end = (hi + 2).min(256);
    let mut best = lo;
    for i in lo..end {
        if (x - map[i]).abs() < (x - map[best]).abs() {
            best = i;
        }
    }
    best as u8
}

const DQ_LUT_SIZE: usize = 65536;

/// The code bitsandbytes' CPU blockwise quantizer gives a normalized value `x`: it clamps to
/// [-1, 1], maps onto a grid of 65536 points (`idx = trunc((x+1)·0.5·65535 + 0.5)`) and takes
/// the precomputed nearest code of that grid point, so values within half a grid step of a
/// midpoint may get the farther code.
pub fn dynamic_code_bnb(x: f32) -> u8 {
    static LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let lut = LUT.get_or_init(|| {
        let map = dynamic_map();
        (0..DQ_LUT_SIZE)
            .map(|i| {
                let g = (i as f32 / (DQ_LUT_SIZE - 1) as f32) * 2.0 - 1.0;
                nearest_dynamic_code(&map, g)
            })
            .collect()
    });
    let v = x.clamp(-1.0, 1.0);
    let t = (v + 1.0) * 0.5 * (DQ_LUT_SIZE - 1) as f32 + 0.5;
    lut[(t as usize).min(DQ_LUT_SIZE - 1)]
}

/// The block statistics of an [`Nf4Matrix`].
#[derive(Debug, Clone, PartialEq)]
enum Stats {
    /// f32 absmax per block.
    Plain { absmax: Bytes },
    /// Double-quantized absmaxes.
    Double {
        codes: Bytes,
        offset: f32,
        scale: Bytes,
        map: Box<[f32; 256]>,
    },
}

/// A double-quantized absmax: its code through the map, times the scale of its block of 256,
/// plus the offset (a product, then a sum: the AVX2 decoding takes the same two steps).
#[inline(always)]
fn decode_absmax(map: &[f32; 256], code: u8, scale: f32, offset: f32) -> f32 {
    map[usize::from(code)] * scale + offset
}

/// One block's absmax, read where the statistics lie ([`Nf4Matrix::absmax_reader`]).
pub(crate) trait AbsmaxAt: Copy {
    /// The absmax of flat block `b`: the bits of [`Nf4Matrix::block_absmax`].
    ///
    /// # Safety
    /// `b` is a block of the matrix the reader came from.
    unsafe fn at(self, b: usize) -> f32;
}

/// Plain statistics: the f32 absmaxes themselves.
#[derive(Clone, Copy)]
pub(crate) struct PlainAbsmax<'a>(&'a [f32]);

impl AbsmaxAt for PlainAbsmax<'_> {
    #[inline(always)]
    unsafe fn at(self, b: usize) -> f32 {
        // SAFETY: the caller's contract; a plain matrix holds one absmax per block (checked
        // where it was built).
        unsafe { *self.0.get_unchecked(b) }
    }
}

/// Double-quantized statistics: a block's code through the map, times the scale of its
/// block of 256, plus the offset (as [`Nf4Matrix::fill_absmax`] decodes them).
#[derive(Clone, Copy)]
pub(crate) struct DoubleAbsmax<'a> {
    codes: &'a [u8],
    scale: &'a [f32],
    map: &'a [f32; 256],
    offset: f32,
}

impl AbsmaxAt for DoubleAbsmax<'_> {
    #[inline(always)]
    unsafe fn at(self, b: usize) -> f32 {
        // SAFETY: the caller's contract; a double-quantized matrix holds one code per block
        // and one scale per block of 256 (checked where it was built).
        unsafe {
            decode_absmax(
                self.map,
                *self.codes.get_unchecked(b),
                *self.scale.get_unchecked(b / DQ_BLOCK),
                self.offset,
            )
        }
    }
}

/// [`Nf4Matrix::absmax_reader`]'s two kinds.
pub(crate) enum AbsmaxReader<'a> {
    /// Plain statistics.
    Plain(PlainAbsmax<'a>),
    /// Double-quantized statistics.
    Double(DoubleAbsmax<'a>),
}

/// `with_absmax_reader!(m, a => body)`: `body` with `a` bound to `m`'s absmax reader, compiled
/// once for each kind of statistics (so a kernel's loop reads them with no branch).
macro_rules! with_absmax_reader {
    ($m:expr, $a:ident => $body:expr) => {
        match $m.absmax_reader() {
            $crate::nf4::AbsmaxReader::Plain($a) => $body,
            $crate::nf4::AbsmaxReader::Double($a) => $body,
        }
    };
}
pub(crate) use with_absmax_reader;

/// An NF4-quantized `out x in` matrix (see the [module docs](self) for the format).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Matrix {
    pub(crate) out: usize,
    pub(crate) inn: usize,
    pub(crate) packed: Bytes,
    stats: Stats,
}

fn nonfinite(op: &'static str, inn: usize, x: &[f32], base: usize) -> QuantError {
    let k = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    QuantError::NonFinite {
        op,
        row: (base + k) / inn.max(1),
        col: (base + k) % inn.max(1),
        value: x.get(k).copied().unwrap_or(f32::NAN),
    }
}

/// bitsandbytes' floor under a block's absmax before normalizing by it.
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// Scalar ground truth: quantizes the flattened weights `x` (the start of a block; any length,
/// the last block partial when `x.len() % 64 != 0`, see the [module docs](self)) into
/// `packed` (`ceil(len/2)` bytes, first element in the high nibble) and `absmax`
/// (`ceil(len/64)`). Returns the index of the first non-finite weight as the error.
pub fn quantize_ref(
    x: &[f32],
    packed: &mut [u8],
    absmax: &mut [f32],
) -> std::result::Result<(), usize> {
    for (b, blk) in x.chunks(NF4_BLOCK).enumerate() {
        if let Some(k) = blk.iter().position(|v| !v.is_finite()) {
            return Err(b * NF4_BLOCK + k);
        }
        let am = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let mut codes = [7u8; NF4_BLOCK];
        if blk.len() == NF4_BLOCK {
            absmax[b] = am;
            let inv = 1.0 / am.max(ABSMAX_FLOOR);
            for (c, &v) in codes.iter_mut().zip(blk) {
                *c = nf4_code(v * inv);
            }
        } else {
            let am = am.max(ABSMAX_FLOOR);
            absmax[b] = am;
            for (c, &v) in codes.iter_mut().zip(blk) {
                *c = nf4_code(v / am);
            }
        }
        let bytes = blk.len().div_ceil(2);
        for (i, o) in packed[b * 32..b * 32 + bytes].iter_mut().enumerate() {
            *o = (codes[2 * i] << 4) | codes[2 * i + 1];
        }
    }
    Ok(())
}

/// Quantizes with a kernel path (bit-identical to [`quantize_ref`], same lengths): whole
/// blocks on the path's kernel, a partial last block by the scalar code.
pub fn quantize(
    path: KernelPath,
    x: &[f32],
    packed: &mut [u8],
    absmax: &mut [f32],
) -> std::result::Result<(), usize> {
    let nb = x.len() / NF4_BLOCK;
    let full = nb * NF4_BLOCK;
    let (xf, pf, af) = (&x[..full], &mut packed[..full / 2], &mut absmax[..nb]);
    match usable(path) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 or Avx512 only when the CPU has AVX2/FMA/F16C; whole blocks only
        // (quantizing has no 512-bit kernel: the AVX-512 tier runs the AVX2 one).
        KernelPath::Avx2Fma | KernelPath::Avx512 => unsafe { avx2::quantize(xf, pf, af) },
        KernelPath::Portable => portable::quantize(xf, pf, af),
        _ => quantize_ref(xf, pf, af),
    }?;
    quantize_ref(&x[full..], &mut packed[full / 2..], &mut absmax[nb..]).map_err(|k| full + k)
}

/// The NF4 level of flat weight `e` (code in the high nibble of byte `e/2` for an even `e`).
#[inline]
fn level_at(packed: &[u8], e: usize) -> f32 {
    let b = packed[e / 2];
    NF4_LEVELS[(if e % 2 == 0 { b >> 4 } else { b & 15 }) as usize]
}

/// Scalar ground truth: dequantizes `out.len()` weights (a multiple of 16) starting at a
/// multiple of 16, from their packed codes, with `scale(i)` the absmax of the 16-run `i`.
pub fn dequantize_ref(packed: &[u8], scale: impl Fn(usize) -> f32, out: &mut [f32]) {
    for (g, o) in out.chunks_exact_mut(16).enumerate() {
        let s = scale(g);
        for i in 0..8 {
            let b = packed[g * 8 + i];
            o[2 * i] = NF4_LEVELS[(b >> 4) as usize] * s;
            o[2 * i + 1] = NF4_LEVELS[(b & 15) as usize] * s;
        }
    }
}

impl Nf4Matrix {
    /// Quantizes an `out x in` matrix (any shape) with plain f32 absmaxes.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        Self::quantize_with(w, false, kernel_path())
    }

    /// Quantizes with double-quantized absmaxes (bitsandbytes' `compress_statistics=True`).
    pub fn quantize_double(w: &Tensor) -> Result<Self> {
        Self::quantize_with(w, true, kernel_path())
    }

    /// Quantizes with an explicit kernel path (identical results on every path).
    pub fn quantize_with(w: &Tensor, double: bool, path: KernelPath) -> Result<Self> {
        const OP: &str = "nf4_quantize";
        let (o, i) = w.dims2(OP)?;
        let n = o * i;
        let mut packed = WeightBuf::<u8>::zeroed(n.div_ceil(2));
        let mut absmax = vec![0.0f32; n.div_ceil(NF4_BLOCK)];
        if n > 0 {
            // Flat chunks of whole blocks (blocks may straddle rows).
            const CHUNK: usize = 64 * NF4_BLOCK;
            let res: Vec<Result<()>> = w
                .data()
                .par_chunks(CHUNK)
                .zip(packed.par_chunks_mut(CHUNK / 2))
                .zip(absmax.par_chunks_mut(CHUNK / NF4_BLOCK))
                .enumerate()
                .map(|(c, ((x, p), a))| {
                    quantize(path, x, p, a).map_err(|_| nonfinite(OP, i, x, c * CHUNK))
                })
                .collect();
            kernels::first_error(res)?;
        }
        let stats = if double {
            let (codes, offset, scale) = double_quantize(&absmax);
            // Weights near f32's limit give absmaxes whose offset and group scales decode to
            // inf or NaN (3.4e38 beside ordinary blocks): an error naming the block, never an
            // infinite scale in the file.
            let map = dynamic_map();
            let decoded = |b: usize| decode_absmax(&map, codes[b], scale[b / DQ_BLOCK], offset);
            if let Some(b) = (0..absmax.len()).find(|&b| !decoded(b).is_finite()) {
                let first = b * NF4_BLOCK;
                return Err(QuantError::Overflow {
                    op: OP,
                    row: first / i.max(1),
                    col: first % i.max(1),
                    value: absmax[b],
                    storage: "f32",
                    what: format!(
                        "the block of {NF4_BLOCK} starting here has absmax {}, which the \
                         double quantization of the absmaxes (offset {offset}, group scale {}) \
                         decodes as {}; quantize without double quantization (nf4)",
                        absmax[b],
                        scale[b / DQ_BLOCK],
                        decoded(b)
                    ),
                });
            }
            Stats::Double {
                codes: Bytes::from_vec(codes),
                offset,
                scale: Bytes::from_f32(scale),
                map: Box::new(dynamic_map()),
            }
        } else {
            Stats::Plain {
                absmax: Bytes::from_f32(absmax),
            }
        };
        Ok(Nf4Matrix {
            out: o,
            inn: i,
            packed: Bytes::from_weight_buf(packed),
            stats,
        })
    }

    fn check_dims(op: &'static str, out: usize, inn: usize) -> Result<usize> {
        out.checked_mul(inn)
            .filter(|n| n.checked_mul(4).is_some())
            .ok_or_else(|| QuantError::Shape {
                op,
                shape: vec![out, inn],
                what: "size overflows".into(),
            })
    }

    /// Builds from raw parts: `packed` u8 `[ceil(out·in/2)]`, `absmax` f32 `[ceil(out·in/64)]`
    /// (little-endian; copied only if misaligned). A part of the wrong length is a
    /// [`QuantError::PartLength`]; a NaN, infinite or negative absmax a
    /// [`QuantError::PartValue`] naming its block.
    pub fn from_parts(out: usize, inn: usize, packed: Bytes, absmax: Bytes) -> Result<Self> {
        const OP: &str = "Nf4Matrix::from_parts";
        let n = Self::check_dims(OP, out, inn)?;
        check_part(OP, "packed", out, inn, &packed, n.div_ceil(2))?;
        check_part(OP, "absmax", out, inn, &absmax, n.div_ceil(NF4_BLOCK) * 4)?;
        let absmax = absmax.aligned(4);
        check_values(OP, "absmax", absmax.f32s().iter().copied(), true)?;
        Ok(Nf4Matrix {
            out,
            inn,
            packed,
            stats: Stats::Plain { absmax },
        })
    }

    /// Builds a double-quantized matrix from raw parts: `packed` u8 `[ceil(out·in/2)]`,
    /// `absmax_codes` u8 `[ceil(out·in/64)]`, `absmax_offset` f32 `[1]`, `absmax_scale` f32
    /// `[ceil(ceil(out·in/64)/256)]`. A part of the wrong length is a
    /// [`QuantError::PartLength`]; a NaN or infinite offset, a NaN, infinite or negative
    /// scale, or parts whose absmax of a block decodes to inf or NaN (an offset and a scale
    /// near f32's limit: every weight of the block would be NaN), a [`QuantError::PartValue`]
    /// naming the part and index.
    pub fn from_parts_double(
        out: usize,
        inn: usize,
        packed: Bytes,
        absmax_codes: Bytes,
        absmax_offset: Bytes,
        absmax_scale: Bytes,
    ) -> Result<Self> {
        const OP: &str = "Nf4Matrix::from_parts_double";
        let n = Self::check_dims(OP, out, inn)?;
        let nb = n.div_ceil(NF4_BLOCK);
        check_part(OP, "packed", out, inn, &packed, n.div_ceil(2))?;
        check_part(OP, "absmax_codes", out, inn, &absmax_codes, nb)?;
        check_part(OP, "absmax_offset", out, inn, &absmax_offset, 4)?;
        check_part(
            OP,
            "absmax_scale",
            out,
            inn,
            &absmax_scale,
            nb.div_ceil(DQ_BLOCK) * 4,
        )?;
        let o = absmax_offset.as_slice();
        let offset = f32::from_le_bytes([o[0], o[1], o[2], o[3]]);
        check_values(OP, "absmax_offset", [offset], false)?;
        let scale = absmax_scale.aligned(4);
        check_values(OP, "absmax_scale", scale.f32s().iter().copied(), true)?;
        let map = dynamic_map();
        let codes = absmax_codes.as_slice();
        let scales = scale.f32s();
        if let Some(b) = (0..nb)
            .find(|&b| !decode_absmax(&map, codes[b], scales[b / DQ_BLOCK], offset).is_finite())
        {
            return Err(QuantError::PartValue {
                op: OP,
                part: "absmax_codes",
                index: b,
                what: format!(
                    "code {} with scale {} and offset {offset} decodes block {b}'s absmax as {}",
                    codes[b],
                    scales[b / DQ_BLOCK],
                    decode_absmax(&map, codes[b], scales[b / DQ_BLOCK], offset)
                ),
            });
        }
        Ok(Nf4Matrix {
            out,
            inn,
            packed,
            stats: Stats::Double {
                codes: absmax_codes,
                offset,
                scale,
                map: Box::new(dynamic_map()),
            },
        })
    }

    /// Rows (`out`) and columns (`in`).
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inn)
    }

    /// Whether the absmaxes are double-quantized.
    pub fn is_double_quantized(&self) -> bool {
        matches!(self.stats, Stats::Double { .. })
    }

    /// The raw `packed` part.
    pub fn packed_bytes(&self) -> &[u8] {
        self.packed.as_slice()
    }

    /// The raw `absmax` part (f32, plain statistics only).
    pub fn absmax_bytes(&self) -> Option<&[u8]> {
        match &self.stats {
            Stats::Plain { absmax } => Some(absmax.as_slice()),
            Stats::Double { .. } => None,
        }
    }

    /// The raw `absmax_codes` part (double quantization only).
    pub fn absmax_codes_bytes(&self) -> Option<&[u8]> {
        match &self.stats {
            Stats::Double { codes, .. } => Some(codes.as_slice()),
            Stats::Plain { .. } => None,
        }
    }

    /// `absmax_offset` (double quantization only).
    pub fn absmax_offset(&self) -> Option<f32> {
        match &self.stats {
            Stats::Double { offset, .. } => Some(*offset),
            Stats::Plain { .. } => None,
        }
    }

    /// The raw `absmax_scale` part (f32, double quantization only).
    pub fn absmax_scale_bytes(&self) -> Option<&[u8]> {
        match &self.stats {
            Stats::Double { scale, .. } => Some(scale.as_slice()),
            Stats::Plain { .. } => None,
        }
    }

    /// The (dequantized) absmax of flat block `b`.
    ///
    /// # Panics
    ///
    /// If `b` is not a block of the matrix (`b >= ceil(out·in/64)`).
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        match &self.stats {
            Stats::Plain { absmax } => absmax.f32s()[b],
            Stats::Double {
                codes,
                offset,
                scale,
                map,
            } => decode_absmax(
                map,
                codes.as_slice()[b],
                scale.f32s()[b / DQ_BLOCK],
                *offset,
            ),
        }
    }

    /// Writes the absmaxes of flat blocks `b0..b0 + dst.len()` into `dst`.
    ///
    /// # Panics
    ///
    /// If those blocks are not all blocks of the matrix (`b0 + dst.len() > ceil(out·in/64)`).
    pub fn fill_absmax(&self, b0: usize, dst: &mut [f32]) {
        match self.absmax_reader() {
            AbsmaxReader::Plain(PlainAbsmax(absmax)) => {
                dst.copy_from_slice(&absmax[b0..b0 + dst.len()])
            }
            AbsmaxReader::Double(d) => {
                let (c, s) = (d.codes, d.scale);
                let end = b0 + dst.len();
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if crate::cpu::has_avx2_fma_f16c()
                    && end <= c.len()
                    && (end == b0 || (end - 1) / DQ_BLOCK < s.len())
                    && end <= i32::MAX as usize
                {
                    // SAFETY: the CPU has AVX2; the codes b0..end and the scales of their
                    // blocks of 256 exist (just checked), and end fits an i32.
                    done = unsafe { avx2::absmax_double(c, b0, s, d.map, d.offset, dst) };
                }
                for (k, v) in dst.iter_mut().enumerate().skip(done) {
                    let b = b0 + k;
                    *v = decode_absmax(d.map, c[b], s[b / DQ_BLOCK], d.offset);
                }
            }
        }
    }

    /// A reader of the block absmaxes where they lie, for the fused int8 kernels: each
    /// block's absmax read (a double-quantized one decoded) in the kernel's loop as it is
    /// needed, with no pass over a row's absmaxes before its products. See
    /// [`with_absmax_reader!`](crate::nf4::with_absmax_reader).
    pub(crate) fn absmax_reader(&self) -> AbsmaxReader<'_> {
        let blocks = (self.out * self.inn).div_ceil(NF4_BLOCK);
        // The readers' `at` reads without bounds checks: the parts' lengths were checked where
        // the matrix was built, and are checked again here (a few compares per call).
        match &self.stats {
            Stats::Plain { absmax } => {
                let absmax = absmax.f32s();
                assert!(
                    absmax.len() >= blocks,
                    "nf4: {} absmaxes for {blocks} blocks",
                    absmax.len()
                );
                AbsmaxReader::Plain(PlainAbsmax(absmax))
            }
            Stats::Double {
                codes,
                offset,
                scale,
                map,
            } => {
                let (codes, scale) = (codes.as_slice(), scale.f32s());
                assert!(
                    codes.len() >= blocks && scale.len() >= blocks.div_ceil(DQ_BLOCK),
                    "nf4: {} absmax codes and {} scales for {blocks} blocks",
                    codes.len(),
                    scale.len()
                );
                AbsmaxReader::Double(DoubleAbsmax {
                    codes,
                    scale,
                    map,
                    offset: *offset,
                })
            }
        }
    }

    /// Bits per weight, statistics included (4.5 plain, ≈ 4.127 double-quantized).
    pub fn bits_per_weight(&self) -> f64 {
        self.parts_len() as f64 * 8.0 / (self.out * self.inn).max(1) as f64
    }

    /// The whole matrix dequantized with an explicit kernel path.
    pub fn dequantize_with(&self, path: KernelPath) -> Tensor {
        kernels::to_f32(self, path)
    }

    fn parts_len(&self) -> usize {
        self.packed.len()
            + match &self.stats {
                Stats::Plain { absmax } => absmax.len(),
                Stats::Double { codes, scale, .. } => codes.len() + 4 + scale.len(),
            }
    }
}

/// bitsandbytes' nested quantization of the absmaxes: `(codes, offset, scales)`.
pub fn double_quantize(absmax: &[f32]) -> (Vec<u8>, f32, Vec<f32>) {
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32
    };
    let mut codes = Vec::with_capacity(absmax.len());
    let mut scales = Vec::new();
    for grp in absmax.chunks(DQ_BLOCK) {
        let a: Vec<f32> = grp.iter().map(|v| v - offset).collect();
        let s = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(s);
        let inv = 1.0 / s;
        for v in a {
            codes.push(if s == 0.0 {
                0
            } else {
                dynamic_code_bnb(v * inv)
            });
        }
    }
    (codes, offset, scales)
}

/// The absmaxes of a forward GEMM panel's run of 16 columns, one per row (lane), as the
/// panel kernels of every tier apply them: a row's absmax is read again only when the run
/// enters another block of 64.
pub(crate) struct PanelAbsmax {
    block: [usize; 16],
    /// Lane `j`: the absmax of row `r0 + j`'s block at the run (0 past the panel's rows).
    pub(crate) scale: [f32; 16],
}

impl PanelAbsmax {
    pub(crate) fn new() -> Self {
        PanelAbsmax {
            block: [usize::MAX; 16],
            scale: [0.0; 16],
        }
    }

    /// Moves to the run whose first weight of row `r0 + j` is flat element `first(j)`, for
    /// `j < rows <= 16` (each inside W).
    #[inline(always)]
    pub(crate) fn at(&mut self, m: &Nf4Matrix, rows: usize, first: impl Fn(usize) -> usize) {
        for j in 0..rows {
            let blk = first(j) / NF4_BLOCK;
            if blk != self.block[j] {
                self.block[j] = blk;
                self.scale[j] = m.block_absmax(blk);
            }
        }
    }
}

impl QuantRows for Nf4Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn act8_view(&self) -> Option<&dyn crate::act8::IntCodes> {
        Some(self)
    }
    fn act8_generic(&self, m: usize) -> bool {
        crate::act8::int8_route("nf4", m) == crate::act8::Int8Route::Generic
    }
    /// On the AVX-512 path (whole blocks of 64 in a row) batches below 6 take the f32 GEMV's
    /// batch kernel (`nf4::gemv_batch`: each run of codes decoded once for every vector),
    /// larger ones the tiles. BigNet nf4 / nf4_dq, f32 activations, 2 threads of the 2-core
    /// Xeon, three rounds in turns (2026-12-05), tiles / batch kernel, ms: batch 2 1.57–1.62 /
    /// 0.86–0.90, 4 1.86–2.00 / 1.18–1.39, 6 2.46–2.64 / 1.74–2.23 (nf4_dq 2.74–2.98 /
    /// 1.60–1.99), 8 2.71–2.91 / 1.94–2.89, 10 (two chunks of 5) 3.23–3.46 / 3.18–3.62, 12
    /// 3.45–3.78 / 4.10–4.38, 16 4.69–4.79 / 4.17–5.07, 32 7.2–8.1 / 8.0–9.7. But on the
    /// 16-core Xeon (16 threads, two rounds in turns, 23:01 UTC) batch 8 took 1.37–1.42 with the
    /// batch kernel against 1.14 with the tiles (batch 2 0.49–0.55 against 0.67–0.70, 4
    /// 0.82 against 0.84–0.88): the route must not depend on the thread count (the bits would),
    /// so the tiles from 6. Elsewhere from 2 (the default).
    fn tiles_min_m(&self) -> usize {
        if kernel_path() == KernelPath::Avx512 && self.inn % NF4_BLOCK == 0 {
            6
        } else {
            kernels::TILES_MIN_M
        }
    }
    /// (Only where the fused GEMV takes the matrix: whole blocks of 64 in a row.)
    fn act8_fused(&self, m: usize) -> bool {
        self.inn % NF4_BLOCK == 0 && act8::FUSED.takes(m)
    }
    /// For whole blocks of 64 in a row: the f32 GEMV's batch kernel on the AVX-512 path
    /// (`nf4::gemv_batch`, for the f32 preparation), or the fused int8 GEMV's
    /// (`nf4_int8::gemv_batch`, through [`crate::act8::FusedGemv::run_batch`]).
    fn gemv_batch(
        &self,
        path: KernelPath,
        preps: &[&[f32]],
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        stride: usize,
    ) -> bool {
        if self.inn % NF4_BLOCK != 0 {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if usable(path) == KernelPath::Avx512 && preps.iter().all(|p| p.len() == self.inn) {
            // SAFETY: the path went through `usable`, so the CPU has the AVX-512 tier; rows,
            // out and stride as the trait's contract says.
            return unsafe { avx512::gemv_batch(self, preps, rows, out, stride) };
        }
        act8::FUSED.run_batch(usable(path), self, self.inn, preps, rows, out, stride)
    }
    fn seg_align(&self) -> usize {
        16
    }
    /// Any `in`: the flat weights `s..s + len` (`s = r·in + c0`) up to the first multiple of
    /// 16 and after the last one by the scalar code (`level · absmax`, as [`dequantize_ref`]),
    /// the aligned runs of 16 between them on the path's kernel.
    fn dequant_segment(&self, path: KernelPath, r: usize, c0: usize, len: usize, dst: &mut [f32]) {
        const CH: usize = 32;
        let s0 = r * self.inn + c0;
        let head = (s0.next_multiple_of(16) - s0).min(len);
        let body = (len - head) / 16 * 16;
        let packed = self.packed.as_slice();
        for k in (0..head).chain(head + body..len) {
            dst[k] = level_at(packed, s0 + k) * self.block_absmax((s0 + k) / NF4_BLOCK);
        }
        let (s, dst, len) = (s0 + head, &mut dst[head..head + body], body);
        let path = usable(path);
        let mut done = 0;
        while done < len {
            let start = s + done;
            let b0 = start / NF4_BLOCK;
            let end = ((b0 + CH) * NF4_BLOCK).min(s + len);
            let mut am = [0.0f32; CH];
            self.fill_absmax(b0, &mut am[..end.div_ceil(NF4_BLOCK) - b0]);
            let scale = |g: usize| am[(start + g * 16) / NF4_BLOCK - b0];
            let packed = &self.packed.as_slice()[start / 2..end / 2];
            let out = &mut dst[done..done + (end - start)];
            match path {
                KernelPath::Scalar => dequantize_ref(packed, scale, out),
                KernelPath::Portable => portable::dequantize(packed, scale, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `usable` gave Avx2Fma, so the CPU has AVX2, FMA and F16C; lengths
                // match (len/2 bytes).
                KernelPath::Avx2Fma => unsafe { avx2::dequantize(packed, scale, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `usable` gave Avx512, so the CPU has AVX-512 F/BW/VL; lengths match.
                KernelPath::Avx512 => unsafe { avx512::dequantize(packed, scale, out) },
                #[cfg(not(target_arch = "x86_64"))]
                KernelPath::Avx2Fma | KernelPath::Avx512 => {
                    portable::dequantize(packed, scale, out)
                }
            }
            done += end - start;
        }
    }
    /// Only when `in % 16 == 0` (every requested run of 16 then lies in one block); otherwise
    /// `false`, and rows go through [`QuantRows::dequant_segment`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn dequant_cols_simd(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) -> bool {
        if self.inn % 16 != 0 {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier; the request fits in runs
        // of 16).
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::dequant_cols(self, b, dst),
                _ => avx2::dequant_cols(self, b, dst),
            }
        };
        true
    }
    /// Only when `in % 16 == 0`, as [`QuantRows::dequant_cols_simd`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack_fwd_panel_simd(&self, path: KernelPath, b: ColBlock, dst: &mut [f32]) -> bool {
        if self.inn % 16 != 0 {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier; the panel fits in runs of
        // 16).
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::pack_fwd_panel(self, b, dst),
                _ => avx2::pack_fwd_panel(self, b, dst),
            }
        };
        true
    }
    /// AVX2 and AVX-512 paths when rows hold whole blocks (`in % 64 == 0`): appends x with
    /// each run of 16 reordered as its 8 even then 8 odd elements. (Other shapes take the
    /// generic GEMV.)
    ///
    /// With int8 activations where their route is NF4's fused GEMV
    /// ([`crate::act8::Int8Route::FusedNf4`]): x quantized for it ([`act8::prepare`]) unless x
    /// holds a NaN or infinity.
    fn gemv_prepare(&self, path: KernelPath, m: usize, x: &[f32], prep: &mut Vec<f32>) {
        if is_x86_simd(usable(path)) && self.inn % NF4_BLOCK == 0 {
            if act8::FUSED.prepare(self.inn, m, x, prep) {
                return;
            }
            kernels::push_even_odd16(x, prep);
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
        if self.inn % NF4_BLOCK != 0 {
            return false;
        }
        // (The two preparations differ in length for `in > 0`: `in` floats against 33 per
        // block of 64.)
        // SAFETY: the trait's contract: the CPU supports `path`; rows and y checked.
        if unsafe { act8::FUSED.run(path, self, self.inn, prep, rows.clone(), y, acc) } {
            return true;
        }
        if prep.len() != self.inn {
            return false;
        }
        // SAFETY: the trait's contract (the CPU has `path`'s tier; rows and y checked) and
        // this prep.
        unsafe {
            match path {
                KernelPath::Avx512 => avx512::gemv(self, prep, rows, y, acc),
                _ => avx2::gemv(self, prep, rows, y, acc),
            }
        };
        true
    }
}

/// Int8 activations: each code through [`crate::act8::NF4_LEVELS_I8`] (signed), units of one
/// block, `w' = (absmax / 127) · level8`; only when `in % 64 == 0` (blocks within rows).
impl crate::act8::IntCodes for Nf4Matrix {
    fn int_dims(&self) -> (usize, usize) {
        (self.out, self.inn)
    }
    fn int_layout(&self) -> Option<crate::act8::IntLayout> {
        (self.inn % NF4_BLOCK == 0).then_some(crate::act8::IntLayout {
            unit: NF4_BLOCK,
            kind: crate::act8::CodeKind::Signed,
        })
    }
    fn int_codes(&self, r: usize, dst: &mut [u8]) {
        let dst = &mut dst[..self.inn];
        crate::act8::unpack_nf4_levels_i8(self.packed.as_slice(), r * self.inn, dst);
    }
    fn int_affine(&self, r: usize, scale: &mut [f32], offset: &mut [f32]) {
        let nb = self.inn / NF4_BLOCK;
        self.fill_absmax(r * nb, &mut scale[..nb]);
        for s in &mut scale[..nb] {
            *s /= 127.0;
        }
        offset[..nb].fill(0.0);
    }
}

kernels::impl_weight_matrix!(Nf4Matrix, "nf4");

#[cfg(test)]
mod tests {
    use super::*;
    use nibble_tensor::Rng;

    /// `fill_absmax` of a double-quantized matrix (its AVX2 gathers where the CPU has them)
    /// against the scalar formula bit for bit, on awkward starts and lengths, runs crossing
    /// blocks of 256, and a partial last run.
    #[test]
    fn double_absmax_matches_the_formula() {
        #[cfg(target_arch = "x86_64")]
        if !crate::cpu::has_avx2_fma_f16c() {
            println!("nf4 absmax: this CPU lacks AVX2: the scalar loop alone is checked");
        }
        let w = Tensor::uniform(&[37, 1024], -2.0, 2.0, &mut Rng::new(9));
        let m = Nf4Matrix::quantize_double(&w).unwrap();
        let Stats::Double {
            codes,
            offset,
            scale,
            map,
        } = &m.stats
        else {
            panic!("quantize_double gave plain statistics");
        };
        let nb = 37 * 1024 / NF4_BLOCK;
        let want =
            |b: usize| map[codes.as_slice()[b] as usize] * scale.f32s()[b / DQ_BLOCK] + offset;
        for (b0, len) in [
            (0, 0),
            (0, 1),
            (3, 7),
            (5, 8),
            (250, 9),
            (255, 17),
            (0, 256),
            (1, 511),
            (100, nb - 100),
            (nb - 9, 9),
        ] {
            let mut dst = vec![f32::NAN; len];
            m.fill_absmax(b0, &mut dst);
            for (k, d) in dst.iter().enumerate() {
                assert_eq!(
                    d.to_bits(),
                    want(b0 + k).to_bits(),
                    "block {} of ({b0}, {len})",
                    b0 + k
                );
            }
        }
    }
}
